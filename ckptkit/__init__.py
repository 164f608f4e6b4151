"""ckptkit: crash-safe checkpoints, exact resume and early stopping for any training loop."""

from __future__ import annotations

from ckptkit._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptkitError,
    ConfigMismatchError,
    CorruptCheckpointError,
    LockTimeoutError,
    StoreFormatError,
    UnsupportedStateError,
)
from ckptkit._modes import AUTO_MODES
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._version import __version__

__all__ = [
    "AUTO_MODES",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CkptkitError",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "FileEntry",
    "LockTimeoutError",
    "StoreFormatError",
    "UnsupportedStateError",
    "__version__",
]
