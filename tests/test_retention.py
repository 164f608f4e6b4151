"""Tests for retention: which checkpoints a policy keeps and why."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptkit._record import CheckpointRecord
from ckptkit._retention import REASONS, RetentionPlan, RetentionPolicy

NAN = math.nan
INF = math.inf


def rec(step: int, loss: float | None = None, *, pinned: bool = False) -> CheckpointRecord:
    """A record at ``step`` whose ``loss`` metric is ``loss`` (absent when None)."""
    metrics = {} if loss is None else {"loss": loss}
    return CheckpointRecord(
        step=step, metrics=metrics, created=0.0, directory=f"step_{step}", pinned=pinned
    )


def recs(*losses: float | None) -> list[CheckpointRecord]:
    """Records at steps 1, 2, 3, ... with the given losses."""
    return [rec(i, loss) for i, loss in enumerate(losses, start=1)]


def kept_by(plan: RetentionPlan, reason: str) -> set[int]:
    """The steps the plan keeps for ``reason``."""
    return {step for step, why in plan.reasons.items() if reason in why}


# --- strategies -------------------------------------------------------------------------------

# Few distinct values so ties are common, plus every non-finite kind and arbitrary floats.
metric_values = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, NAN, INF, -INF]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@st.composite
def record_lists(draw: st.DrawFn, max_size: int = 20) -> list[CheckpointRecord]:
    """Records with distinct steps, some pinned, some with a missing or non-finite loss."""
    steps = draw(st.lists(st.integers(0, 200), unique=True, max_size=max_size))
    out = []
    for step in steps:
        loss = draw(st.none() | metric_values)
        out.append(rec(step, loss, pinned=draw(st.booleans())))
    return out


counts = st.none() | st.integers(0, 6)


@st.composite
def policies(draw: st.DrawFn) -> RetentionPolicy:
    """Any valid policy ranking by ``loss``."""
    return RetentionPolicy(
        keep_last=draw(counts),
        keep_best=draw(counts),
        monitor="loss",
        mode=draw(st.sampled_from(["min", "max"])),
        keep_every=draw(st.none() | st.integers(1, 10)),
    )


def beats(a: CheckpointRecord, b: CheckpointRecord, mode: str) -> bool:
    """Whether ``a`` ranks before ``b``: a better loss, or an equal one at an earlier step."""
    va, vb = a.metric("loss"), b.metric("loss")
    assert va is not None and vb is not None
    if va == vb:
        return a.step < b.step
    return va < vb if mode == "min" else va > vb


# --- tables: each rule alone and in unions ----------------------------------------------------

SIX = recs(0.9, 0.3, 0.5, 0.1, 0.7, 0.8)

RULE_TABLE = [
    # (policy, records, kept steps)
    (RetentionPolicy(), SIX, {1, 2, 3, 4, 5, 6}),
    (RetentionPolicy(keep_last=2), SIX, {5, 6}),
    (RetentionPolicy(keep_last=10), SIX, {1, 2, 3, 4, 5, 6}),
    (RetentionPolicy(keep_best=2, monitor="loss"), SIX, {2, 4, 6}),
    (RetentionPolicy(keep_best=2, monitor="loss", mode="max"), SIX, {1, 6}),
    (RetentionPolicy(keep_every=3), SIX, {3, 6}),
    (RetentionPolicy(keep_every=4), SIX, {4, 6}),
    (RetentionPolicy(keep_last=1, keep_best=1, monitor="loss"), SIX, {4, 6}),
    (RetentionPolicy(keep_last=2, keep_every=2), SIX, {2, 4, 5, 6}),
    (RetentionPolicy(keep_last=1, keep_best=2, monitor="loss", keep_every=5), SIX, {2, 4, 5, 6}),
    (RetentionPolicy(keep_last=0), SIX, {6}),
    (RetentionPolicy(keep_best=0, monitor="loss"), SIX, {6}),
    (RetentionPolicy(keep_last=0, keep_best=0), SIX, {6}),
    (RetentionPolicy(keep_last=3), [], set()),
]


@pytest.mark.parametrize(("policy", "records", "kept"), RULE_TABLE)
def test_rules_keep_their_union(
    policy: RetentionPolicy, records: list[CheckpointRecord], kept: set[int]
) -> None:
    """Each rule keeps its own steps, several rules keep the union, and the rest is deleted."""
    plan = policy.select(records)
    assert plan.keep == kept
    assert plan.delete == tuple(sorted({r.step for r in records} - kept))


REASON_TABLE = [
    # (policy, records, protected, step -> reasons)
    (RetentionPolicy(), recs(1.0, 2.0), (), {1: ("all",), 2: ("all", "newest")}),
    (
        RetentionPolicy(keep_last=2, keep_best=1, monitor="loss", keep_every=2),
        recs(0.1, 0.5, 0.9, 0.4),
        (),
        {1: ("best",), 2: ("every",), 3: ("last",), 4: ("last", "every", "newest")},
    ),
    (
        RetentionPolicy(keep_last=1),
        [rec(1, pinned=True), rec(2), rec(3)],
        (2,),
        {1: ("pinned",), 2: ("protected",), 3: ("last", "newest")},
    ),
    (
        RetentionPolicy(),
        [rec(1, pinned=True), rec(2)],
        (1,),
        {1: ("all", "pinned", "protected"), 2: ("all", "newest")},
    ),
]


@pytest.mark.parametrize(("policy", "records", "protected", "reasons"), REASON_TABLE)
def test_reasons_name_every_rule_that_keeps_a_step(
    policy: RetentionPolicy,
    records: list[CheckpointRecord],
    protected: tuple[int, ...],
    reasons: dict[int, tuple[str, ...]],
) -> None:
    """Every kept step lists each rule that keeps it, in the documented order."""
    assert dict(policy.select(records, protected=protected).reasons) == reasons


NONFINITE_TABLE = [
    # (losses at steps 1.., mode, best steps with keep_best=2)
    ((NAN, 0.5, 0.7, None), "min", {2, 3}),
    ((-INF, 0.5, INF, 0.7, None), "min", {2, 4}),
    ((INF, 0.5, -INF, 0.7, None), "max", {2, 4}),
    ((NAN, None, 0.3, INF), "min", {3}),
    ((NAN, None, INF, -INF), "min", set()),
]


@pytest.mark.parametrize(("losses", "mode", "best"), NONFINITE_TABLE)
def test_missing_and_nonfinite_metrics_are_never_best(
    losses: tuple[float | None, ...], mode: str, best: set[int]
) -> None:
    """NaN, +inf, -inf and a missing metric never rank among the best, whatever the mode."""
    # The newest record has no metric: it is kept as "newest" without taking a "best" place.
    records = [*recs(*losses), rec(100)]
    policy = RetentionPolicy(keep_best=2, monitor="loss", mode=mode)  # type: ignore[arg-type]
    plan = policy.select(records)
    assert kept_by(plan, "best") == best
    assert plan.keep == best | {100}
    assert {r.step for r in policy.best(records)} == best


TIE_TABLE = [
    # (losses at steps 1.., mode, keep_best, best steps)
    ((0.5, 0.2, 0.2, 0.2), "min", 1, {2}),
    ((0.5, 0.2, 0.2, 0.2), "min", 2, {2, 3}),
    ((0.2, 0.9, 0.9), "max", 1, {2}),
    ((0.3, 0.3, 0.3), "min", 2, {1, 2}),
]


@pytest.mark.parametrize(("losses", "mode", "keep_best", "best"), TIE_TABLE)
def test_ties_go_to_the_earlier_step(
    losses: tuple[float, ...], mode: str, keep_best: int, best: set[int]
) -> None:
    """Among equal values the checkpoint that reached the value first stays best."""
    records = [*recs(*losses), rec(100)]
    policy = RetentionPolicy(keep_best=keep_best, monitor="loss", mode=mode)  # type: ignore[arg-type]
    assert kept_by(policy.select(records), "best") == best


def test_best_ranks_best_first_and_drops_nonfinite() -> None:
    """best() returns finite-metric records best first, earlier step first among ties."""
    records = recs(0.4, NAN, 0.1, 0.4, None, INF, 0.2)
    assert [r.step for r in RetentionPolicy(monitor="loss").best(records)] == [3, 7, 1, 4]
    ranked = RetentionPolicy(monitor="loss", mode="max").best(records)
    assert [r.step for r in ranked] == [1, 4, 7, 3]


def test_best_without_monitor_says_to_pass_one() -> None:
    """Ranking with no monitor fails and tells the caller which argument to give."""
    with pytest.raises(ValueError, match=r'monitor="<metric name>"'):
        RetentionPolicy(keep_last=1).best(recs(0.1))


def test_pinned_records_survive_every_rule() -> None:
    """A pinned checkpoint is kept even when no rule would keep it."""
    records = [rec(1, 9.0, pinned=True), *[rec(s, 1.0) for s in range(2, 8)]]
    plan = RetentionPolicy(keep_last=1, keep_best=1, monitor="loss").select(records)
    assert plan.keep == {1, 2, 7}
    assert plan.reasons[1] == ("pinned",)


def test_protected_steps_are_kept_and_unknown_ones_ignored() -> None:
    """Steps in ``protected`` survive; protected steps that match no record are ignored."""
    plan = RetentionPolicy(keep_last=1).select(recs(1, 2, 3, 4, 5), protected={2, 3, 99})
    assert plan.keep == {2, 3, 5}
    assert plan.delete == (1, 4)
    assert 99 not in plan.reasons


@pytest.mark.parametrize(
    "policy",
    [
        RetentionPolicy(keep_last=0),
        RetentionPolicy(keep_best=3, monitor="loss"),
        RetentionPolicy(keep_every=7),
    ],
)
def test_newest_step_is_always_kept(policy: RetentionPolicy) -> None:
    """The highest step survives even when its metric is NaN and no rule keeps it."""
    records = [*recs(0.1, 0.2, 0.3, 0.4), rec(5, NAN)]
    plan = policy.select(records)
    assert 5 in plan.keep
    assert "newest" in plan.reasons[5]


def test_keep_last_counts_steps_not_list_position() -> None:
    """keep_last keeps the highest steps even when the list is not sorted."""
    records = [rec(30), rec(10), rec(50), rec(20), rec(40)]
    assert RetentionPolicy(keep_last=2).select(records).keep == {40, 50}


def test_keep_every_includes_step_zero() -> None:
    """Step 0 is a multiple of every keep_every."""
    records = [rec(s) for s in (0, 3, 5, 10, 11)]
    assert RetentionPolicy(keep_every=5).select(records).keep == {0, 5, 10, 11}


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (2, 0, 4, 1, 3)])
def test_plan_does_not_depend_on_input_order(order: tuple[int, ...]) -> None:
    """Shuffling the records gives the same plan, reasons included."""
    base = [rec(1, 0.3), rec(2, 0.3, pinned=True), rec(3, NAN), rec(4, 0.1), rec(5)]
    policy = RetentionPolicy(keep_last=1, keep_best=2, monitor="loss", keep_every=3)
    expected = policy.select(base, protected=(1,))
    plan = policy.select([base[i] for i in order], protected=(1,))
    assert plan == expected
    assert dict(plan.reasons) == dict(expected.reasons)


def test_select_leaves_its_input_alone() -> None:
    """select() does not reorder or change the list it is given."""
    records = [rec(3, 0.2), rec(1, 0.1), rec(2, 0.3)]
    before = list(records)
    RetentionPolicy(keep_last=1, keep_best=1, monitor="loss").select(records, protected=[1])
    assert records == before


def test_duplicate_steps_are_refused_with_both_directories() -> None:
    """Two records with one step raise ValueError naming the step and both directories."""
    records = [rec(1), rec(2), CheckpointRecord(step=2, created=0.0, directory="elsewhere")]
    with pytest.raises(ValueError, match=r"step 2 appears twice .*'step_2' and 'elsewhere'"):
        RetentionPolicy(keep_last=1).select(records)


def test_plan_reasons_are_read_only() -> None:
    """The plan's reasons mapping cannot be edited after the fact."""
    plan = RetentionPolicy().select(recs(1.0))
    with pytest.raises(TypeError):
        plan.reasons[1] = ("best",)  # type: ignore[index]


