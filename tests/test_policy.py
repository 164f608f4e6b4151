"""Tests of StoppingPolicy: the Keras counting rule, ckptkit's additions, errors and saved state."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import astuple
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit import ConfigChangedWarning, ConfigMismatchError, Decision, StoppingPolicy

# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def keras_rule(
    values: list[float],
    *,
    mode: str,
    patience: int,
    min_delta: float = 0.0,
    baseline: float | None = None,
    start_from_epoch: int = 0,
) -> tuple[int | None, int | None]:
    """Keras 3 EarlyStopping.on_epoch_end, restated: (stopped epoch or None, best epoch)."""
    signed_delta = -abs(min_delta) if mode == "min" else abs(min_delta)
    compare = np.less if mode == "min" else np.greater

    def improves(current: float, reference: float | None) -> bool:
        if reference is None:
            return True
        # Keras subtracts in float64 and then compares float32 tensors.
        return bool(compare(np.float32(current - signed_delta), np.float32(reference)))

    best: float | None = None
    best_epoch: int | None = None
    wait = 0
    for epoch, current in enumerate(values):
        if epoch < start_from_epoch:
            continue
        wait += 1
        if improves(current, best):
            best, best_epoch = current, epoch
            if baseline is None or improves(current, baseline):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


def seed_loop(values: list[float], k: int) -> tuple[int | None, int]:
    """The hand-written loop ``if epoch - best_epoch > k: break``: (break epoch or None, best)."""
    best, best_epoch = math.inf, 0
    for epoch, value in enumerate(values):
        if value < best:
            best, best_epoch = value, epoch
        if epoch - best_epoch > k:
            return epoch, best_epoch
    return None, best_epoch


def run(values: list[float], **options: Any) -> tuple[int | None, int | None]:
    """Feed values until the policy stops: (stop step or None, best step)."""
    policy = StoppingPolicy(**{"monitor": "val_loss", **options})
    for value in values:
        if policy.observe(value).should_stop:
            break
    return policy.stop_step, policy.best_step


def decisions(policy: StoppingPolicy, values: list[float]) -> list[Decision]:
    """Every decision the policy makes on values, in order."""
    return [policy.observe(v) for v in values]


def comparable(decision: Decision) -> tuple[object, ...]:
    """The decision's fields with NaN spelled out, so equal decisions compare equal."""
    return tuple("nan" if v != v else v for v in astuple(decision))


