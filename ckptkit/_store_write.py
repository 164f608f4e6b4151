"""ManifestWriter: every change to a store, as a transaction on its manifest.

A change (a save, pin, unpin or prune) reads the committed manifest, decides the new list of
checkpoints from it, and commits that list with one conditional replace of the manifest
(:meth:`Storage.commit_manifest`). If another writer committed in between, the commit raises
``ManifestConflict`` and changes nothing; the change then reads the new manifest and decides
again, so no writer ever overwrites a list it has not seen. On a local disk the store's file
lock keeps other writers out for the whole change, so that never happens there.

The first change a store object makes sweeps what crashed writers left, under the lock (on
object stores, only leftovers older than a grace period). Any ``OSError`` becomes a
``StoreWriteError`` whose message says whether the change reached the manifest.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

from ckptkit import _manifest
from ckptkit._errors import CkptkitError, LockTimeoutError, StoreWriteError
from ckptkit._record import CheckpointRecord
from ckptkit._storage import ManifestConflict, ManifestVersion
from ckptkit._store_read import CheckpointReader

_T = TypeVar("_T")

#: How many times a change decides again after other writers' commits before giving up.
MAX_CONFLICTS = 100


class _Unread:
    """The manifest was not read yet when a change failed (so nothing was committed)."""


_UNREAD = _Unread()


class Change:
    """One change in progress: the manifest it read, and its commit."""

    def __init__(self, writer: ManifestWriter, version: ManifestVersion) -> None:
        self._writer = writer
        self.version = version
        self.records = writer.reader.parse_manifest(version, cached=True)

    def commit(
        self,
        decide: Callable[[list[CheckpointRecord]], tuple[list[CheckpointRecord], _T]],
        *,
        new_checkpoint: str | None = None,
        new_files: Sequence[str] = _manifest.CHECKPOINT_FILES,
    ) -> _T:
        """Commit the records ``decide`` makes from the committed ones; return its other result.

        ``decide`` runs again on the newer manifest each time another writer committed first.
        If it raises, ``new_checkpoint`` is deleted and nothing is committed. A conflict after
        which the manifest lists ``new_checkpoint`` means this commit landed (its answer was
        lost, and a retry met it): it counts as committed.
        """
        storage = self._writer.reader.storage
        for _ in range(MAX_CONFLICTS):
            try:
                records, result = decide(self.records)
            except BaseException:
                if new_checkpoint is not None:
                    storage.delete_checkpoint(new_checkpoint, list(new_files))
                raise
            try:
                storage.commit_manifest(
                    _manifest.dumps(records), expected=self.version, new_checkpoint=new_checkpoint
                )
            except ManifestConflict:
                self.version = self._writer.reader.read_manifest()
                self.records = self._writer.reader.parse_manifest(self.version, cached=True)
                if new_checkpoint is not None and any(
                    r.directory == new_checkpoint for r in self.records
                ):
                    # The commit landed though its answer was lost, and another writer has
                    # committed on top of it since: the name is this save's alone.
                    return result
                continue
            self.records = records
            return result
        if new_checkpoint is not None:
            storage.delete_checkpoint(new_checkpoint, list(new_files))
        raise CkptkitError(
            f"{self._writer.reader.location}: other writers committed first {MAX_CONFLICTS} "
            "times in a row; nothing was committed: try again, or write from fewer processes"
        )


class ManifestWriter:
    """Runs changes to a store: its lock, the sweep, conflicts and disk-error messages."""

    def __init__(self, reader: CheckpointReader, *, lock_timeout: float) -> None:
        self.reader = reader
        self.lock_timeout = lock_timeout
        self._swept = False

    def sweep_again(self) -> None:
        """Sweep at the next change again (a deletion failed and left files behind)."""
        self._swept = False

    @contextmanager
    def change(self, action: str) -> Iterator[Change]:
        """Hold the lock for a change to the store; turn disk errors into ``StoreWriteError``.

        Yields the change, with the committed records read under the lock. The message of a
        failure says whether the change reached the manifest (the commit point), found by
        comparing the manifest before and after it.
        """
        before: ManifestVersion | _Unread = _UNREAD
        try:
            with self._locked():
                before = self.reader.read_manifest()
                change = Change(self, before)
                if not self._swept:
                    listed = None if before.data is None else {r.directory for r in change.records}
                    self.reader.storage.sweep(listed)
                    self._swept = True
                yield change
        except CkptkitError:
            raise
        except OSError as e:
            raise StoreWriteError(e.errno, self._write_error(e, action, before)) from e

    def _write_error(self, e: OSError, action: str, before: ManifestVersion | _Unread) -> str:
        location = self.reader.location
        reason = e.strerror or str(e)
        if e.filename is not None:
            reason += f" ({e.filename})"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = (
                "free disk space outside the store, then try again (a full disk also blocks "
                "pruning, which writes a new manifest first); keep fewer checkpoints to stay "
                "under the space there is"
            )
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = (
                "the store is read-only or not writable by this user: loading works, but "
                "changes need a writable root"
            )
        else:
            advice = "check the disk, then try again"
        try:
            after = self.reader.read_manifest()
        except (OSError, CkptkitError):
            return (
                f"{location}: {action} failed: {reason}, and the manifest cannot be read "
                f"back to tell whether it was committed; {advice}"
            )
        if isinstance(before, ManifestVersion) and after.data != before.data:
            return (
                f"{location}: {action} was committed, but a later step failed: {reason}; "
                f"every listed checkpoint is whole; {advice}"
            )
        return (
            f"{location}: {action} failed: {reason}; nothing was committed and the previous "
            f"checkpoints are intact; {advice}"
        )

    def locked(self) -> AbstractContextManager[None]:
        """Hold the store's lock (``LockTimeoutError`` after ``lock_timeout`` seconds)."""
        return self._locked()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        storage = self.reader.storage
        with ExitStack() as stack:
            try:
                stack.enter_context(storage.lock(self.lock_timeout))
            except TimeoutError:
                raise LockTimeoutError(
                    f"{self.reader.location}: another process held "
                    f"{storage.lock_description()} for more than "
                    f"lock_timeout={self.lock_timeout} s; raise lock_timeout, or find what else "
                    "is writing to this store"
                ) from None
            yield
