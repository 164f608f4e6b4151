"""The ckptkit command line: listing, showing, verifying, pruning, pinning, plotting, errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import (
    Checkpointer,
    CheckpointStore,
    RetentionPolicy,
    StoppingPolicy,
    __version__,
)
from ckptkit._cli import main

#: val_loss per step: best 0.4 at step 2, then three evaluations without improvement.
VAL_LOSS = [0.9, 0.6, 0.4, 0.5, 0.45, 0.55]


class Model:
    """A small training state with arrays, a long list and a tuple holding a NaN."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": np.full((4, 3), self.step, np.float32),
            "b": np.arange(5, dtype=np.int64),
            "config": {"lr": 0.01, "layers": list(range(30)), "name": "mlp"},
            "pair": (1, math.nan),
        }

    def load_state_dict(self, state: Any) -> None:
        pass


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store filled by a Checkpointer whose policy stops at step 5 (keeps everything)."""
    root = tmp_path_factory.mktemp("template") / "run"
    store = CheckpointStore(root)
    policy = StoppingPolicy(monitor="val_loss", patience=3)
    model = Model()
    ckpt = Checkpointer(store, policy, model)
    for step, value in enumerate(VAL_LOSS):
        model.step = step
        ckpt.step(step, {"val_loss": value, "acc": 1 - value}, metadata={"note": f"s{step}"})
        if ckpt.should_stop:
            break
    assert ckpt.should_stop and [r.step for r in store.records()] == [0, 1, 2, 3, 4, 5]
    return root


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    """A copy of the template store, for this test to change."""
    return Path(shutil.copytree(template, tmp_path / "run"))


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def test_ls_lists_steps_metrics_and_flags(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ls prints a row per step with its metrics, latest and best flags, and a summary."""
    CheckpointStore(root).pin(1)
    code, out, err = run(capsys, "ls", root)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["step", "val_loss", "acc", "size", "created", "flags"]
    rows = {int(line.split()[0]): line for line in lines[1:-2]}
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]
    assert rows[2].endswith("best") and rows[5].endswith("latest") and rows[1].endswith("pinned")
    size = CheckpointStore(root).record(0).size
    assert size < 1024 and rows[0].split()[1:5] == ["0.9", "0.1", str(size), "B"]
    assert lines[7].startswith("6 checkpoints, ")
    assert "best by val_loss (min, from the stopping policy): step 2" in lines[7]
    assert (
        lines[8]
        == "stopping policy: val_loss (min), last improvement 0.4 at step 2; stopped at step 5"
    )