# --- validation -------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"keep_last": -1}, ValueError, r"keep_last must be >= 0 or None, got -1"),
    ({"keep_best": -2, "monitor": "loss"}, ValueError, r"keep_best must be >= 0 or None, got -2"),
    ({"keep_every": 0}, ValueError, r"keep_every must be >= 1 or None, got 0"),
    ({"keep_every": -3}, ValueError, r"keep_every must be >= 1 or None, got -3"),
    ({"keep_last": True}, TypeError, r"keep_last must be an int or None, got True"),
    ({"keep_every": 2.0}, TypeError, r"keep_every must be an int or None, got 2.0"),
    ({"keep_best": 1}, ValueError, r"keep_best=1 needs a metric to rank by; pass monitor="),
    ({"monitor": ""}, ValueError, r"monitor must be a non-empty metric name or None, got ''"),
    (
        {"monitor": "acc", "mode": "auto"},
        ValueError,
        r"mode must be \"min\" or \"max\", got 'auto'",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_by_name(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Invalid counts, a missing monitor and an unresolved mode fail with the argument named."""
    with pytest.raises(error, match=message):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_keep_best_zero_needs_no_monitor() -> None:
    """keep_best=0 keeps none by that rule, so it is accepted without a monitor."""
    assert RetentionPolicy(keep_best=0, keep_last=1).select(recs(1, 2)).keep == {2}


# --- properties -------------------------------------------------------------------------------


@given(records=record_lists(), policy=policies(), protected=st.sets(st.integers(0, 220)))
def test_plan_partitions_the_steps_and_keeps_the_untouchables(
    records: list[CheckpointRecord], policy: RetentionPolicy, protected: set[int]
) -> None:
    """keep and delete partition the steps; the newest, pinned and protected steps are kept."""
    plan = policy.select(records, protected=protected)
    steps = {r.step for r in records}
    assert plan.keep | set(plan.delete) == steps
    assert not plan.keep & set(plan.delete)
    assert list(plan.delete) == sorted(set(plan.delete))
    assert set(plan.reasons) == plan.keep
    assert all(why and set(why) <= set(REASONS) for why in plan.reasons.values())
    if records:
        assert max(steps) in plan.keep
    assert {r.step for r in records if r.pinned} <= plan.keep
    assert protected & steps <= plan.keep


@given(records=record_lists(), policy=policies())
def test_best_keeps_the_true_top_k(
    records: list[CheckpointRecord], policy: RetentionPolicy
) -> None:
    """Exactly min(K, finite) steps are kept as best and no finite record left out beats one."""
    plan = policy.select(records)
    best = kept_by(plan, "best")
    finite = [r for r in records if r.metric("loss") is not None]
    assert len(best) == min(policy.keep_best or 0, len(finite))
    for loser in (r for r in finite if r.step not in best):
        for winner in (r for r in finite if r.step in best):
            assert beats(winner, loser, policy.mode)


@given(records=record_lists(), policy=policies(), data=st.data())
def test_plan_ignores_order_and_does_not_mutate(
    records: list[CheckpointRecord], policy: RetentionPolicy, data: st.DataObject
) -> None:
    """Any permutation of the records gives an equal plan and the input list is unchanged."""
    shuffled = data.draw(st.permutations(records))
    before = list(shuffled)
    assert policy.select(shuffled) == policy.select(records)
    assert shuffled == before


@given(records=record_lists(), policy=policies(), base=st.integers(0, 6), extra=st.integers(1, 5))
def test_larger_keep_last_never_deletes_more(
    records: list[CheckpointRecord], policy: RetentionPolicy, base: int, extra: int
) -> None:
    """Raising keep_last from one count to a larger one only moves steps from delete to keep."""
    # From None the comparison does not hold: no rule at all means "keep everything".
    smaller = RetentionPolicy(
        keep_last=base,
        keep_best=policy.keep_best,
        monitor=policy.monitor,
        mode=policy.mode,
        keep_every=policy.keep_every,
    )
    larger = RetentionPolicy(
        keep_last=base + extra,
        keep_best=policy.keep_best,
        monitor=policy.monitor,
        mode=policy.mode,
        keep_every=policy.keep_every,
    )
    assert set(larger.select(records).delete) <= set(smaller.select(records).delete)


def run_with_retention(
    policy: RetentionPolicy,
    survivors: Sequence[CheckpointRecord],
    saves: Sequence[CheckpointRecord],
    protected: tuple[int, ...] = (),
) -> list[CheckpointRecord]:
    """Save each record in turn, deleting what retention drops after every save, as a store does."""
    on_disk = list(survivors)
    for record in saves:
        on_disk.append(record)
        plan = policy.select(on_disk, protected=protected)
        on_disk = [r for r in on_disk if r.step in plan.keep]
    return on_disk


@given(
    losses=st.lists(st.none() | metric_values, min_size=1, max_size=30),
    split=st.integers(0, 30),
    keep_best=st.integers(1, 4),
    keep_last=st.integers(0, 2),
    mode=st.sampled_from(["min", "max"]),
)
def test_resumed_run_keeps_the_best_over_both_processes(
    losses: list[float | None], split: int, keep_best: int, keep_last: int, mode: str
) -> None:
    """A second process continuing from the manifest ends with the true best-k of the whole run."""
    policy = RetentionPolicy(
        keep_best=keep_best,
        keep_last=keep_last,
        monitor="loss",
        mode=mode,  # type: ignore[arg-type]
    )
    everything = recs(*losses)
    first, second = everything[:split], everything[split:]
    after_first = run_with_retention(policy, [], first)
    resumed_from = (after_first[-1].step,) if after_first else ()
    final = run_with_retention(policy, after_first, second, protected=resumed_from)

    finite = [r for r in everything if r.metric("loss") is not None]
    true_best = {
        r.step for r in finite if sum(beats(o, r, mode) for o in finite if o is not r) < keep_best
    }
    assert kept_by(policy.select(final), "best") == true_best
    assert {r.step for r in policy.best(final)[:keep_best]} == true_best