grid = st.integers(-16, 16).map(lambda i: i / 8)  # exact in float32, so no rounding ties
grid_values = st.lists(grid, min_size=1, max_size=30)
any_values = st.lists(
    st.one_of(grid, st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=30
)

# ---------------------------------------------------------------------------------------------
# Worked sequences, checked by hand against the Keras rule
# ---------------------------------------------------------------------------------------------

TABLE = [
    # (name, options, values, stop step, best step)
    ("never-stops-while-improving", {"patience": 0}, [5, 4, 3, 2, 1], None, 4),
    ("patience-0-stops-at-first-miss", {"patience": 0}, [3, 2, 2], 2, 1),
    ("patience-1-same-as-0", {"patience": 1}, [3, 2, 2], 2, 1),
    ("equal-value-is-no-improvement", {"patience": 2}, [1, 1, 1], 2, 0),
    ("wait-resets-on-improvement", {"patience": 2}, [3, 4, 2, 4, 1, 5, 5], 6, 4),
    ("max-mode", {"mode": "max", "patience": 1}, [0.1, 0.5, 0.4], 2, 1),
    (
        "abs-delta-needs-more-than-delta",
        {"patience": 2, "min_delta": 0.5},
        [3, 2.6, 2.4, 2.0, 1.95],
        4,
        2,
    ),
    ("abs-delta-boundary-is-no-improvement", {"patience": 1, "min_delta": 0.5}, [1.0, 0.5], 1, 0),
    (
        "rel-delta-min",
        {"patience": 3, "min_delta": 0.1, "min_delta_mode": "rel"},
        [10, 9.5, 8.9, 8.1, 8.0, 8.0, 8.0, 8.0],
        7,
        4,
    ),
    (
        "rel-delta-negative-best",
        {"mode": "max", "patience": 1, "min_delta": 0.5, "min_delta_mode": "rel"},
        [-4, -2.5],
        1,
        0,
    ),
    (
        "rel-delta-negative-best-improves",
        {"mode": "max", "patience": 1, "min_delta": 0.5, "min_delta_mode": "rel"},
        [-4, -1.9, -1.9],
        2,
        1,
    ),
    (
        "baseline-improving-never-stops",
        {"patience": 2, "baseline": 1.0},
        [2.0, 1.5, 1.2, 1.1],
        None,
        3,
    ),
    (
        "baseline-missed-stops-on-first-miss-after-patience",
        {"patience": 2, "baseline": 1.0},
        [2.0, 1.5, 1.2, 1.1, 1.3],
        4,
        3,
    ),
    ("baseline-beaten-resets-wait", {"patience": 2, "baseline": 1.0}, [2.0, 0.9, 1.0, 1.0], 3, 1),
    ("baseline-stagnating", {"patience": 2, "baseline": 1.0}, [2.0, 2.0], 1, 0),
    ("warmup-ignores-early-values", {"patience": 2, "warmup": 2}, [1.0, 0.5, 3.0, 3.0, 3.0], 4, 2),
    ("warmup-longer-than-run", {"patience": 0, "warmup": 9}, [3, 4, 5], None, None),
    (
        "stopping-threshold-reached-when-equal",
        {"patience": 5, "stopping_threshold": 0.1},
        [0.5, 0.3, 0.1],
        2,
        2,
    ),
    (
        "stopping-threshold-max",
        {"mode": "max", "patience": 5, "stopping_threshold": 0.9},
        [0.5, 0.95],
        1,
        1,
    ),
    (
        "divergence-needs-strictly-worse",
        {"patience": 5, "divergence_threshold": 10},
        [5, 10, 10.5],
        2,
        0,
    ),
    (
        "thresholds-wait-for-warmup",
        {"patience": 5, "warmup": 2, "divergence_threshold": 10, "stopping_threshold": 0.5},
        [100, 0.0, 5],
        None,
        2,
    ),
    ("nan-first-is-not-best", {"patience": 3}, [math.nan, 1.0, 2.0], None, 1),
    ("nan-counts-as-miss", {"patience": 2}, [1.0, math.nan, math.nan], 2, 0),
    ("good-direction-inf-is-not-best", {"patience": 1}, [1.0, -math.inf], 1, 0),
    ("bad-direction-inf-is-a-miss", {"mode": "max", "patience": 1}, [1.0, -math.inf], 1, 0),
    ("never-stops-at-step-0", {"patience": 0}, [math.nan], None, None),
    ("all-nan-stops-at-step-1", {"patience": 0}, [math.nan, math.nan], 1, None),
    (
        "check-finite-stops-at-nan",
        {"patience": 9, "check_finite": True},
        [1.0, math.nan, 0.5],
        1,
        0,
    ),
    ("check-finite-during-warmup", {"warmup": 5, "check_finite": True}, [1.0, math.inf], 1, None),
]


KERAS_OPTIONS = {"mode", "patience", "min_delta", "baseline", "warmup"}


@pytest.mark.parametrize(
    ("options", "values", "stop", "best"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_worked_sequences(
    options: dict[str, Any], values: list[float], stop: int | None, best: int | None
) -> None:
    """Each hand-checked sequence stops at the expected step with the expected best step."""
    assert run(values, **options) == (stop, best)
    if all(math.isfinite(v) for v in values) and options.keys() <= KERAS_OPTIONS:
        # The Keras restatement agrees wherever Keras has the same options.
        keras = {"start_from_epoch" if k == "warmup" else k: v for k, v in options.items()}
        assert keras_rule(values, **{"mode": "min", **keras}) == (stop, best)


def test_patience_2_last_improvement_epoch_4_never_runs_epoch_7() -> None:
    """patience=2, last improvement in epoch 4 (1-based): stops after epoch 6; 7 never runs."""
    losses = [0.9, 0.7, 0.6, 0.5, 0.55, 0.52, 0.4, 0.3]
    policy = StoppingPolicy(monitor="val_loss", patience=2)
    epochs_run = []
    for epoch in range(1, len(losses) + 1):
        epochs_run.append(epoch)
        if policy.observe(losses[epoch - 1], step=epoch).should_stop:
            break
    assert epochs_run == [1, 2, 3, 4, 5, 6]
    assert (policy.best, policy.best_step, policy.stop_step) == (0.5, 4, 6)


@settings(max_examples=500)
@given(values=grid_values, k=st.integers(0, 5))
def test_seed_loop_equals_patience_k_plus_1(values: list[float], k: int) -> None:
    """The loop ``if epoch - best_epoch > k: break`` stops where patience=k+1 stops."""
    assert run(values, mode="min", patience=k + 1) == seed_loop(values, k)


@settings(max_examples=2000)
@given(
    values=grid_values,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 5),
    min_delta=st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0]),
    baseline=st.none() | grid,
    warmup=st.integers(0, 3),
)
def test_matches_keras_reference(
    values: list[float],
    mode: str,
    patience: int,
    min_delta: float,
    baseline: float | None,
    warmup: int,
) -> None:
    """On grid values the policy stops and picks its best exactly where the Keras rule does."""
    expected = keras_rule(
        values,
        mode=mode,
        patience=patience,
        min_delta=min_delta,
        baseline=baseline,
        start_from_epoch=warmup,
    )
    got = run(
        values, mode=mode, patience=patience, min_delta=min_delta, baseline=baseline, warmup=warmup
    )
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Decisions, reasons, modes, value types
# ---------------------------------------------------------------------------------------------


