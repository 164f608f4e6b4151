"""LocalStorage: a store in a POSIX directory, and the only code that writes to one.

The commit protocol on a local disk (the store runs it under :meth:`LocalStorage.lock`):

1. The store's file lock serialises every writer (the kernel drops it if the holder dies).
2. A checkpoint's files are written into a fresh temporary directory
   ``root/.ckptkit-tmp-<random>``, each created with ``O_EXCL`` and fsynced, then the directory.
3. The directory is renamed to ``step_<12 digits>`` (``.N`` added if the name is taken).
4. ``manifest.json`` is replaced atomically: ``root`` is fsynced (so the rename is durable before
   a manifest lists it), the new manifest is written to a temporary file and fsynced,
   ``os.replace`` puts it in place (the commit point), and ``root`` is fsynced again.
5. What the new manifest no longer lists is deleted: its listed files, then its directory.

Reads open a checkpoint's directory once without following links and its files relative to
that descriptor (``_fsread.py``), so a directory swapped for a link cannot redirect them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import filelock

from ckptkit import _fsio, _fsread
from ckptkit._hashing import HashingWriter
from ckptkit._manifest import CHECKPOINT_DIR, MANIFEST_NAME, is_checkpoint_file
from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    ManifestVersion,
    Progress,
    RangeReader,
    Storage,
)

logger = logging.getLogger("ckptkit")

#: The lock file inside a local store's root.
LOCK_NAME = ".ckptkit.lock"


class FileSink:
    """A new file written through one descriptor: exclusive create, every byte written, fsync.

    ``O_EXCL``: never write through a name some other process (or an old crash) already holds.
    ``os.write`` may write fewer bytes than asked and is capped near 2 GiB a call: it loops.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data: memoryview, /) -> None:
        assert self._fd is not None, "write after close"
        total, done = len(data), 0
        try:
            while done < total:
                done += os.write(self._fd, data[done : done + _fsio.MAX_WRITE])
        except OSError as e:
            e.filename = e.filename or str(self.path)
            raise

    def commit(self) -> None:
        assert self._fd is not None, "commit after close"
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            e.filename = e.filename or str(self.path)
            raise
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def write_durable_file(path: Path, data: bytes) -> tuple[int, str]:
    """Write ``data`` to a new file at ``path`` and fsync it; return (size, checksum)."""
    writer = HashingWriter(FileSink(path))
    try:
        writer.write(data)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer.size, writer.checksum


class _LocalCheckpointWriter(CheckpointWriter):
    def __init__(self, root: Path, step: int) -> None:
        self._root = root
        self._step = step
        self._tmp = root / _fsio.temp_name()
        self.name = self._tmp.name
        os.mkdir(self._tmp)

    def create(self, name: str) -> FileSink:
        return FileSink(self._tmp / name)

    def finish(self) -> str:
        _fsio.fsync_dir(self._tmp)
        # An overwrite (or a leftover no sweep has removed yet) holds the plain name: add ".N".
        base = name = f"step_{self._step:012d}"
        n = 0
        while os.path.lexists(self._root / name):
            n += 1
            name = f"{base}.{n}"
        os.rename(self._tmp, self._root / name)
        return name

    def abort(self) -> None:
        _fsio.remove_temp_tree(self._tmp)


