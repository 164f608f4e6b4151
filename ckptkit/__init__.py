"""ckptkit: crash-safe checkpoints, exact resume and early stopping for any training loop.

The core imports no deep-learning framework; adapters live in ``ckptkit.adapters``.
"""

from __future__ import annotations

from ckptkit._async import PendingSave
from ckptkit._checkpointer import Checkpointer, Stateful
from ckptkit._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptkitError,
    ConfigMismatchError,
    CorruptCheckpointError,
    LockTimeoutError,
    MissingMetricError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreWriteError,
    TensorNotFoundError,
    UnsupportedStateError,
)
from ckptkit._modes import AUTO_MODES
from ckptkit._policy import ConfigChangedWarning, Decision, StoppingPolicy
from ckptkit._preemption import PreemptionGuard
from ckptkit._record import CheckpointRecord, FileEntry, TensorInfo
from ckptkit._retention import RetentionPlan, RetentionPolicy
from ckptkit._store import Checkpoint, CheckpointStore, FallbackWarning
from ckptkit._version import __version__

__all__ = [
    "AUTO_MODES",
    "Checkpoint",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CheckpointStore",
    "Checkpointer",
    "CkptkitError",
    "ConfigChangedWarning",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "Decision",
    "FallbackWarning",
    "FileEntry",
    "LockTimeoutError",
    "MissingMetricError",
    "PendingSave",
    "PreemptionGuard",
    "ReadOnlyStoreError",
    "RetentionPlan",
    "RetentionPolicy",
    "Stateful",
    "StoppingPolicy",
    "StoreFormatError",
    "StoreWriteError",
    "TensorInfo",
    "TensorNotFoundError",
    "UnsupportedStateError",
    "__version__",
]
