"""A storage that fails on purpose: the n-th operation on it raises, for fault-injection tests.

It wraps a real storage and counts every operation a save, pin, unpin or prune makes on it
(starting a checkpoint, creating, writing and committing each file, finishing the checkpoint,
committing the manifest, deleting a checkpoint). The operation numbered ``fail_at`` raises
``OSError(err)`` instead of running. The manifest commit counts twice: once before it runs,
and once after it has run (a failure there comes after the commit point, like a failed fsync
of the directory after ``os.replace``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    ManifestVersion,
    Sink,
    Storage,
)


class FaultyStorage(Storage):
    def __init__(self, inner: Storage, *, fail_at: int = 0, err: int = errno.EIO) -> None:
        self.inner = inner
        self.location = inner.location
        self.fail_at = fail_at
        self.err = err
        self.count = 0
        self.failed: str | None = None
        self.done: list[str] = []

    def arm(self, fail_at: int, err: int | None = None) -> None:
        """Count again from zero; fail the ``fail_at``-th operation (0: never)."""
        self.fail_at, self.count, self.failed, self.done = fail_at, 0, None, []
        if err is not None:
            self.err = err

    def tick(self, operation: str) -> None:
        self.count += 1
        if self.count == self.fail_at:
            self.failed = operation
            raise OSError(self.err, f"injected {os.strerror(self.err)} in {operation}")
        self.done.append(operation)

    # -- delegated, counted -------------------------------------------------------------------

    def describe(self, *parts: str) -> str:
        return self.inner.describe(*parts)

    def exists(self) -> bool:
        return self.inner.exists()

    def create(self) -> None:
        self.inner.create()

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self.inner.lock(timeout)

    def lock_description(self) -> str:
        return self.inner.lock_description()

    def read_manifest(self, cap: int) -> ManifestVersion:
        return self.inner.read_manifest(cap)

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        try:
            self.tick("commit_manifest")
        except OSError:
            # As a real failure before the commit point: the new checkpoint goes too.
            if new_checkpoint is not None:
                self.inner.delete_checkpoint(new_checkpoint, ["arrays.safetensors", "state.json"])
            raise
        self.inner.commit_manifest(data, expected=expected, new_checkpoint=new_checkpoint)
        self.tick("after commit_manifest")

    def new_checkpoint(self, step: int) -> CheckpointWriter:
        self.tick("new_checkpoint")
        return _FaultyWriter(self, self.inner.new_checkpoint(step))

    def join_checkpoint(self, name: str) -> CheckpointWriter:
        self.tick("join_checkpoint")
        return _FaultyWriter(self, self.inner.join_checkpoint(name))

    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        return self.inner.open_checkpoint(directory)

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        self.tick("delete_checkpoint")
        self.inner.delete_checkpoint(directory, names)

    def sweep(self, listed: set[str] | None) -> None:
        self.inner.sweep(listed)


class _FaultyWriter(CheckpointWriter):
    def __init__(self, storage: FaultyStorage, inner: CheckpointWriter) -> None:
        self._storage = storage
        self._inner = inner
        self.name = inner.name

    def create(self, name: str) -> Sink:
        self._storage.tick(f"create {name}")
        return _FaultySink(self._storage, name, self._inner.create(name))

    def finish(self) -> str:
        self._storage.tick("finish")
        return self._inner.finish()

    def abort(self) -> None:
        self._inner.abort()


class _FaultySink:
    def __init__(self, storage: FaultyStorage, name: str, inner: Sink) -> None:
        self._storage = storage
        self._name = name
        self._inner = inner

    def write(self, data: memoryview, /) -> None:
        self._storage.tick(f"write {self._name}")
        self._inner.write(data)

    def commit(self) -> None:
        self._storage.tick(f"commit {self._name}")
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()