def test_decision_fields_follow_the_counters() -> None:
    """Each Decision reports the step, the value, improvement, best and wait after the value."""
    policy = StoppingPolicy(monitor="val_loss", patience=2, warmup=1)
    first, second, third = decisions(policy, [9.0, 2.0, 3.0])
    assert (first.counted, first.best, first.wait) == (False, None, 0)
    assert (second.step, second.value, second.improved, second.best, second.best_step) == (
        1,
        2.0,
        True,
        2.0,
        1,
    )
    assert (third.improved, third.counted, third.wait, third.should_stop, third.reason) == (
        False,
        True,
        1,
        False,
        None,
    )
    with pytest.raises(AttributeError):
        third.wait = 0  # type: ignore[misc]


def test_stopped_policy_stays_stopped() -> None:
    """After a stop, further values return should_stop=True and leave best and wait alone."""
    policy = StoppingPolicy(monitor="val_loss", patience=1)
    decisions(policy, [1.0, 2.0])
    reason = policy.stop_reason
    later = policy.observe(0.0)
    assert (later.should_stop, later.improved, later.counted, later.reason) == (
        True,
        False,
        False,
        reason,
    )
    assert (policy.best, policy.best_step, policy.wait, policy.stop_step) == (1.0, 0, 1, 1)
    assert policy.observe(5.0).step == 3


