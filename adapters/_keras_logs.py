"""What ``fit``'s logs say: the numeric metrics, and the messages for a monitor they lack."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


def numeric(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The logs that are real numbers (Python, numpy or 0-d tensors), as floats."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        if isinstance(value, bool) or not isinstance(name, str):
            continue
        if isinstance(value, numbers.Real):
            out[name] = float(value)
            continue
        array = np.asarray(value) if getattr(value, "ndim", None) == 0 else None
        if array is not None and array.dtype.kind in "iuf":
            out[name] = float(array)
    return out


def validation_skipped(monitor: str, metrics: Mapping[str, float]) -> bool:
    """Whether a missing ``val_`` monitor is missing because fit ran no validation this epoch.

    Fit adds every validation metric or none, so logs without any ``val_`` key are an epoch
    ``validation_freq`` skipped (or a fit without validation data: only the whole fit tells).
    """
    return monitor.startswith("val_") and not any(n.startswith("val_") for n in metrics)


def missing_message(monitor: str, epoch: int, logs: Mapping[str, Any]) -> str:
    """The error for a monitor missing from logs that have others of its kind."""
    return (
        f"epoch {epoch}: the policy monitors {monitor!r}, which is not in the epoch's logs "
        f"{sorted(logs)}; monitor one of those (Keras names metrics after compile(metrics=...))"
    )


def never_validated_message(monitor: str, epochs: list[int], logs: Mapping[str, Any]) -> str:
    """The error for a ``val_`` monitor in a fit that validated in none of its ``epochs``."""
    span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]} to {epochs[-1]}"
    return (
        f"{span}: the policy monitors {monitor!r}, but fit computed no validation metrics "
        f"(logs have only {sorted(logs)}), so the policy never observed a value; pass "
        "validation_data= (or validation_split=) to model.fit, or monitor a training metric"
    )
