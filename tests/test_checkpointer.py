"""Checkpointer: resume, the save schedule, restore_best and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointStore,
    CorruptCheckpointError,
    FallbackWarning,
    MissingMetricError,
    StoppingPolicy,
)


class Toy:
    """A training state: weights and the generator that drives them."""

    def __init__(self, seed: int = 0) -> None:
        self.w = np.full(4, 5.0)
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].copy()
        self.rng.bit_generator.state = state["rng"]

    def train(self) -> float:
        self.w = 0.8 * self.w + self.rng.normal(size=4) * 0.3
        return float(np.abs(self.w).sum())


def run(
    root: Path, *, until: int | None = None, max_epochs: int = 40, **kwargs: Any
) -> tuple[Toy, Checkpointer, list[Any]]:
    """Train with a fresh process's objects; stop after `until` epochs to stand in for a crash."""
    toy = Toy()
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="loss")
    policy = StoppingPolicy(monitor="loss", mode="min", patience=4, min_delta=0.05)
    ckpt = Checkpointer(store, policy, toy, **kwargs)
    decisions = []
    for epoch in range(ckpt.resume(), max_epochs):
        if until is not None and epoch >= until:
            break
        decision = ckpt.step(epoch, {"loss": toy.train()})
        decisions.append(decision)
        if decision is not None and decision.should_stop:
            break
    return toy, ckpt, decisions


def test_resume_at_every_epoch_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    """Interrupted after any epoch and resumed, the run ends with the same state and decisions."""
    ref, ref_ckpt, ref_decisions = run(tmp_path / "ref")
    assert ref_ckpt.should_stop
    stop = ref_decisions[-1].step
    for k in range(1, stop + 1):
        root = tmp_path / f"cut{k}"
        _, _, first = run(root, until=k)
        toy, ckpt, second = run(root)
        assert first + second == ref_decisions, f"interrupted after {k} epochs"
        assert toy.w.tobytes() == ref.w.tobytes()
        assert ckpt.resumed_from is not None and ckpt.resumed_from.step == k - 1


def test_a_stopped_run_resumes_stopped(tmp_path: Path) -> None:
    """After the stop, a restart reports should_stop and saves nothing more."""
    _, _, decisions = run(tmp_path)
    steps_before = [r.step for r in CheckpointStore(tmp_path).records()]
    _, ckpt, more = run(tmp_path)
    assert ckpt.should_stop
    assert len(more) == 1 and more[0].should_stop  # the loop trained once more, then stopped
    assert [r.step for r in CheckpointStore(tmp_path).records()] == steps_before
    assert ckpt.policy is not None and ckpt.policy.stop_reason == decisions[-1].reason


def test_restore_best_loads_the_stores_best(tmp_path: Path) -> None:
    """restore_best loads the step with the lowest loss, the store's best, even past keep_last."""
    toy, ckpt, decisions = run(tmp_path)
    best = ckpt.restore_best()
    lowest = min(decisions, key=lambda d: (d.value, d.step))
    assert best.step == lowest.step
    assert best == ckpt.store.best()
    assert best.step < decisions[-1].step - 2  # outside keep_last=2: kept because protected
    assert toy.w.tobytes() == ckpt.store.load(best.step)["w"].tobytes()


LOSSES = [1.0, 0.98, 1.1, 1.2, 1.3]  # 0.98 beats 1.0, by less than min_delta=0.05


def _run_min_delta(root: Path, **kwargs: Any) -> Checkpointer:
    store = CheckpointStore(root, keep_last=1, monitor="loss")
    policy = StoppingPolicy(monitor="loss", patience=3, min_delta=0.05)
    ckpt = Checkpointer(store, policy, Toy(), **kwargs)
    for step, loss in enumerate(LOSSES):
        if ckpt.step(step, {"loss": loss}).should_stop:  # type: ignore[union-attr]
            break
    assert ckpt.should_stop
    return ckpt


@pytest.mark.parametrize("save_best_only", [False, True])
def test_with_min_delta_every_best_is_the_best_value(tmp_path: Path, save_best_only: bool) -> None:
    """restore_best, store.best() and load("best") agree on the lowest loss, whatever min_delta."""
    ckpt = _run_min_delta(tmp_path, save_best_only=save_best_only)
    assert ckpt.policy is not None and ckpt.policy.best_step == 0  # patience counts from 1.0
    steps = [r.step for r in ckpt.store.records()]
    assert steps == ([0, 1] if save_best_only else [1, 3])  # step 1 kept past keep_last=1
    best = ckpt.store.best()
    assert best is not None and best.step == 1
    assert ckpt.restore_best().step == 1
    assert ckpt.store.load("best")["w"].tobytes() == ckpt.store.load(1)["w"].tobytes()


def test_a_resumed_checkpointer_keeps_protecting_the_best_value(tmp_path: Path) -> None:
    """After a restart, the best checkpoint by value stays protected from keep_last."""
    store = CheckpointStore(tmp_path, keep_last=1, monitor="loss")
    ckpt = Checkpointer(store, StoppingPolicy(monitor="loss", patience=9, min_delta=0.05), Toy())
    for step, loss in enumerate(LOSSES[:2]):
        ckpt.step(step, {"loss": loss})
    store = CheckpointStore(tmp_path, keep_last=1, monitor="loss")
    ckpt = Checkpointer(store, StoppingPolicy(monitor="loss", patience=9, min_delta=0.05), Toy())
    for step in range(ckpt.resume(), 5):
        ckpt.step(step, {"loss": LOSSES[step]})
    assert [r.step for r in store.records()] == [1, 4]
    assert ckpt.restore_best().step == 1