def test_ls_json_is_exact(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ls --json gives every record with stable keys, sizes in bytes and local ISO times."""
    records = CheckpointStore(root).records()
    doc = run_json(capsys, "ls", root)
    assert doc == {
        "root": str(root),
        "count": 6,
        "total_size": sum(r.size for r in records),
        "monitor": "val_loss",
        "mode": "min",
        "policy": {
            "monitor": "val_loss",
            "mode": "min",
            "best": 0.4,
            "best_step": 2,
            "wait": 3,
            "stopped": True,
            "stop_step": 5,
            "stop_reason": "val_loss did not improve for 3 observations; best 0.4 at step 2",
        },
        "checkpoints": [
            {
                "step": r.step,
                "directory": f"step_{r.step:012d}",
                "created": iso(r.created),
                "size": r.size,
                "metrics": {"val_loss": VAL_LOSS[r.step], "acc": 1 - VAL_LOSS[r.step]},
                "latest": r.step == 5,
                "best": r.step == 2,
                "pinned": False,
            }
            for r in records
        ],
    }


def test_ls_without_a_monitor_has_no_best_and_spells_out_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a policy or --monitor, best is null; NaN and inf metrics are JSON strings."""
    store = CheckpointStore(tmp_path)
    for step, value in enumerate([math.nan, math.inf, -math.inf, 0.5]):
        store.save(step, {"x": np.zeros(2)}, metrics={"score": value})
    doc = run_json(capsys, "ls", tmp_path)
    assert (doc["monitor"], doc["mode"], doc["policy"]) == (None, None, None)
    assert [c["best"] for c in doc["checkpoints"]] == [None] * 4
    assert [c["metrics"]["score"] for c in doc["checkpoints"]] == [
        "NaN",
        "Infinity",
        "-Infinity",
        0.5,
    ]
    code, out, _ = run(capsys, "ls", tmp_path)
    assert code == 0 and "no monitor to rank by" in out and "best" not in out.splitlines()[1]
    ranked = run_json(capsys, "ls", tmp_path, "--monitor", "score", "--mode", "max")
    assert [c["best"] for c in ranked["checkpoints"]] == [False, False, False, True]


def test_ls_refuses_a_monitor_whose_direction_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown metric name with mode auto is a usage error that asks for --mode."""
    CheckpointStore(tmp_path).save(0, {"x": np.zeros(1)}, metrics={"score": 1.0})
    code, out, err = run(capsys, "ls", tmp_path, "--monitor", "score")
    assert (code, out) == (2, "")
    assert err == (
        "ckptkit: error: cannot tell whether 'score' is better low or high; "
        "pass --mode min or --mode max\n"
    )


def test_show_prints_record_tensors_and_a_cut_state(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show names the tensors with dtype, shape and size, and cuts long lists unless --all."""
    code, out, err = run(capsys, "show", root, "best")
    assert (code, err) == (0, "")
    assert out.startswith("step 2 (best)\n")
    assert "stopping policy: val_loss (min), last improvement 0.4 at step 2; 0 evaluations" in out
    assert '{"note": "s2"}' in out and '"ckptkit"' not in out
    assert "arrays.safetensors" in out and "state.json" in out and "xxh3_128:" in out
    assert "tensors: 2, 88 B" in out
    assert [line.split() for line in out.splitlines() if line.startswith("  b ")] == [
        ["b", "I64", "[5]", "40", "B"]
    ]
    assert "  w     F32    [4, 3]" in out
    assert '"... 20 more items"' in out and '"pair": [1, "NaN"]' in out
    assert '"w": "<array float32 [4, 3]>"' in out
    code, full, _ = run(capsys, "show", root, "2", "--all")
    assert code == 0 and "more items" not in full and '"ckptkit"' in full
    assert "27, 28, 29\n" in full


def test_show_json_is_exact(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show --json gives the record, files, tensors and the state with arrays as placeholders."""
    record = CheckpointStore(root).record(5)
    doc = run_json(capsys, "show", root, "latest")
    assert doc == {
        "root": str(root),
        "step": 5,
        "directory": "step_000000000005",
        "created": iso(record.created),
        "size": record.size,
        "latest": True,
        "best": False,
        "pinned": False,
        "metrics": {"val_loss": 0.55, "acc": 1 - 0.55},
        "metadata": {"note": "s5"},
        "policy": {
            "monitor": "val_loss",
            "mode": "min",
            "best": 0.4,
            "best_step": 2,
            "wait": 3,
            "stopped": True,
            "stop_step": 5,
            "stop_reason": "val_loss did not improve for 3 observations; best 0.4 at step 2",
        },
        "files": [{"name": f.name, "size": f.size, "checksum": f.checksum} for f in record.files],
        "tensors": [
            {"name": "b", "dtype": "I64", "shape": [5], "bytes": 40},
            {"name": "w", "dtype": "F32", "shape": [4, 3], "bytes": 48},
        ],
        "state": {
            "w": "<array float32 [4, 3]>",
            "b": "<array int64 [5]>",
            "config": {
                "lr": 0.01,
                "layers": [*range(10), "... 20 more items"],
                "name": "mlp",
            },
            "pair": [1, "NaN"],
        },
        "error": None,
    }


def test_verify_passes_a_sound_store(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify checks every checkpoint, prints ok for each and exits 0."""
    code, out, err = run(capsys, "verify", root)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"step {s}: ok" for s in range(6)] + ["6 checked, 6 ok, 0 bad"]


def test_verify_names_the_file_with_a_flipped_byte(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte makes verify exit 1 and name the bad file; other steps stay ok."""
    bad = root / "step_000000000003" / "arrays.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", root)
    assert code == 1
    lines = out.splitlines()
    assert lines[3].startswith(f"step 3: BAD: {bad}: checksum of step 3 does not match")
    assert lines[2] == "step 2: ok" and lines[-1].startswith("6 checked, 5 ok, 1 bad")
    doc = json.loads(run(capsys, "verify", root, "3", "--json")[1])
    assert doc["ok"] is False and [c["step"] for c in doc["checkpoints"]] == [3]
    assert str(bad) in doc["checkpoints"][0]["error"]
    assert run(capsys, "verify", root, "2")[0] == 0


def test_show_of_a_corrupt_checkpoint_prints_the_record_and_exits_1(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state.json that does not parse: the record and files still print, then the error."""
    bad = root / "step_000000000001" / "state.json"
    bad.write_bytes(b"X" + bad.read_bytes()[1:])
    code, out, err = run(capsys, "show", root, "1")
    assert code == 1 and out.startswith("step 1\n") and "state.json" in out
    assert err.startswith(f"ckptkit: error: {bad}: not valid JSON")
    doc = json.loads(run(capsys, "show", root, "1", "--json")[1])
    assert (doc["state"], doc["step"]) == (None, 1) and doc["error"].startswith(str(bad))


def test_verify_names_a_missing_checkpoint_directory(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listed checkpoint whose directory is gone is reported bad, naming the directory."""
    gone = root / "step_000000000004"
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    code, out, _ = run(capsys, "verify", root)
    assert code == 1 and f"step 4: BAD: {gone}: listed in the manifest" in out


def test_prune_dry_run_deletes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prune --dry-run reports the plan and leaves manifest and directories untouched."""
    manifest = (root / "manifest.json").read_bytes()
    dirs = sorted(p.name for p in root.iterdir())
    code, out, _ = run(capsys, "prune", root, "--keep-last", "1", "--dry-run")
    assert code == 0
    assert "step 0: would delete" in out and "step 5: keep (last, newest)" in out
    assert out.splitlines()[-1].startswith("dry run: would delete 5 checkpoints")
    assert out.rstrip().endswith("nothing was deleted")
    assert (root / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in root.iterdir()) == dirs


def test_prune_deletes_exactly_what_retention_drops(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune removes the steps RetentionPolicy.select drops, from the manifest and the disk."""
    before = CheckpointStore(root).records()
    plan = RetentionPolicy(keep_last=1, keep_best=1, monitor="val_loss", keep_every=3).select(
        before
    )
    assert plan.delete == (1, 4)
    doc = run_json(
        capsys, "prune", root, "--keep-last", "1", "--keep-best", "1", "--keep-every", "3"
    )
    assert doc == {
        "root": str(root),
        "dry_run": False,
        "monitor": "val_loss",
        "mode": "min",
        "kept": [
            {"step": 0, "reasons": ["every"]},
            {"step": 2, "reasons": ["best"]},
            {"step": 3, "reasons": ["every"]},
            {"step": 5, "reasons": ["last", "newest"]},
        ],
        "deleted": [1, 4],
        "freed_bytes": sum(r.size for r in before if r.step in plan.delete),
    }
    assert [r.step for r in CheckpointStore(root).records()] == sorted(plan.keep)
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{s:012d}" for s in (0, 2, 3, 5)]


def test_prune_without_a_retention_option_refuses(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune with no --keep-* option exits 2 with a message and deletes nothing."""
    code, out, err = run(capsys, "prune", root, "--monitor", "val_loss")
    assert (code, out) == (2, "")
    assert err.startswith("ckptkit: error: prune needs at least one of --keep-last")
    assert len(CheckpointStore(root).records()) == 6


def test_prune_keep_best_refuses_a_monitor_no_checkpoint_has(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt --monitor would rank nothing and keep nothing: prune refuses, deletes nothing."""
    code, out, err = run(
        capsys, "prune", root, "--keep-best", "2", "--monitor", "val_los", "--mode", "min"
    )
    assert (code, out) == (2, "")
    assert err == (
        "ckptkit: error: no checkpoint has a 'val_los' metric to rank by for --keep-best; "
        "the metrics there are: ['acc', 'val_loss']\n"
    )
    assert len(CheckpointStore(root).records()) == 6


def test_pin_and_unpin_persist(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pin and unpin change the manifest, so a new store object sees them."""
    code, out, _ = run(capsys, "pin", root, "3")
    assert (code, out) == (0, "pinned step 3: retention will never delete it\n")
    assert CheckpointStore(root).record(3).pinned
    assert run(capsys, "pin", root, "3")[1] == "step 3 was already pinned\n"
    assert run_json(capsys, "unpin", root, "best") == {
        "root": str(root),
        "step": 2,
        "pinned": False,
    }
    code, out, _ = run(capsys, "unpin", root, "3")
    assert code == 0 and out.startswith("unpinned step 3")
    assert not any(r.pinned for r in CheckpointStore(root).records())


def test_plot_writes_a_png(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plot draws the metric with best and stopped-at steps marked, into a PNG file."""
    image = tmp_path / "curve.png"
    code, out, err = run(capsys, "plot", root, "--metric", "val_loss", "-o", image)
    assert (code, err) == (0, "")
    assert out == f"wrote {image}: 6 steps of val_loss, best 0.4 at step 2, stopped at step 5\n"
    data = image.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_without_a_policy_marks_the_best_only_with_a_known_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no stopping policy, plot needs --metric, skips NaN, and marks a best given a mode."""
    store = CheckpointStore(tmp_path / "run")
    for step, value in enumerate([0.2, math.nan, 0.7, 0.5]):
        store.save(step, {"x": np.zeros(1)}, metrics={"score": value})
    store.pin(2)
    image = tmp_path / "score.png"
    code, _, err = run(capsys, "plot", store.root, "-o", image)
    assert code == 2 and err.startswith("ckptkit: error: pass --metric NAME")
    code, out, _ = run(capsys, "plot", store.root, "--metric", "score", "-o", image)
    assert code == 0 and out.endswith(
        "no best marked (pass --mode min or --mode max to mark one)\n"
    )
    code, out, _ = run(
        capsys, "plot", store.root, "--metric", "score", "--mode", "max", "-o", image
    )
    assert (code, out) == (0, f"wrote {image}: 4 steps of score, best 0.7 at step 2\n")
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_matplotlib_says_what_to_install(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With matplotlib missing, plot exits 2 with the pip command of the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run(capsys, "plot", root, "-o", tmp_path / "c.png")
    assert (code, out) == (2, "")
    assert err.endswith("pip install 'ckptkit-ml[plot]'\n") and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "no manifest"])
def test_a_path_that_is_not_a_store_is_refused_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A missing path, a file or a directory without manifest.json: one error line, exit 2."""
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("hello")
    elif kind == "no manifest":
        path.mkdir()
    reason = {"missing": "no such directory", "file": "not a directory"}.get(
        kind, "no manifest.json"
    )
    for command, *rest in (["ls"], ["show", "1"], ["verify"], ["pin", "1"]):
        assert run(capsys, command, path, *rest) == (
            2,
            "",
            f"ckptkit: error: {path} is not a ckptkit store ({reason})\n",
        )
    assert path.exists() == (kind != "missing")
    if kind == "no manifest":
        assert list(path.iterdir()) == []


def test_a_missing_step_is_a_usage_error(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A step that is not in the store: the CheckpointNotFoundError message, exit 2."""
    code, out, err = run(capsys, "show", root, "42")
    assert (code, out) == (2, "")
    assert (
        err
        == f"ckptkit: error: {root}: no checkpoint for step 42; the store has steps [0, 1, 2, 3, 4, 5]\n"
    )
    assert run(capsys, "show", root, "minus")[0] == 2


def test_a_corrupt_manifest_exits_1(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store error other than a missing step (here a corrupt manifest) exits 1, one line."""
    (root / "manifest.json").write_text("{not json")
    code, out, err = run(capsys, "ls", root)
    assert (code, out) == (1, "")
    assert err.startswith("ckptkit: error: ") and err.count("\n") == 1


def test_python_m_ckptkit_runs_without_traceback(tmp_path: Path) -> None:
    """`python -m ckptkit` prints the version, and reports errors in one line with status 2."""
    version = subprocess.run(
        [sys.executable, "-m", "ckptkit", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout == f"ckptkit {__version__}\n"
    missing = tmp_path / "nowhere"
    bad = subprocess.run(
        [sys.executable, "-m", "ckptkit", "ls", str(missing)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"ckptkit: error: {missing} is not a ckptkit store (no such directory)\n"
    assert not missing.exists()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and names each command and the exit statuses."""
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("ls", "show", "verify", "prune", "pin", "unpin", "plot", "exit status"):
        assert command in out


def test_reading_commands_change_nothing(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls, show, verify, plot and prune --dry-run create no lock file and sweep no leftovers."""
    (root / ".ckptkit.lock").unlink(missing_ok=True)
    (root / ".ckptkit-tmp-0123456789abcdef").mkdir()
    (root / "step_000000000099").mkdir()
    before = {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }
    commands = [
        ["ls", root],
        ["show", root, "best"],
        ["verify", root],
        ["plot", root, "--metric", "val_loss", "-o", tmp_path / "curve.png"],
        ["prune", root, "--keep-last", "1", "--dry-run"],
    ]
    for argv in commands:
        code, _, err = run(capsys, *argv)
        assert (code, err) == (0, ""), argv
    after = {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }
    assert after == before
    code, _, err = run(capsys, "pin", root, "2")  # a change sweeps, under the lock
    assert (code, err) == (0, "")
    assert not (root / ".ckptkit-tmp-0123456789abcdef").exists()
    assert (root / ".ckptkit.lock").exists()


def test_best_is_the_best_value_when_min_delta_holds_the_policy_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ls, show best and plot mark the lowest value, the checkpoint restore_best loads."""
    store = CheckpointStore(tmp_path / "run")
    policy = StoppingPolicy(monitor="val_loss", patience=2, min_delta=0.05)
    ckpt = Checkpointer(store, policy, Model())
    for step, value in enumerate([1.0, 0.98, 1.1, 1.2]):
        ckpt.step(step, {"val_loss": value})
    assert policy.should_stop and policy.best_step == 0
    assert ckpt.restore_best().step == 1
    listing = run_json(capsys, "ls", store.root)
    assert [c["step"] for c in listing["checkpoints"] if c["best"]] == [1]
    assert run_json(capsys, "show", store.root, "best")["step"] == 1
    code, out, _ = run(capsys, "plot", store.root, "-o", tmp_path / "curve.png")
    assert code == 0 and "best 0.98 at step 1" in out
    code, out, _ = run(capsys, "ls", store.root)
    assert "best by val_loss (min, from the stopping policy): step 1" in out
    assert "stopping policy: val_loss (min), last improvement 1 at step 0" in out
