"""Argument checks shared by the store and the checkpointer, with messages that say the fix."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


def check_step(step: object) -> int:
    """Return ``step`` as an int, or raise if it is not a non-negative integer."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int >= 0, got {type(step).__name__}: {step!r}")
    if step < 0:
        raise ValueError(f"step must be an int >= 0, got {step}")
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
    """Convert a real number to float: Python and numpy numbers, 0-d arrays, 0-d framework tensors.

    Bools, strings, complex numbers and arrays with dimensions are refused rather than guessed at.
    """
    try:
        if isinstance(value, (bool, np.bool_)):
            pass  # a bool is a mistake here, not the number 0 or 1
        elif isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, (np.ndarray, np.generic)) and value.ndim == 0:
            # "V" covers ml_dtypes' bfloat16 and float8.
            if value.dtype.kind in "iufV":
                return float(value)
        elif getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
            # A 0-d framework tensor (torch, TensorFlow): item() gives the Python number.
            item = value.item()  # type: ignore[attr-defined]
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                return float(item)
    except OverflowError:
        raise ValueError(f"{where} is {value}, too large for a float; pass a float") from None
    except (TypeError, ValueError):
        pass
    shape = f" of shape {getattr(value, 'shape', None)}" if hasattr(value, "shape") else ""
    raise TypeError(
        f"{where} must be a real number (int, float, numpy scalar or 0-d array), got "
        f"{type(value).__name__}{shape}: {value!r:.80}; pass float(x) or x.item()"
    )
