"""The store's lock, the translation of disk errors, and the sweep of crash leftovers.

Every change to a store (save, pin, unpin, prune) runs inside :meth:`StoreLocking._writing`:
under the store's file lock, with any ``OSError`` turned into a ``StoreWriteError`` whose message
says whether the change reached the manifest. The first change a store object makes sweeps what
crashed writers left: under the lock no live writer is between its first write and its commit,
so its temporaries are never touched. Opening and reading a store change nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import filelock

from ckptkit._commit import sweep
from ckptkit._errors import CkptkitError, LockTimeoutError, StoreWriteError
from ckptkit._record import CheckpointRecord
from ckptkit._store_read import StoreReader

LOCK_NAME = ".ckptkit.lock"


class _Unread:
    """The manifest was not read yet when a change failed (so nothing was committed)."""


_UNREAD = _Unread()


class StoreLocking(StoreReader):
    """Locking, disk-error messages and the sweep; ``CheckpointStore`` adds the changes."""

    lock_timeout: float
    _lock: filelock.BaseFileLock
    _swept: bool = False

    # -- locking and crash recovery ---------------------------------------------------------

    @contextmanager
    def _writing(self, action: str) -> Iterator[list[CheckpointRecord]]:
        """Hold the lock for a change to the store; turn disk errors into ``StoreWriteError``.

        Yields the committed records, read under the lock. The message of a failure says
        whether the change reached the manifest (the commit point), found by comparing the
        manifest before and after it.
        """
        before: bytes | _Unread | None = _UNREAD
        try:
            with self._locked():
                before = self._read_manifest()
                records = self._parse_manifest(before)
                if not self._swept:
                    sweep(self.root, None if before is None else {r.directory for r in records})
                    self._swept = True
                yield records
        except CkptkitError:
            raise
        except OSError as e:
            raise StoreWriteError(e.errno, self._write_error(e, action, before)) from e

    def _write_error(self, e: OSError, action: str, before: bytes | _Unread | None) -> str:
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
            committed = before is not _UNREAD and self._read_manifest() != before
        except (OSError, CkptkitError):
            return (
                f"{self.root}: {action} failed: {reason}, and the manifest cannot be read "
                f"back to tell whether it was committed; {advice}"
            )
        if committed:
            return (
                f"{self.root}: {action} was committed, but a later step failed: {reason}; "
                f"every listed checkpoint is whole; {advice}"
            )
        return (
            f"{self.root}: {action} failed: {reason}; nothing was committed and the previous "
            f"checkpoints are intact; {advice}"
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise LockTimeoutError(
                f"{self.root}: another process held the store's lock ({self._lock.lock_file}) "
                f"for more than lock_timeout={self.lock_timeout} s; raise lock_timeout, or find "
                "what else is writing to this store"
            ) from None
        try:
            yield
        finally:
            self._lock.release()
