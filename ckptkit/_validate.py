"""Argument checks shared by the store and the checkpointer, with messages that say the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


def check_step(step: object) -> int:
    """Return ``step`` as an int, or raise if it is not a non-negative integer."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be a non-negative int, got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"step must be a non-negative int, got {step}")
    return int(step)


def check_metrics(metrics: Mapping[str, Any] | None, *, step: int) -> dict[str, float]:
    """Return the metrics as ``{name: float}``; NaN and infinities are kept as they are."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics of step {step} must be a mapping, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics of step {step}: metric names must be str, got {name!r}")
        out[name] = to_float(value, where=f"metric {name!r} of step {step}")
    return out


def to_float(value: object, *, where: str) -> float:
    """Convert a Python or numpy number, or a one-element array, to float; reject the rest."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} is a bool ({value!r}); pass a number")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value.reshape(()))
    item = getattr(value, "item", None)  # framework scalars (0-d tensors) expose item()
    if callable(item):
        result = item()
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            return float(result)
    raise TypeError(f"{where} must be a number, got {value!r} ({type(value).__name__})")


def is_finite(value: float) -> bool:
    return math.isfinite(value)