class _JoinedLocalWriter(CheckpointWriter):
    """Files another process adds to a checkpoint's temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.name = directory.name
        self._dir = directory
        self._sinks: dict[str, FileSink] = {}

    def create(self, name: str) -> FileSink:
        sink = self._sinks[name] = FileSink(self._dir / name)
        return sink

    def finish(self) -> str:
        # Each file was fsynced by its sink's commit; the directory is fsynced by the writer
        # that started the checkpoint, after every rank has finished.
        return self.name

    def abort(self) -> None:
        for name in self._sinks:
            _fsio.remove_quietly(self._dir / name)


class _LocalRange(RangeReader):
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def read_at(self, size: int, offset: int) -> bytearray:
        return _fsread.pread_exactly(self._fd, size, offset)

    def close(self) -> None:
        os.close(self._fd)


class _LocalCheckpointFiles(CheckpointFiles):
    def __init__(self, path: Path) -> None:
        self._dir_fd = _fsread.open_directory(path)

    def read(
        self, name: str, *, size: int, checksum: str | None, progress: Progress | None = None
    ) -> memoryview:
        return _fsread.read_verified(
            name, dir_fd=self._dir_fd, size=size, checksum=checksum, progress=progress
        )

    def map(self, name: str, *, size: int, checksum: str | None) -> memoryview:
        return _fsread.map_verified(name, dir_fd=self._dir_fd, size=size, checksum=checksum)

    def open(self, name: str) -> RangeReader:
        return _LocalRange(_fsread.open_regular(name, dir_fd=self._dir_fd))

    def checksum(self, name: str, algorithm: str) -> tuple[int, str]:
        return _fsread.file_checksum(name, dir_fd=self._dir_fd, algorithm=algorithm)

    def close(self) -> None:
        os.close(self._dir_fd)


class LocalStorage(Storage):
    """A store's files in a directory on a POSIX file system (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{root}: a store's root must be a directory, not a file")
        self.root = root
        self.location = str(root)
        self._lock_path = root / LOCK_NAME

    def describe(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def exists(self) -> bool:
        return self.root.exists()

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self._locked(timeout)

    @contextmanager
    def _locked(self, timeout: float) -> Iterator[None]:
        lock = filelock.FileLock(self._lock_path, timeout=timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise TimeoutError(str(self._lock_path)) from None
        try:
            yield
        finally:
            lock.release()

    def lock_description(self) -> str:
        return f"the store's lock ({self._lock_path})"

    def read_manifest(self, cap: int) -> ManifestVersion:
        try:
            return ManifestVersion(_fsread.read_capped(self.root / MANIFEST_NAME, cap=cap))
        except FileNotFoundError:
            return ManifestVersion(None)

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        # Unconditional: the lock keeps every other writer out between the read and here.
        root = self.root
        tmp = root / _fsio.temp_name(".json")
        try:
            # The new directory's rename must be durable before a manifest that lists it is.
            _fsio.fsync_dir(root)
            write_durable_file(tmp, data)
            os.replace(tmp, root / MANIFEST_NAME)
        except BaseException as e:
            if isinstance(e, OSError) and e.filename == str(tmp):
                e.filename = f"{root / MANIFEST_NAME}, writing its replacement {tmp.name}"
            _fsio.remove_quietly(tmp)
            if new_checkpoint is not None:
                _fsio.remove_tree_of_own_files(root / new_checkpoint, is_checkpoint_file)
            raise
        # Past os.replace the commit has happened: a failure here propagates, but nothing is
        # rolled back, since the manifest on disk already lists the new state.
        _fsio.fsync_dir(root)

    def new_checkpoint(self, step: int) -> CheckpointWriter:
        return _LocalCheckpointWriter(self.root, step)

    def join_checkpoint(self, name: str) -> CheckpointWriter:
        if not _fsio.is_temp_name(name):
            raise ValueError(f"{name!r} is not the name of a checkpoint being written")
        directory = self.root / name
        if not directory.is_dir() or directory.is_symlink():
            raise FileNotFoundError(f"{directory}: no checkpoint is being written there")
        return _JoinedLocalWriter(directory)

    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        return _LocalCheckpointFiles(self.root / directory)

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        _fsio.remove_tree_of_own_files(self.root / directory, names)
        # Durable now, in the deleting thread: on a file system mounted with ``discard`` the
        # freed blocks are trimmed at this journal commit, not at the next save's fsync.
        _fsio.fsync_dir(self.root)

    def sweep(self, listed: set[str] | None) -> None:
        # Inside an unlisted directory only the store's own file names are deleted, so a file
        # someone else put there keeps its directory.
        root = self.root
        for entry in os.scandir(root):
            path = Path(entry.path)
            if entry.name.startswith(_fsio.TEMP_PREFIX):
                logger.info("%s: removing %s, left by a save that did not finish", root, entry.name)
                _fsio.remove_temp_tree(path)
            elif (
                listed is not None
                and CHECKPOINT_DIR.fullmatch(entry.name)
                and entry.name not in listed
                and entry.is_dir(follow_symlinks=False)
            ):
                logger.info("%s: removing %s, which the manifest does not list", root, entry.name)
                _fsio.remove_tree_of_own_files(path, is_checkpoint_file)
