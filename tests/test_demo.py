"""The numpy demo: a real SIGKILL, a resume, and a bit-for-bit comparison with the reference."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import CheckpointStore, demo
from ckptkit.demo import PATIENCE, TrainingState, make_data, trees_identical


def _run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptkit.demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_demo_resumes_killed_run_identically(tmp_path: Path) -> None:
    """The demo kills a worker mid-epoch, resumes it, and reports the reference's exact result."""
    result = _run_demo("--root", str(tmp_path / "stores"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 30
    assert "identical to the uninterrupted run: yes" in lines
    assert "SIGKILLed in the middle of epoch 6 (batch 10), last committed epoch 5" in result.stdout
    assert "resumed run:   restored epoch 5, trained from epoch 6 to" in result.stdout
    assert any(line.startswith("stop reason: val_loss did not improve for") for line in lines)
    header = lines.index("  epoch  val_loss     acc          kept by")
    assert lines[header - 1] == "kept checkpoints (keep_last=2, keep_best=2), with what keeps each:"
    rows = {}
    for line in lines[header + 1 :]:
        if not line[:7].strip().isdigit():
            break
        rows[int(line.split()[0])] = line
    store = CheckpointStore(tmp_path / "stores" / "resumed", monitor="val_loss")
    assert list(rows) == [r.step for r in store.records()]
    # keep_last=2 and keep_best=2, which may overlap, and the epoch the resumed run started from.
    assert 3 <= len(rows) <= 5
    newest = max(rows)
    assert rows[newest].endswith("  latest  keep_last, newest")
    best = store.best()
    assert best is not None
    assert "  best    keep_best, protected (best)" in rows[best.step]
    assert sum("  best  " in row for row in rows.values()) == 1


def test_demo_says_why_the_resumed_from_checkpoint_is_kept(tmp_path: Path) -> None:
    """The checkpoint the run resumed from is shown as protected, and why, not as a rule's."""
    result = _run_demo("--root", str(tmp_path / "stores"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith("      5   "))
    assert row.endswith("          protected (resumed from)")
    note = lines.index(
        "epoch 5 is kept only because the resumed run restored it: a Checkpointer protects the "
        "checkpoint"
    )
    assert lines[note + 1] == (
        "it resumed from for as long as its process runs; a later run's first save or prune "
        "deletes it"
    )
    # What the note says: no retention rule keeps epoch 5, and the reference never had it.
    root = tmp_path / "stores"
    later = CheckpointStore(root / "resumed", keep_last=2, keep_best=2, monitor="val_loss")
    assert later.prune(dry_run=True).delete == (5,)
    assert 5 not in CheckpointStore(root / "reference")


def test_kept_by_names_each_rule_and_each_protection() -> None:
    """Rules get their option names; a protected step says whether it was resumed from or best."""
    assert demo._kept_by(["last", "newest"], 9, restored=5, best=3) == "keep_last, newest"
    assert demo._kept_by(["protected"], 5, restored=5, best=3) == "protected (resumed from)"
    assert demo._kept_by(["best", "protected"], 3, restored=5, best=3) == (
        "keep_best, protected (best)"
    )
    assert demo._kept_by(["protected"], 4, restored=4, best=4) == "protected (resumed from, best)"
    assert demo._kept_by(["protected"], 7, restored=None, best=3) == "protected"
    assert demo._kept_by(["all", "every", "pinned"], 7, restored=None, best=3) == (
        "no rule set, keep_every, pinned"
    )


def test_demo_removes_its_temporary_directory(tmp_path: Path) -> None:
    """Without --root the demo works in a temporary directory and removes it at the end."""
    result = _run_demo("--kill-after", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    root = Path(result.stdout.splitlines()[1].removeprefix("stores under "))
    assert "SIGKILLed in the middle of epoch 3" in result.stdout
    assert not root.exists()


def test_demo_kill_after_the_end_is_an_error(tmp_path: Path) -> None:
    """Asking to kill the run after it has already stopped exits with status 2 and says why."""
    result = _run_demo("--root", str(tmp_path / "stores"), "--kill-after", "500", cwd=tmp_path)
    assert result.returncode == 2
    assert "was to be killed in epoch 501 but exited with status 0" in result.stderr
    assert "choose a smaller --kill-after" in result.stderr


def test_demo_refuses_a_root_that_is_in_use(tmp_path: Path) -> None:
    """A --root whose stores already hold files is refused instead of resumed into."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--root", str(tmp_path)])
    assert exc.value.code == 2


def test_demo_exits_1_when_the_resumed_run_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the resumed run's final parameters differ, the demo says so and returns 1."""
    real_run_worker = demo.run_worker

    def tampered(root: Path, *, kill_in_epoch: int | None = None) -> list[dict[str, Any]]:
        events = real_run_worker(root, kill_in_epoch=kill_in_epoch)
        if root.name == "resumed" and kill_in_epoch is None:
            events[-1]["digest"] = "0" * 64
        return events

    monkeypatch.setattr(demo, "run_worker", tampered)
    assert demo.demo(tmp_path, kill_after=1) == 1
    out = capsys.readouterr().out
    assert "identical to the uninterrupted run: no" in out
    assert "difference: digest:" in out


def test_train_stops_early_and_restores_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One training run stops PATIENCE epochs after its best and restores the best parameters."""
    demo.train(tmp_path)
    events = _events(capsys.readouterr().out)
    assert events[0] == {"event": "start", "restored": None, "next_step": 0}
    done = events[-1]
    committed = [e for e in events if e["event"] == "committed"]
    assert [e["step"] for e in committed] == list(range(done["stop_step"] + 1))
    assert 10 <= done["stop_step"] <= 40
    assert done["stop_step"] - done["best_step"] == PATIENCE
    best = min(committed, key=lambda e: e["val_loss"])
    assert best["step"] == done["best_step"] == done["best_record_step"]
    assert committed[-1]["val_loss"] > best["val_loss"]
    assert done["digest"] != done["best_digest"]
    assert done["reason"].startswith(f"val_loss did not improve for {PATIENCE} observations")


def test_train_on_a_finished_store_does_not_train_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running the worker again on a stopped run resumes it, trains nothing and reports the same."""
    demo.train(tmp_path)
    first = _events(capsys.readouterr().out)[-1]
    demo.train(tmp_path)
    again = _events(capsys.readouterr().out)
    assert [e["event"] for e in again] == ["start", "done"]
    assert again[0]["restored"] == first["stop_step"]
    assert {**again[-1], "kept": None} == {**first, "kept": None}
    # Only what keeps the last step differs: the second run resumed from it, so protects it.
    kept_first, kept_again = dict(first["kept"]), dict(again[-1]["kept"])
    assert kept_first[first["stop_step"]] == ["last", "newest"]
    assert kept_again == {**kept_first, first["stop_step"]: ["last", "protected", "newest"]}


def test_training_state_round_trip_continues_identically(tmp_path: Path) -> None:
    """A state saved to a store and loaded into a fresh object trains on to the same bytes."""
    data = make_data()
    original = TrainingState()
    original.train_epoch(data)
    store = CheckpointStore(tmp_path)
    store.save(0, original.state_dict())
    snapshot = copy.deepcopy(original.state_dict())
    original.train_epoch(data)

    restored = TrainingState()
    restored.load_state_dict(store.load(0))
    assert trees_identical(restored.state_dict(), snapshot)
    restored.train_epoch(data)
    assert restored.digest() == original.digest()
    assert restored.evaluate(data) == original.evaluate(data)


def test_load_state_dict_refuses_another_model(tmp_path: Path) -> None:
    """Loading parameters of another shape fails with a message naming the array."""
    state = TrainingState()
    tree = state.state_dict()
    tree["params"] = {**tree["params"], "w1": np.zeros((3, 3))}
    with pytest.raises(ValueError, match=r"params/w1 has shape \(3, 3\)"):
        state.load_state_dict(tree)


def test_trees_identical_compares_bits() -> None:
    """Trees compare by dtype and bytes: -0.0 is not 0.0, float32 is not float64, NaN is itself."""
    assert trees_identical({"a": [np.zeros(2), 1.5, None]}, {"a": [np.zeros(2), 1.5, None]})
    assert not trees_identical(np.zeros(2), np.zeros(2, dtype=np.float32))
    assert not trees_identical(np.array([0.0]), np.array([-0.0]))
    assert not trees_identical(0.0, -0.0)
    assert trees_identical(float("nan"), float("nan"))
    assert not trees_identical(1, 1.0)
    assert not trees_identical({"a": 1}, {"a": 1, "b": 2})
    assert not trees_identical([1, 2], [1])


def test_compare_stores_names_what_differs(tmp_path: Path) -> None:
    """A changed array, changed metrics and a missing checkpoint are each reported by epoch."""
    reference = CheckpointStore(tmp_path / "reference")
    other = CheckpointStore(tmp_path / "other")
    for step in range(3):
        reference.save(step, {"w": np.full(2, float(step))}, metrics={"val_loss": 1.0 / (step + 1)})
    other.save(0, {"w": np.array([0.0, -0.0])}, metrics={"val_loss": 1.0})
    other.save(1, {"w": np.full(2, 1.0)}, metrics={"val_loss": 0.25})
    assert demo.compare_stores(tmp_path / "reference", tmp_path / "other") == [
        "the checkpoint of epoch 0 differs",
        "the metrics or metadata of epoch 1 differ",
        "the checkpoint of epoch 2 was not kept",
    ]
    assert demo.compare_stores(tmp_path / "reference", tmp_path / "reference") == []