def test_a_store_and_policy_that_rank_one_metric_two_ways_are_refused(tmp_path: Path) -> None:
    """The same monitor with opposite modes in store and policy would make two bests: refused."""
    store = CheckpointStore(tmp_path, monitor="score", mode="min")
    with pytest.raises(
        ValueError, match=r"store ranks 'score' by mode 'min' and the policy by 'max'"
    ):
        Checkpointer(store, StoppingPolicy(monitor="score", mode="max"), Toy())


def test_save_schedule(tmp_path: Path) -> None:
    """save_every saves every N-th step plus improvements and the stop; save_best_only only improvements."""
    toy = Toy()
    store = CheckpointStore(tmp_path / "a")
    policy = StoppingPolicy(monitor="loss", mode="min", patience=2)
    ckpt = Checkpointer(store, policy, toy, save_every=3)
    losses = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8]
    for step, loss in enumerate(losses):
        if ckpt.step(step, {"loss": loss}).should_stop:  # type: ignore[union-attr]
            break
    # 0, 1: improvements; 2: every third; 3: the stop.
    assert [r.step for r in store.records()] == [0, 1, 2, 3]

    store = CheckpointStore(tmp_path / "b")
    ckpt = Checkpointer(
        store, StoppingPolicy(monitor="loss", mode="min", patience=9), toy, save_best_only=True
    )
    for step, loss in enumerate([3.0, 4.0, 2.0, 2.5]):
        ckpt.step(step, {"loss": loss})
    assert [r.step for r in store.records()] == [0, 2]


def test_without_a_policy_it_only_saves(tmp_path: Path) -> None:
    """With policy=None, step() saves on schedule and returns None."""
    store = CheckpointStore(tmp_path)
    ckpt = Checkpointer(store, None, Toy(), save_every=2)
    assert [ckpt.step(s) for s in range(4)] == [None] * 4
    assert [r.step for r in store.records()] == [1, 3]
    with pytest.raises(ValueError, match="save_best_only=True needs a policy"):
        Checkpointer(store, None, Toy(), save_best_only=True)


def test_dict_of_stateful_parts(tmp_path: Path) -> None:
    """A dict of named parts is saved and restored part by part; mismatched names are refused."""
    store = CheckpointStore(tmp_path)
    a, b = Toy(1), Toy(2)
    a.train()
    Checkpointer(store, None, {"a": a, "b": b}).save(0)
    a2, b2 = Toy(), Toy()
    assert Checkpointer(store, None, {"a": a2, "b": b2}).resume() == 1
    assert a2.w.tobytes() == a.w.tobytes() and b2.w.tobytes() == b.w.tobytes()
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['b'\]"):
        Checkpointer(store, None, {"a": Toy(), "c": Toy()}).resume()


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    """Missing metrics, reserved metadata, bad state objects and no best get clear errors."""
    store = CheckpointStore(tmp_path)
    ckpt = Checkpointer(store, StoppingPolicy(monitor="val_loss", mode="min"), Toy())
    with pytest.raises(
        MissingMetricError,
        match=r"monitors 'val_loss', but the metrics passed have only \['loss'\]",
    ):
        ckpt.step(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="'ckptkit' is reserved"):
        ckpt.save(0, metadata={"ckptkit": 1})
    with pytest.raises(
        CheckpointNotFoundError, match="no committed checkpoint has a finite 'val_loss' metric"
    ):
        ckpt.restore_best()
    with pytest.raises(TypeError, match=r"state\['m'\] is a list, which has no state_dict"):
        Checkpointer(store, None, {"m": []})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="save_every must be an int >= 1"):
        Checkpointer(store, None, Toy(), save_every=0)
    assert len(store) == 0


def test_resume_past_a_corrupt_latest_rewrites_its_steps(tmp_path: Path) -> None:
    """After falling back past a corrupt checkpoint, the loop re-runs its step and replaces it."""
    ref, _, ref_decisions = run(tmp_path / "ref")
    root = tmp_path / "run"
    run(root, until=6)
    store = CheckpointStore(root)
    latest = store.latest()
    assert latest is not None and latest.step == 5
    path = root / latest.directory / "arrays.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.warns(FallbackWarning, match="skipping corrupt step 5"):
        toy, ckpt, _ = run(root)
    assert ckpt.resumed_from is not None and ckpt.resumed_from.step == 4
    assert toy.w.tobytes() == ref.w.tobytes()
    assert ckpt.policy is not None and ckpt.policy.stop_step == ref_decisions[-1].step
    for record in CheckpointStore(root).records():
        CheckpointStore(root).verify(record.step)


def test_foreign_values_under_the_reserved_key_are_reported(tmp_path: Path) -> None:
    """A checkpoint whose 'ckptkit' metadata was written by other code is refused with the step."""
    store = CheckpointStore(tmp_path)
    store.save(3, Toy().state_dict(), metadata={"ckptkit": "run-42"})
    ckpt = Checkpointer(store, StoppingPolicy(monitor="loss", mode="min"), Toy())
    with pytest.raises(CorruptCheckpointError, match=r"'ckptkit' of step 3 holds a str"):
        ckpt.resume()
    store.save(4, Toy().state_dict(), metadata={"ckptkit": {"policy": {"version": 1}}})
    with pytest.raises(
        CorruptCheckpointError, match="stopping state saved with step 4 is malformed"
    ):
        ckpt.resume()