@pytest.mark.parametrize(
    ("options", "values", "reason"),
    [
        (
            {"patience": 3, "min_delta": 0.01},
            [0.5, 0.1234, 0.2, 0.12, 0.3],
            "val_loss did not improve by more than 0.01 for 3 observations; best 0.1234 at step 1",
        ),
        (
            {"patience": 0},
            [0.5, 0.6],
            "val_loss did not improve for 1 observation; best 0.5 at step 0",
        ),
        (
            {"patience": 1, "min_delta": 0.1, "min_delta_mode": "rel"},
            [0.5, 0.49],
            "val_loss did not improve by more than 0.1 x |best| for 1 observation; "
            "best 0.5 at step 0",
        ),
        (
            {"patience": 2, "baseline": 0.25},
            [0.5, 0.6],
            "val_loss did not beat the baseline 0.25 in 2 observations; best 0.5 at step 0",
        ),
        (
            {"patience": 0},
            [math.nan, math.nan],
            "val_loss did not improve for 2 observations; no finite value counted yet",
        ),
        (
            {"check_finite": True},
            [0.5, math.inf],
            "val_loss is inf at step 1 (check_finite=True); best 0.5 at step 0",
        ),
        (
            {"stopping_threshold": 0.1},
            [0.5, 0.05],
            "val_loss reached the stopping_threshold 0.1 with 0.05 at step 1; best 0.05 at step 1",
        ),
        (
            {"divergence_threshold": 2.0},
            [0.5, 2.5],
            "val_loss is 2.5 at step 1, worse than the divergence_threshold 2; best 0.5 at step 0",
        ),
    ],
)
def test_stop_reasons_name_monitor_value_and_best(
    options: dict[str, Any], values: list[float], reason: str
) -> None:
    """Every kind of stop explains itself with the monitor, the value and the best with its step."""
    policy = StoppingPolicy(monitor="val_loss", **options)
    assert decisions(policy, values)[-1].reason == reason
    assert policy.stop_reason == reason


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("val_loss", "min"),
        ("loss", "min"),
        ("val_accuracy", "max"),
        ("acc", "max"),
        ("val_auc", "max"),
    ],
)
def test_mode_auto_follows_the_metric_name(monitor: str, mode: str) -> None:
    """mode="auto" reads the direction from the monitor's name."""
    policy = StoppingPolicy(monitor=monitor, patience=0)
    assert policy.mode == mode
    assert policy.monitor == monitor
    decisions(policy, [0.5, 0.6])
    assert policy.should_stop is (mode == "min")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"monitor": 3}, "monitor must be a non-empty str naming the metric, got 3"),
        ({"monitor": ""}, "monitor must be a non-empty str naming the metric, got ''"),
        ({"mode": "lowest"}, "mode must be one of ('min', 'max', 'auto'), got 'lowest'"),
        ({"monitor": "bleu"}, "mode=\"auto\" cannot tell whether 'bleu' should go down or up"),
        ({"patience": -1}, "patience must be an int >= 0, got -1"),
        ({"patience": 1.5}, "patience must be an int >= 0, got 1.5"),
        ({"patience": True}, "patience must be an int >= 0, got True"),
        ({"warmup": -2}, "warmup must be an int >= 0, got -2"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0, got -0.1"),
        ({"min_delta": math.nan}, "min_delta must be a finite number, got nan"),
        ({"min_delta": "0.1"}, "min_delta must be a finite number, got '0.1'"),
        ({"min_delta_mode": "pct"}, "min_delta_mode must be one of ('abs', 'rel'), got 'pct'"),
        ({"baseline": math.inf}, "baseline must be None or a finite number, got inf"),
        ({"check_finite": "yes"}, "check_finite must be True or False, got 'yes'"),
        (
            {"stopping_threshold": math.nan},
            "stopping_threshold must be None or a finite number, got nan",
        ),
        (
            {"divergence_threshold": -math.inf},
            "divergence_threshold must be None or a finite number, got -inf",
        ),
    ],
)
def test_bad_arguments_name_the_argument(options: dict[str, Any], message: str) -> None:
    """Each invalid option raises ValueError naming the option and what is allowed."""
    with pytest.raises(ValueError, match=re.escape(message)):
        StoppingPolicy(**{"monitor": "val_loss", **options})


@pytest.mark.parametrize(
    "value",
    [
        1,
        0.5,
        np.float32(0.5),
        np.float64(0.5),
        np.int64(2),
        np.array(0.25),
        np.array(3, dtype=np.int8),
        ml_dtypes.bfloat16(0.5),
    ],
)
def test_numeric_values_are_accepted(value: object) -> None:
    """Ints, floats, numpy scalars, 0-d arrays and bfloat16 scalars are read as floats."""
    decision = StoppingPolicy(monitor="val_loss").observe(value)
    assert decision.value == float(value)  # type: ignore[arg-type]
    assert type(decision.value) is float
    assert decision.best == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["0.5", None, True, np.bool_(False), 1 + 2j, np.array([1.0, 2.0]), [0.5]]
)
def test_non_numeric_value_names_monitor_and_step(value: object) -> None:
    """A value that is not a real number raises TypeError naming the monitor and the step."""
    policy = StoppingPolicy(monitor="val_loss")
    policy.observe(1.0)
    with pytest.raises(TypeError, match=r"val_loss at step 1 must be a real number"):
        policy.observe(value)
    assert policy.observe(0.5).step == 1  # the refused value did not count


