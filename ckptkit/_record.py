"""The value describing one committed checkpoint, as the manifest lists it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a checkpoint: its name inside the checkpoint directory, size and checksum.

    ``checksum`` is ``"<algorithm>:<hex digest>"`` so the algorithm can change between format
    versions without ambiguity.
    """

    name: str
    size: int
    checksum: str


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """One committed checkpoint.

    Attributes:
        step: the training step (or epoch) the checkpoint was saved at.
        metrics: metric name to value (float; may be NaN or infinite).
        metadata: the JSON metadata given to ``save``.
        created: creation time, seconds since the epoch (UTC).
        directory: the checkpoint's directory name, relative to the store's root.
        files: the checkpoint's files with their sizes and checksums.
        pinned: pinned checkpoints are never deleted by retention.
    """

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: float
    directory: str
    files: tuple[FileEntry, ...] = ()
    pinned: bool = False

    def __post_init__(self) -> None:
        # Read-only views, so a record handed out cannot be edited behind the manifest's back.
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def sharded(self) -> bool:
        """True for a checkpoint written by several ranks (its tensors are in shard files)."""
        return any(f.name == "shards.json" for f in self.files)

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's files."""
        return sum(f.size for f in self.files)

    def metric(self, name: str) -> float | None:
        """The metric's value as a float, or None where it is missing or not finite."""
        value = self.metrics.get(name)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """One tensor of a checkpoint, as its header describes it.

    Attributes:
        name: the tensor's name (the state's key path joined with ``.``).
        dtype: the safetensors dtype code, e.g. ``"F32"`` or ``"BF16"``.
        shape: the tensor's shape.
        nbytes: its size in bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
