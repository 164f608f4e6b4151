"""A store in this process's memory, for ``memory://name`` URLs (tests, notebooks, demos).

Stores of one name share their contents across store objects of the process, as fsspec's
memory filesystem does. It behaves like an object store: no lock, a conditional commit (the
manifest's generation is compared under a mutex), fresh checkpoint names, and files that
appear only when their writer commits them. Nothing survives the process.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptkit._fsio import new_hasher
from ckptkit._manifest import CHECKPOINT_DIR, is_checkpoint_file
from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    ManifestConflict,
    ManifestVersion,
    Progress,
    RangeReader,
    Storage,
)


@dataclass
class _Root:
    mutex: threading.Lock = field(default_factory=threading.Lock)
    manifest: bytes | None = None
    generation: int = 0
    checkpoints: dict[str, dict[str, bytes]] = field(default_factory=dict)
    #: Checkpoints a writer of this process made and nobody deleted since, committed or not.
    writing: set[str] = field(default_factory=set)


_ROOTS: dict[str, _Root] = {}
_ROOTS_MUTEX = threading.Lock()


class _MemorySink:
    def __init__(self, root: _Root, directory: str, name: str) -> None:
        self._root, self._directory, self._name = root, directory, name
        self._pieces: list[bytes] = []

    def write(self, data: memoryview, /) -> None:
        self._pieces.append(bytes(data))  # a copy: the caller may reuse its buffer

    def commit(self) -> None:
        data = b"".join(self._pieces)
        self._pieces = []
        with self._root.mutex:
            self._root.checkpoints.setdefault(self._directory, {})[self._name] = data

    def abort(self) -> None:
        self._pieces = []


class _MemoryWriter(CheckpointWriter):
    def __init__(self, root: _Root, name: str, *, joined: bool = False) -> None:
        self._root, self.name = root, name
        self._joined = joined
        self._created: list[str] = []

    def create(self, name: str) -> _MemorySink:
        self._created.append(name)
        return _MemorySink(self._root, self.name, name)

    def finish(self) -> str:
        # The name stays the writer's (in ``writing``) after this: a sweep that read the
        # manifest before this checkpoint's commit must not take it for a leftover.
        return self.name

    def abort(self) -> None:
        with self._root.mutex:
            if self._joined:
                files = self._root.checkpoints.get(self.name, {})
                for name in self._created:
                    files.pop(name, None)
                return
            self._root.checkpoints.pop(self.name, None)
            self._root.writing.discard(self.name)


class _MemoryRange(RangeReader):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read_at(self, size: int, offset: int) -> bytearray:
        if offset + size > self.size:
            raise ValueError(f"file ends at byte {self.size}, before {size} bytes at {offset}")
        return bytearray(self._data[offset : offset + size])

    def close(self) -> None:
        pass


class _MemoryFiles(CheckpointFiles):
    def __init__(self, storage: MemoryStorage, files: dict[str, bytes], directory: str) -> None:
        self._storage, self._files, self._directory = storage, files, directory

    def _get(self, name: str, size: int | None = None) -> bytes:
        with self._storage.root.mutex:
            data = self._files.get(name)
        if data is None:
            raise FileNotFoundError(
                f"{self._storage.describe(self._directory, name)}: no such file"
            )
        if size is not None and len(data) != size:
            raise ValueError(f"size is {len(data)} bytes, the manifest says {size}")
        return data

    def read(
        self, name: str, *, size: int, checksum: str | None, progress: Progress | None = None
    ) -> memoryview:
        data = self.map(name, size=size, checksum=checksum)  # checks the size first
        view = memoryview(np.empty(size, dtype=np.uint8).data)
        view[:] = data
        if progress is not None:
            progress(size)
        return view

    def map(self, name: str, *, size: int, checksum: str | None) -> memoryview:
        data = self._get(name, size)
        if checksum is not None:
            algorithm = checksum.partition(":")[0]
            h = new_hasher(algorithm)
            h.update(data)
            if f"{algorithm}:{h.hexdigest()}" != checksum:
                raise ValueError("checksum does not match the manifest (the file's bytes changed)")
        return memoryview(data)  # bytes: read-only, shared, never changed in place

    def open(self, name: str) -> RangeReader:
        return _MemoryRange(self._get(name))

    def checksum(self, name: str, algorithm: str) -> tuple[int, str]:
        data = self._get(name)
        h = new_hasher(algorithm)
        h.update(data)
        return len(data), f"{algorithm}:{h.hexdigest()}"

    def close(self) -> None:
        pass


class MemoryStorage(Storage):
    """``memory://name``: a dict-backed store shared by every store object of the process.

    Thread-safe, with a real conditional commit, so it stands in for an object store wherever
    a test needs the protocol but not a real medium.

    Example::

        storage = MemoryStorage("memory://experiment")
    """

    def __init__(self, url: str) -> None:
        name = url.removeprefix("memory://")
        if name == url or not name.strip("/"):
            raise ValueError(f"{url!r} is not a memory://name URL")
        self.location = f"memory://{name}"
        with _ROOTS_MUTEX:
            self.root = _ROOTS.setdefault(name, _Root())

    def discard(self) -> None:
        """Drop everything stored under this name, for every store object of the process."""
        with _ROOTS_MUTEX:
            _ROOTS.pop(self.location.removeprefix("memory://"), None)

    def exists(self) -> bool:
        return True

    def create(self) -> None:
        pass

    def lock(self, timeout: float) -> AbstractContextManager[Any]:
        """A context that does nothing: the conditional commit guards, as on an object store."""
        return contextlib.nullcontext()

    def read_manifest(self, cap: int) -> ManifestVersion:
        with self.root.mutex:
            data, generation = self.root.manifest, self.root.generation
        if data is not None and len(data) > cap:
            raise ValueError(f"is {len(data)} bytes, over the {cap}-byte cap")
        return ManifestVersion(data, generation if data is not None else None)

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        with self.root.mutex:
            current = self.root.manifest
            if (current is None) != (expected.data is None) or (
                current is not None and expected.token != self.root.generation
            ):
                raise ManifestConflict(f"{self.location}: another writer committed first")
            self.root.manifest = bytes(data)
            self.root.generation += 1

    def new_checkpoint(self, step: int) -> CheckpointWriter:
        with self.root.mutex:
            while True:
                name = f"step_{step:012d}.{secrets.randbelow(10**18):018d}"
                if name not in self.root.checkpoints and name not in self.root.writing:
                    break
            self.root.writing.add(name)
        return _MemoryWriter(self.root, name)

    def join_checkpoint(self, name: str) -> CheckpointWriter:
        with self.root.mutex:
            if name not in self.root.writing:
                raise ValueError(f"{self.describe(name)}: no checkpoint is being written there")
        return _MemoryWriter(self.root, name, joined=True)

    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        with self.root.mutex:
            files = self.root.checkpoints.get(directory)
        if files is None:
            raise FileNotFoundError(f"{self.describe(directory)}: no such checkpoint")
        return _MemoryFiles(self, files, directory)

    def delete_checkpoint(self, directory: str, names: Any) -> None:
        with self.root.mutex:
            files = self.root.checkpoints.get(directory, {})
            for name in names:
                files.pop(name, None)
            if not files:
                self.root.checkpoints.pop(directory, None)
                self.root.writing.discard(directory)

    def sweep(self, listed: set[str] | None) -> None:
        """Remove unlisted checkpoints no writer of this process made.

        Every checkpoint a writer here made stays its own until it is deleted, committed or
        not: the ``listed`` a sweep gets was read before other writers' latest commits, so
        an unlisted checkpoint of a live writer may already be committed.
        """
        if listed is None:
            return
        with self.root.mutex:
            stale = [
                d
                for d in self.root.checkpoints
                if CHECKPOINT_DIR.fullmatch(d) and d not in listed and d not in self.root.writing
            ]
            own = {d: [n for n in self.root.checkpoints[d] if is_checkpoint_file(n)] for d in stale}
        for directory, names in own.items():
            self.delete_checkpoint(directory, names)
