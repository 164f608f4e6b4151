"""Crash tests: real writer processes killed with SIGKILL, at chosen and at random instants."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckptkit import CheckpointStore
from ckptkit._manifest import CHECKPOINT_DIR
from tests.helpers.crash_writer import expected_loss, expected_state, open_store

WRITER = str(Path(__file__).parent / "helpers" / "crash_writer.py")
REPO = str(Path(__file__).parent.parent)
#: Random-instant kill trials; CKPTKIT_CRASH_TRIALS=2000 runs a long campaign.
TRIALS = int(os.environ.get("CKPTKIT_CRASH_TRIALS", "25"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def run_writer(root: Path, steps: int, kill_at: int | None = None) -> tuple[int, list[int]]:
    """Run the writer to completion (or its self-kill); return its exit code and committed steps."""
    args = [sys.executable, WRITER, str(root), str(steps)]
    if kill_at is not None:
        args.append(str(kill_at))
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    committed = [
        int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("committed")
    ]
    return proc.returncode, committed


def check_store(root: Path, committed: list[int]) -> CheckpointStore:
    """Every listed checkpoint loads with its exact content, the newest committed is kept, no leak."""
    before = sorted(p.name for p in root.iterdir())
    leftovers = [n for n in before if n.startswith(".ckptkit-tmp-")]
    store = open_store(str(root))
    records = store.records()
    listed = {r.directory for r in records}
    unlisted = [n for n in before if CHECKPOINT_DIR.fullmatch(n) and n not in listed]
    # A crash leaves at most the one pending write: its temporary directory or its renamed but
    # unlisted directory, its manifest temporary, and the directories its retention dropped.
    assert len([n for n in leftovers if not n.endswith(".json")]) <= 1, leftovers
    assert len([n for n in leftovers if n.endswith(".json")]) <= 1, leftovers
    assert len(unlisted) <= 3, unlisted
    for record in records:
        state = store.load(record.step)
        want = expected_state(record.step, state["version"])
        assert state["step"] == record.step
        assert state["small"]["t"] == want["small"]["t"]
        for got_a, want_a in (
            (state["weights"], want["weights"]),
            (state["small"]["bias"], want["small"]["bias"]),
        ):
            assert got_a.dtype == want_a.dtype and got_a.shape == want_a.shape
            assert got_a.tobytes() == want_a.tobytes()
        assert record.metrics["loss"] == expected_loss(record.step)
    if committed:
        assert committed[-1] in store, f"committed step {committed[-1]} was lost"
    # Opening and loading changed nothing; the next change (here a prune that keeps
    # everything) sweeps what the crash left.
    assert sorted(p.name for p in root.iterdir()) == before
    assert not CheckpointStore(root).prune().delete
    after = sorted(p.name for p in root.iterdir())
    assert after == sorted([".ckptkit.lock", "manifest.json", *listed]), after
    for record in records:
        names = sorted(p.name for p in (root / record.directory).iterdir())
        assert names == sorted(f.name for f in record.files)
    return store


def test_sigkill_at_every_file_system_call_of_a_save(tmp_path: Path) -> None:
    """Killing the writer at each write/fsync/rename/replace/unlink of the protocol loses nothing."""
    root = tmp_path / "store"
    # Fill the store so that saves also run retention deletions.
    code, committed = run_writer(root, 6)
    assert code == 0 and committed == list(range(6))
    k = 1
    while True:
        code, committed_now = run_writer(root, 1, kill_at=k)
        committed += committed_now
        check_store(root, committed)
        if code == 0:
            # The save finished before the k-th call: every instant of one save has been hit.
            break
        assert code == -signal.SIGKILL
        k += 1
    assert k > 8, f"a save made only {k - 1} file-system calls; the kill points did not cover it"
    print(f"killed at each of {k - 1} file-system calls of one save; all recovered")


def test_sigkill_during_an_overwrite_leaves_the_old_or_the_new_state_whole(tmp_path: Path) -> None:
    """overwrite=True is atomic: killed at any call, the step holds the old or the new state, whole."""
    k = 1
    outcomes = set()
    while True:
        root = tmp_path / f"k{k}"
        code, committed = run_writer(root, 3)
        assert code == 0
        code, _ = run_writer(root, 0, kill_at=k)
        store = check_store(root, committed)
        outcomes.add(store.load(2)["version"])
        if code == 0:
            break
        assert code == -signal.SIGKILL
        k += 1
    assert outcomes == {0, 1}


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    """A writer killed at random moments, many times over, never costs a committed checkpoint."""
    root = tmp_path / "store"
    rng = random.Random(1234)
    committed: list[int] = []
    env = {**os.environ, "PYTHONPATH": REPO}
    killed_mid_save = 0
    for _ in range(TRIALS):
        proc = subprocess.Popen(
            [sys.executable, WRITER, str(root), "1000"], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        # Let it commit at least one checkpoint, then kill it after a random further delay.
        seen_begin = None
        for line in proc.stdout:
            word, step = line.split()
            if word == "committed":
                committed.append(int(step))
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        for line in rest.splitlines():
            word, step = line.split()
            if word == "committed":
                committed.append(int(step))
            seen_begin = int(step) if word == "begin" else None
        assert proc.returncode == -signal.SIGKILL
        killed_mid_save += seen_begin is not None
        check_store(root, committed)
    assert committed, "no checkpoint was ever committed"
    print(f"{TRIALS} kill trials, {killed_mid_save} inside a save, {len(committed)} commits")
