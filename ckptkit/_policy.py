"""Early stopping as a pure counter: feed it one value per evaluation, it says when to stop.

The rule is Keras's ``EarlyStopping`` (same patience, min_delta, baseline and warmup counting),
plus Lightning's finite check and thresholds. ``docs/stopping-rule.md`` states it in full.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from ckptkit._decision import (
    STATE_VERSION,
    Decision,
    PolicyConfig,
    as_float,
    read_state,
)
from ckptkit._errors import ConfigMismatchError
from ckptkit._modes import Mode
from ckptkit._validate import check_step

__all__ = ["ConfigChangedWarning", "Decision", "StoppingPolicy"]


class ConfigChangedWarning(UserWarning):
    """A restored stopping state was saved with options that differ from the current ones."""


class StoppingPolicy:
    """Decide when training should stop because a monitored metric stopped improving.

    Why: the stopping decision should be a small, testable value that survives a restart, not
    state hidden in a framework callback. Each :meth:`observe` returns a frozen
    :class:`Decision`; :meth:`state_dict` saves the counters as plain JSON.

    Every counted observation adds one to ``wait``; an improvement (better than the best by
    more than ``min_delta``) becomes the best and resets ``wait`` to 0 (with a ``baseline``,
    only when it also beats the baseline). A non-improving observation stops the policy once
    ``wait >= patience``. This is exactly Keras's ``EarlyStopping`` with ``warmup`` as
    ``start_from_epoch``; NaN and infinite values never improve.

    Args:
        monitor: name of the metric, used in messages and for ``mode="auto"``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` to infer it from ``monitor``.
        patience: stop at this many non-improving observations in a row (0 acts as 1, as in
            Keras).
        min_delta: an improvement must beat the best by more than this (>= 0).
        min_delta_mode: ``"abs"``: by ``min_delta``; ``"rel"``: by ``min_delta * abs(best)``.
        warmup: observations with ``step < warmup`` are not counted (Keras ``start_from_epoch``).
        baseline: ``wait`` resets only on values that also beat this.
        check_finite: stop at the first NaN or infinite value, even during warmup.
        stopping_threshold: stop once a value is at least as good as this.
        divergence_threshold: stop once a value is worse than this.

    Raises:
        ValueError: an option is invalid; the message names it and the allowed values.

    Example:
        >>> policy = StoppingPolicy(monitor="val_loss", patience=2)
        >>> [policy.observe(v).should_stop for v in (0.5, 0.4, 0.45, 0.42)]
        [False, False, False, True]
        >>> policy.best, policy.best_step
        (0.4, 1)
    """

    def __init__(
        self,
        *,
        monitor: str,
        mode: Literal["min", "max", "auto"] = "auto",
        patience: int = 0,
        min_delta: float = 0.0,
        min_delta_mode: Literal["abs", "rel"] = "abs",
        warmup: int = 0,
        baseline: float | None = None,
        check_finite: bool = False,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
    ) -> None:
        self._config = PolicyConfig.build(
            monitor=monitor,
            mode=mode,
            patience=patience,
            min_delta=min_delta,
            min_delta_mode=min_delta_mode,
            warmup=warmup,
            baseline=baseline,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
        )
        self._best: float | None = None
        self._best_step: int | None = None
        self._wait = 0
        self._observations = 0
        self._stop_step: int | None = None
        self._stop_reason: str | None = None

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._config.to_json().items())
        return f"StoppingPolicy({options})"

    @property
    def monitor(self) -> str:
        """The monitored metric's name."""
        return self._config.monitor

    @property
    def mode(self) -> Mode:
        """``"min"`` or ``"max"`` (``"auto"`` is resolved when the policy is made)."""
        return self._config.mode

    @property
    def best(self) -> float | None:
        """The best counted value; None until a finite value has counted."""
        return self._best

    @property
    def best_step(self) -> int | None:
        """The step of :attr:`best`; None with it."""
        return self._best_step

    @property
    def wait(self) -> int:
        """Counted observations since the patience counter was last reset."""
        return self._wait

    @property
    def should_stop(self) -> bool:
        """True once the policy has stopped; it then stays stopped."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the policy stopped; None while it has not."""
        return self._stop_reason

    @property
    def stop_step(self) -> int | None:
        """The step at which the policy stopped; None while it has not."""
        return self._stop_step

    def observe(self, value: object, step: int | None = None) -> Decision:
        """Count one value of the metric and say whether training should stop.

        Why: one call per evaluation keeps the rule independent of any training loop.

        Args:
            value: the metric's value (int, float, numpy scalar or 0-d array).
            step: the step (or epoch) it belongs to; None means the number of values observed
                so far, so plain ``observe(v)`` calls number them 0, 1, 2, ...

        Returns:
            The :class:`Decision` for this value. Once stopped, every later call returns
            ``should_stop=True`` and changes nothing but the observation count.

        Raises:
            TypeError: ``value`` is not a real number, or ``step`` is not an int.
            ValueError: ``step`` is negative.

        Example:
            >>> policy = StoppingPolicy(monitor="val_acc", mode="max", patience=0)
            >>> policy.observe(0.9, step=10).improved
            True
            >>> policy.observe(0.8, step=20).reason
            'val_acc did not improve for 1 observation; best 0.9 at step 10'
        """
        config = self._config
        step = self._observations if step is None else check_step(step)
        current = as_float(value, monitor=config.monitor, step=step)
        self._observations += 1
        if self._stop_reason is not None:
            return self._decision(step, current, improved=False, counted=False)
        if config.check_finite and not math.isfinite(current):
            reason = f"{config.monitor} is {_num(current)} at step {step} (check_finite=True)"
            return self._stop(step, current, reason, improved=False, counted=False)
        if step < config.warmup:
            return self._decision(step, current, improved=False, counted=False)

        # Keras adds to wait before comparing, so an improvement that misses the baseline
        # still counts toward patience.
        self._wait += 1
        improved = config.beats(current, self._best)
        if improved:
            self._best, self._best_step = current, step
            if config.baseline is None or config.beats(current, config.baseline):
                self._wait = 0
        if config.good_enough(current):
            reason = (
                f"{config.monitor} reached the stopping_threshold "
                f"{_num(config.stopping_threshold)} with {_num(current)} at step {step}"
            )
        elif config.hopeless(current):
            reason = (
                f"{config.monitor} is {_num(current)} at step {step}, worse than the "
                f"divergence_threshold {_num(config.divergence_threshold)}"
            )
        # Keras never stops on epoch 0; with a best starting empty that matters only for a
        # first value that is NaN or infinite.
        elif not improved and self._wait >= config.patience and step > 0:
            reason = self._patience_reason()
        else:
            return self._decision(step, current, improved=improved, counted=True)
        return self._stop(step, current, reason, improved=improved, counted=True)

    def state_dict(self) -> dict[str, Any]:
        """The counters and options as plain JSON (``json.dumps(..., allow_nan=False)`` works).

        Why: a resumed run must stop exactly where an uninterrupted one would have.

        Returns:
            A new dict with ``"version": 1``, the options under ``"config"`` and the counters.
            ``best`` is None before any finite value; no field is ever NaN or infinite.

        Example:
            >>> policy = StoppingPolicy(monitor="val_loss", patience=2)
            >>> _ = policy.observe(0.5)
            >>> state = policy.state_dict()
            >>> state["best"], state["wait"], state["config"]["mode"]
            (0.5, 0, 'min')
        """
        return {
            "version": STATE_VERSION,
            "config": self._config.to_json(),
            "best": self._best,
            "best_step": self._best_step,
            "wait": self._wait,
            "observations": self._observations,
            "stopped": self._stop_reason is not None,
            "stop_step": self._stop_step,
            "stop_reason": self._stop_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict`, possibly from a differently set policy.

        Why: resuming must continue the count, but the saved best is only meaningful for the
        same metric in the same direction.

        A different ``monitor`` or ``mode`` is refused. Any other differing option: this
        policy's options stay in force, the saved counters are kept, and a
        :class:`ConfigChangedWarning` lists each change as ``saved -> current``.

        Args:
            state: a dict from :meth:`state_dict`, possibly through ``json.dumps``/``loads``.

        Raises:
            ValueError: the state is malformed; the message names the field. Nothing changes.
            ConfigMismatchError: saved for another monitor or mode. Nothing changes.

        Example:
            >>> old = StoppingPolicy(monitor="val_loss", patience=2)
            >>> _ = old.observe(0.5)
            >>> new = StoppingPolicy(monitor="val_loss", patience=2)
            >>> new.load_state_dict(old.state_dict())
            >>> new.best
            0.5
        """
        counters = read_state(state)
        saved: PolicyConfig = counters.pop("config")
        current = self._config
        if (saved.monitor, saved.mode) != (current.monitor, current.mode):
            raise ConfigMismatchError(
                f"stopping state was saved for monitor {saved.monitor!r} in mode {saved.mode!r}, "
                f"but this policy has monitor {current.monitor!r} in mode {current.mode!r}; the "
                "saved best is not comparable. Restore it into a policy with the saved monitor "
                "and mode, or start from a fresh policy"
            )
        before, after = saved.to_json(), current.to_json()
        changes = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]]
        for name, value in counters.items():
            setattr(self, f"_{name}", value)
        if changes:
            warnings.warn(
                ConfigChangedWarning(
                    f"stopping state for {current.monitor!r} was saved with other options; "
                    f"keeping the saved counters under the current options ({', '.join(changes)})"
                ),
                stacklevel=2,
            )

    def _decision(self, step: int, value: float, *, improved: bool, counted: bool) -> Decision:
        return Decision(
            step=step,
            value=value,
            improved=improved,
            counted=counted,
            should_stop=self._stop_reason is not None,
            best=self._best,
            best_step=self._best_step,
            wait=self._wait,
            reason=self._stop_reason,
        )

    def _stop(
        self, step: int, value: float, reason: str, *, improved: bool, counted: bool
    ) -> Decision:
        self._stop_step = step
        self._stop_reason = f"{reason}; {self._best_text()}"
        return self._decision(step, value, improved=improved, counted=counted)

    def _best_text(self) -> str:
        if self._best is None:
            return "no finite value counted yet"
        return f"best {_num(self._best)} at step {self._best_step}"

    def _patience_reason(self) -> str:
        config = self._config
        count = f"{self._wait} observation{'' if self._wait == 1 else 's'}"
        baseline = config.baseline
        missed = baseline is not None and (
            self._best is None or not config.beats(self._best, baseline)
        )
        by = ""
        if config.min_delta > 0:
            scale = (
                "" if config.min_delta_mode == "abs" else " x |baseline|" if missed else " x |best|"
            )
            by = f" by more than {_num(config.min_delta)}{scale}"
        if missed:
            return f"{config.monitor} did not beat the baseline {_num(baseline)}{by} in {count}"
        return f"{config.monitor} did not improve{by} for {count}"


def _num(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"
