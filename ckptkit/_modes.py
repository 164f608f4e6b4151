"""Which direction of a metric is better: explicit ``mode`` or inference from its name."""

from __future__ import annotations

from typing import Literal

Mode = Literal["min", "max"]

#: Metric names (after an optional ``val_`` prefix) whose mode ``"auto"`` infers.
AUTO_MODES: dict[str, Mode] = {
    "loss": "min",
    "error": "min",
    "mse": "min",
    "mae": "min",
    "perplexity": "min",
    "acc": "max",
    "accuracy": "max",
    "auc": "max",
    "f1": "max",
    "precision": "max",
    "recall": "max",
    "iou": "max",
    "dice": "max",
    "map": "max",
}

_MODES = ("min", "max", "auto")


def resolve_mode(mode: str, monitor: str | None, *, argument: str = "mode") -> Mode:
    """Return ``"min"`` or ``"max"`` for ``mode``, inferring it from ``monitor`` if ``"auto"``.

    ``"auto"`` looks the monitor's name up in :data:`AUTO_MODES`, with or without a ``val_``
    prefix. A name outside the table is an error, never a guess.

    Raises:
        ValueError: ``mode`` is not one of ``"min"``, ``"max"``, ``"auto"``, or it is
            ``"auto"`` and the monitor's name is not in the table.
    """
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    if mode != "auto":
        raise ValueError(f"{argument} must be one of {_MODES}, got {mode!r}")
    if monitor is None:
        raise ValueError(f'{argument}="auto" needs a monitor name; pass mode="min" or mode="max"')
    name = monitor[4:] if monitor.startswith("val_") else monitor
    try:
        return AUTO_MODES[name]
    except KeyError:
        known = ", ".join(sorted(AUTO_MODES))
        raise ValueError(
            f'{argument}="auto" cannot tell whether {monitor!r} should go down or up '
            f'(known names, with or without "val_": {known}); pass mode="min" or mode="max"'
        ) from None
