"""The error tree: every error ckptkit raises derives from :class:`CkptkitError`.

Each concrete error also subclasses the builtin that code outside ckptkit would already catch
for the same situation (a missing checkpoint is a ``FileNotFoundError``, a corrupt one a
``ValueError``), so ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations


class CkptkitError(Exception):
    """Base class of every error raised by ckptkit."""


class CheckpointNotFoundError(CkptkitError, FileNotFoundError):
    """The requested checkpoint (or store) does not exist."""


class CheckpointExistsError(CkptkitError, FileExistsError):
    """A checkpoint for this step is already committed and ``overwrite`` was not given."""


class CorruptCheckpointError(CkptkitError, ValueError):
    """A file of a committed checkpoint, or the manifest, does not match what was written."""


class UnsupportedStateError(CkptkitError, TypeError):
    """The state tree holds a value ckptkit cannot save exactly."""


class MissingMetricError(CkptkitError, KeyError):
    """A metric the policy or store needs is not among the metrics passed."""

    def __str__(self) -> str:
        # KeyError's str() shows the repr of its argument; show the message as written.
        return str(self.args[0]) if self.args else ""


class TensorNotFoundError(CkptkitError, KeyError):
    """A tensor asked for by name is not in the checkpoint."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigMismatchError(CkptkitError, ValueError):
    """Saved state was made under a configuration that differs from the current one."""


class LockTimeoutError(CkptkitError, TimeoutError):
    """The store's lock could not be taken within the configured timeout."""


class StoreWriteError(CkptkitError, OSError):
    """The disk refused a write to the store (full, read-only, failing); ``errno`` says why.

    Raised by ``save``, ``pin``, ``unpin`` and ``prune``. The message says whether the change was
    committed; a failure before the commit point leaves every committed checkpoint as it was.
    """


class ReadOnlyStoreError(CkptkitError, PermissionError):
    """A change (save, pin, unpin, prune) was asked of a store opened with ``read_only=True``."""


class StoreFormatError(CorruptCheckpointError):
    """The store's manifest is unreadable, or was written by a newer format version."""
