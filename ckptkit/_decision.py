"""What a stopping policy works with: checked options, comparisons, saved state, Decision.

Everything here is pure; the counters live in :class:`ckptkit.StoppingPolicy`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from ckptkit._modes import Mode, resolve_mode
from ckptkit._validate import to_float

MinDeltaMode = Literal["abs", "rel"]
STATE_VERSION = 1
_STATE_FIELDS = (
    "version",
    "config",
    "best",
    "best_step",
    "wait",
    "observations",
    "stopped",
    "stop_step",
    "stop_reason",
)
_MIN_DELTA_MODES = ("abs", "rel")


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What a :class:`~ckptkit.StoppingPolicy` concluded from one observed value.

    Attributes:
        step: the step the value was observed at.
        value: the observed value as a float (may be NaN or infinite).
        improved: the value became the new best.
        counted: the observation went through the patience rule (False during warmup, for a
            value stopped by ``check_finite``, and after the policy has stopped).
        should_stop: training should stop; stays True once the policy has stopped.
        best: the best value so far; None until a finite value has counted.
        best_step: the step of ``best``; None with it.
        wait: counted observations since the patience counter was last reset.
        reason: why the policy stopped, naming the monitor, value and best; None until it stops.
    """

    step: int
    value: float
    improved: bool
    counted: bool
    should_stop: bool
    best: float | None
    best_step: int | None
    wait: int
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """A stopping policy's options, checked; ``mode`` is already resolved to min or max."""

    monitor: str
    mode: Mode
    patience: int
    min_delta: float
    min_delta_mode: MinDeltaMode
    warmup: int
    baseline: float | None
    check_finite: bool
    stopping_threshold: float | None
    divergence_threshold: float | None

    @classmethod
    def build(cls, *, mode: str, **options: Any) -> PolicyConfig:
        """Check every option and resolve ``mode``; raises ValueError naming the bad option."""
        monitor = options["monitor"]
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty str naming the metric, got {monitor!r}")
        min_delta_mode = options["min_delta_mode"]
        if min_delta_mode not in _MIN_DELTA_MODES:
            raise ValueError(
                f"min_delta_mode must be one of {_MIN_DELTA_MODES}, got {min_delta_mode!r}"
            )
        check_finite = options["check_finite"]
        if not isinstance(check_finite, (bool, np.bool_)):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        min_delta = _finite("min_delta", options["min_delta"])
        if min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        return cls(
            monitor=monitor,
            mode=resolve_mode(mode, monitor),
            patience=_count("patience", options["patience"]),
            min_delta=min_delta,
            min_delta_mode=min_delta_mode,
            warmup=_count("warmup", options["warmup"]),
            baseline=_optional_finite("baseline", options["baseline"]),
            check_finite=bool(check_finite),
            stopping_threshold=_optional_finite(
                "stopping_threshold", options["stopping_threshold"]
            ),
            divergence_threshold=_optional_finite(
                "divergence_threshold", options["divergence_threshold"]
            ),
        )

    @classmethod
    def from_json(cls, data: object) -> PolicyConfig:
        """Read the ``config`` field of a saved state; raises ValueError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"field 'config' must be a dict, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(str(k) for k in data if k not in names)
        if missing or unknown:
            raise ValueError(f"field 'config' is missing {missing} or has unknown keys {unknown}")
        if data["mode"] not in ("min", "max"):
            raise ValueError(f"field 'config.mode' must be 'min' or 'max', got {data['mode']!r}")
        try:
            return cls.build(**{n: data[n] for n in names})
        except ValueError as e:
            raise ValueError(f"field 'config': {e}") from None

    def to_json(self) -> dict[str, Any]:
        """The options as plain JSON values (every float is finite, so no NaN tokens)."""
        return asdict(self)

    def beats(self, value: float, reference: float | None) -> bool:
        """Whether ``value`` improves on ``reference`` by more than min_delta.

        Non-finite values never improve. ``None`` (no best yet) is beaten by any finite value.
        The arithmetic mirrors Keras (``value - min_delta`` against the reference, min_delta
        negated in min mode), so the two agree wherever float32 rounding does not interfere.
        """
        if not math.isfinite(value):
            return False
        if reference is None:
            return True
        delta = self.min_delta if self.min_delta_mode == "abs" else self.min_delta * abs(reference)
        if self.mode == "min":
            return value + delta < reference
        return value - delta > reference

    def good_enough(self, value: float) -> bool:
        """Whether a finite ``value`` is at least as good as ``stopping_threshold``."""
        threshold = self.stopping_threshold
        if threshold is None or not math.isfinite(value):
            return False
        return value <= threshold if self.mode == "min" else value >= threshold

    def hopeless(self, value: float) -> bool:
        """Whether ``value`` is worse than ``divergence_threshold`` (NaN compares as not worse)."""
        threshold = self.divergence_threshold
        if threshold is None:
            return False
        return value > threshold if self.mode == "min" else value < threshold


def as_float(value: object, *, monitor: str, step: int) -> float:
    """``value`` as a float; see :func:`ckptkit._validate.to_float` for what is accepted."""
    return to_float(value, where=f"{monitor} at step {step}")


def read_state(state: object) -> dict[str, Any]:
    """Check a saved state completely before anything is assigned; ValueError names the field."""
    if not isinstance(state, Mapping):
        raise ValueError(f"stopping state must be a dict, got {type(state).__name__}")
    missing = [n for n in _STATE_FIELDS if n not in state]
    unknown = sorted(str(k) for k in state if k not in _STATE_FIELDS)
    if missing or unknown:
        raise ValueError(f"stopping state is missing fields {missing} or has unknown {unknown}")
    version = state["version"]
    if version != STATE_VERSION or isinstance(version, bool):
        raise ValueError(
            f"stopping state field 'version' is {version!r}; this ckptkit reads version "
            f"{STATE_VERSION} (a newer ckptkit wrote it?)"
        )
    config = PolicyConfig.from_json(state["config"])
    best, best_step = state["best"], state["best_step"]
    if best is not None and (
        isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best)
    ):
        raise ValueError(f"stopping state field 'best' must be None or a finite number: {best!r}")
    _check_count("best_step", best_step, optional=True)
    if (best is None) != (best_step is None):
        raise ValueError("stopping state fields 'best' and 'best_step' must both be set or None")
    _check_count("wait", state["wait"])
    _check_count("observations", state["observations"])
    stopped, stop_step, reason = state["stopped"], state["stop_step"], state["stop_reason"]
    if not isinstance(stopped, bool):
        raise ValueError(f"stopping state field 'stopped' must be true or false, got {stopped!r}")
    _check_count("stop_step", stop_step, optional=True)
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"stopping state field 'stop_reason' must be a str or None: {reason!r}")
    if stopped != (stop_step is not None) or stopped != (reason is not None):
        raise ValueError(
            "stopping state fields 'stop_step' and 'stop_reason' must be set exactly when "
            f"'stopped' is true (stopped={stopped!r})"
        )
    return {
        "config": config,
        "best": None if best is None else float(best),
        "best_step": best_step,
        "wait": state["wait"],
        "observations": state["observations"],
        "stop_step": stop_step,
        "stop_reason": reason,
    }


def _check_count(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "an int >= 0 or None" if optional else "an int >= 0"
        raise ValueError(f"stopping state field {name!r} must be {allowed}, got {value!r}")


def _count(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {result!r}")
    return result


def _optional_finite(name: str, value: object) -> float | None:
    if value is None:
        return None
    try:
        return _finite(name, value)
    except ValueError:
        raise ValueError(f"{name} must be None or a finite number, got {value!r}") from None