def test_bad_step_is_refused() -> None:
    """A step that is not a non-negative int is refused before anything counts."""
    policy = StoppingPolicy(monitor="val_loss")
    with pytest.raises(TypeError, match="step must be an int >= 0, got str"):
        policy.observe(0.5, step="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        policy.observe(0.5, step=-1)
    assert policy.observe(0.5, step=np.int64(7)).step == 7  # type: ignore[arg-type]
    assert policy.observe(0.5).step == 1


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@given(
    improving=st.lists(st.integers(1, 9), min_size=1, max_size=10),
    rest=st.lists(st.integers(0, 5), min_size=12, max_size=20),
    patience=st.integers(0, 10),
    mode=st.sampled_from(["min", "max"]),
)
def test_stops_exactly_after_patience_misses(
    improving: list[int], rest: list[int], patience: int, mode: str
) -> None:
    """After the last improvement, the policy stops at the max(patience, 1)-th miss, not before."""
    sign = 1 if mode == "min" else -1
    descending = np.cumsum(improving)[::-1] * 1.0  # strictly improving in min mode
    last = float(descending[-1])
    values = [sign * float(v) for v in descending] + [sign * (last + r) for r in rest]
    policy = StoppingPolicy(monitor="m", mode=mode, patience=patience)  # type: ignore[arg-type]
    for d in decisions(policy, values):
        if d.should_stop:
            break
    assert policy.best_step == len(improving) - 1
    assert policy.stop_step == len(improving) - 1 + max(patience, 1)


@given(
    values=any_values,
    cut=st.integers(0, 30),
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.25]),
    min_delta_mode=st.sampled_from(["abs", "rel"]),
    baseline=st.none() | grid,
    warmup=st.integers(0, 3),
    check_finite=st.booleans(),
    stopping_threshold=st.none() | grid,
    divergence_threshold=st.none() | grid,
)
def test_restore_at_any_point_decides_as_uninterrupted(
    values: list[float], cut: int, **options: Any
) -> None:
    """Saving through JSON at any index and restoring into a new policy changes no decision."""
    options["monitor"] = "val_loss"
    uninterrupted = StoppingPolicy(**options)
    whole = decisions(uninterrupted, values)
    first = StoppingPolicy(**options)
    head = decisions(first, values[:cut])
    text = json.dumps(first.state_dict(), allow_nan=False)
    second = StoppingPolicy(**options)
    second.load_state_dict(json.loads(text))
    resumed = head + decisions(second, values[cut:])
    assert [comparable(d) for d in resumed] == [comparable(d) for d in whole]
    assert second.state_dict() == uninterrupted.state_dict()


@given(values=any_values, mode=st.sampled_from(["min", "max"]), patience=st.integers(0, 40))
def test_non_finite_never_becomes_best(values: list[float], mode: str, patience: int) -> None:
    """NaN and infinities never become best; best is the extreme finite value seen so far."""
    policy = StoppingPolicy(monitor="m", mode=mode, patience=patience)  # type: ignore[arg-type]
    seen: list[float] = []
    for value in values:
        decision = policy.observe(value)
        if decision.counted and math.isfinite(value):
            seen.append(value)
        assert decision.best is None or math.isfinite(decision.best)
        expected = (min if mode == "min" else max)(seen) if seen else None
        assert decision.best == expected
        if decision.improved:
            assert decision.best == value and decision.best_step == decision.step


# ---------------------------------------------------------------------------------------------
# Saved state
# ---------------------------------------------------------------------------------------------


