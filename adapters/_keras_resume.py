"""Where a ``model.fit`` resumes: the metadata each checkpoint keeps about its place in fit.

Each checkpoint ``CheckpointCallback`` saves records, under the metadata key ``"keras_fit"``,
its place in ``fit`` and what a restarted process needs before it can load it:

- ``epoch``, ``batch`` (None at an epoch's end), ``epoch_end``: where in fit it was taken;
- ``batches``: batches trained since the run began, and ``since_save``: batches since the
  last save ``save_freq=N`` asked for (both count on across restarts);
- ``build``: the input shapes the model was built with, to build an unbuilt (subclassed)
  model the same way before loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptkit._record import CheckpointRecord

#: Metadata key of each checkpoint's place in ``fit`` (see the module docstring).
FIT_METADATA_KEY = "keras_fit"


def fit_metadata(record: CheckpointRecord) -> Mapping[str, Any]:
    """The ``"keras_fit"`` metadata of a checkpoint; empty when it has none."""
    found = record.metadata.get(FIT_METADATA_KEY)
    return found if isinstance(found, Mapping) else {}


def next_epoch(record: CheckpointRecord | None) -> int:
    """The epoch ``fit`` continues at after ``record``: the next one, or its own if mid-epoch."""
    if record is None:
        return 0
    where = fit_metadata(record)
    if isinstance(where.get("epoch"), int):
        return int(where["epoch"]) + (1 if where.get("epoch_end", True) else 0)
    return record.step + 1


def counters(record: CheckpointRecord, fallback_batches: int) -> tuple[int, int]:
    """Batches trained, and batches since the last ``save_freq=N`` save, at ``record``.

    ``fallback_batches`` (the optimizer's iteration count) stands in for checkpoints saved
    before the callback recorded batches.
    """
    where = fit_metadata(record)
    batches = where.get("batches")
    since = where.get("since_save")
    return (
        batches if isinstance(batches, int) else fallback_batches,
        since if isinstance(since, int) else 0,
    )