def test_state_dict_is_plain_json_with_version_and_config() -> None:
    """state_dict holds version 1, the options and the counters, and has no NaN tokens."""
    policy = StoppingPolicy(monitor="val_loss", patience=1, check_finite=False)
    decisions(policy, [math.nan, 0.5, math.inf])
    state = policy.state_dict()
    text = json.dumps(state, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    assert state["version"] == 1
    assert state["config"]["patience"] == 1 and state["config"]["mode"] == "min"
    assert (state["best"], state["best_step"], state["wait"], state["observations"]) == (
        0.5,
        1,
        1,
        3,
    )
    assert (state["stopped"], state["stop_step"]) == (True, 2)
    assert state["stop_reason"] == policy.stop_reason
    assert StoppingPolicy(monitor="val_loss").state_dict()["best"] is None


def test_restored_stopped_policy_stays_stopped() -> None:
    """A stopped state restores as stopped, with its reason."""
    policy = StoppingPolicy(monitor="val_acc", patience=0)
    decisions(policy, [0.9, 0.8])
    restored = StoppingPolicy(monitor="val_acc", patience=0)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.should_stop and restored.stop_reason == policy.stop_reason
    assert restored.observe(1.0).should_stop
    assert restored.best == 0.9


@pytest.mark.parametrize(
    ("saved", "current"),
    [
        ({"monitor": "val_loss"}, {"monitor": "loss"}),
        ({"monitor": "score", "mode": "min"}, {"monitor": "score", "mode": "max"}),
    ],
)
def test_other_monitor_or_mode_is_refused(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A state saved for another monitor or mode raises ConfigMismatchError and changes nothing."""
    old = StoppingPolicy(**saved)
    old.observe(0.5)
    new = StoppingPolicy(**current)
    new.observe(0.7)
    before = new.state_dict()
    with pytest.raises(ConfigMismatchError, match="the saved best is not comparable") as info:
        new.load_state_dict(old.state_dict())
    assert repr(saved["monitor"]) in str(info.value)
    assert new.state_dict() == before


def test_auto_mode_matches_the_explicit_mode_it_resolves_to() -> None:
    """A state saved with mode="min" loads silently into mode="auto" on a loss."""
    old = StoppingPolicy(monitor="val_loss", mode="min")
    old.observe(0.5)
    new = StoppingPolicy(monitor="val_loss", mode="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.load_state_dict(old.state_dict())
    assert new.best == 0.5


def test_other_options_warn_and_keep_counters_under_current_options() -> None:
    """Other differing options: current ones win, counters stay, a warning lists the changes."""
    old = StoppingPolicy(monitor="val_loss", patience=5, min_delta=0.0)
    decisions(old, [1.0, 2.0, 2.0])
    new = StoppingPolicy(monitor="val_loss", patience=3, min_delta=0.25)
    with pytest.warns(
        ConfigChangedWarning, match=r"patience: 5 -> 3, min_delta: 0.0 -> 0.25\)"
    ) as record:
        new.load_state_dict(old.state_dict())
    assert issubclass(record[0].category, UserWarning)
    assert (new.best, new.best_step, new.wait) == (1.0, 0, 2)
    decision = new.observe(0.8)  # 0.2 better, not by more than the current min_delta
    assert (decision.improved, decision.should_stop, decision.wait) == (False, True, 3)


def _good_state() -> dict[str, Any]:
    policy = StoppingPolicy(monitor="val_loss", patience=1)
    decisions(policy, [1.0, 2.0])
    return policy.state_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("wait"), "missing fields ['wait']"),
        (lambda s: s.update(extra=1), "unknown ['extra']"),
        (lambda s: s.update(version=2), "field 'version' is 2; this ckptkit reads version 1"),
        (lambda s: s.update(best="nan"), "field 'best' must be None or a finite number: 'nan'"),
        (lambda s: s.update(best_step=None), "'best' and 'best_step' must both be set or None"),
        (lambda s: s.update(wait=-1), "field 'wait' must be an int >= 0, got -1"),
        (lambda s: s.update(observations=1.0), "field 'observations' must be an int >= 0, got 1.0"),
        (lambda s: s.update(stopped="yes"), "field 'stopped' must be true or false, got 'yes'"),
        (
            lambda s: s.update(stop_reason=None),
            "'stop_step' and 'stop_reason' must be set exactly when 'stopped' is true",
        ),
        (
            lambda s: s["config"].update(patience=-1),
            "field 'config': patience must be an int >= 0, got -1",
        ),
        (
            lambda s: s["config"].update(mode="auto"),
            "field 'config.mode' must be 'min' or 'max', got 'auto'",
        ),
        (lambda s: s["config"].pop("warmup"), "field 'config' is missing ['warmup']"),
        (lambda s: s.update(config=[]), "field 'config' must be a dict, got list"),
    ],
)
def test_malformed_state_names_the_field_and_changes_nothing(edit: Any, message: str) -> None:
    """A malformed state raises ValueError naming the bad field and leaves the policy as it was."""
    state = _good_state()
    edit(state)
    policy = StoppingPolicy(monitor="val_loss", patience=1)
    policy.observe(3.0)
    before = policy.state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        policy.load_state_dict(state)
    assert policy.state_dict() == before


def test_state_that_is_not_a_dict_is_refused() -> None:
    """Something other than a dict is refused with its type named."""
    with pytest.raises(ValueError, match="stopping state must be a dict, got list"):
        StoppingPolicy(monitor="val_loss").load_state_dict([])  # type: ignore[arg-type]
