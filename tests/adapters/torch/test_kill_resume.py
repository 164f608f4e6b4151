"""Exact resume: torch runs SIGKILLed at random moments, and inside saves, end bit for bit the same.

Each run is ``workers/train_worker.py`` in a fresh process: an MLP with dropout, AdamW, StepLR
and a shuffling DataLoader, checkpointed through ``TorchState`` either at epoch ends (the
loader's seeded generator in the state) or also every few batches (a ``ResumableSampler`` in
the state); or a GPT-2-like model with tied embeddings, AdamW and a per-batch OneCycleLR, its
DataLoader (with a ResumableSampler) in the state, checkpointed every few batches. A killed
run is resumed by new processes until one finishes; its final parameters and its last
checkpoint must equal the uninterrupted run's byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore  # noqa: E402
from ckptkit.demo import trees_identical  # noqa: E402

WORKER = str(Path(__file__).parent / "workers" / "train_worker.py")
#: Random-kill trials per saving mode; CKPTKIT_TORCH_KILL_TRIALS=100 runs a long campaign.
TRIALS = int(os.environ.get("CKPTKIT_TORCH_KILL_TRIALS", "2"))
MODES = ("epoch", "mid", "lm")
FINAL_STEP = 80  # 5 epochs of 16 batches
SAVES = {"epoch": 5, "mid": 20, "lm": 20}  # saves in a run: at epoch ends; also every 4 batches
# Trials run side by side: each process spends most of its time importing torch.
PARALLEL = max(2, min(4, os.cpu_count() or 1))
_T = TypeVar("_T")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@dataclass(frozen=True)
class Run:
    """One worker process: its exit status and the lines it printed."""

    code: int
    lines: list[str]

    @property
    def digest(self) -> str | None:
        """The final parameter digest, if the run finished."""
        done = [line.split()[1] for line in self.lines if line.startswith("digest ")]
        return done[0] if done else None

    @property
    def killed_in_save(self) -> bool:
        """Whether the process died between a ``saving`` line and its ``saved`` line."""
        marks = [line for line in self.lines if line.startswith(("saving ", "saved "))]
        return bool(marks) and marks[-1].startswith("saving ")


def _env(kill_in_save: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CKPTKIT_KILL_IN_SAVE"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kill_in_save:
        env["CKPTKIT_KILL_IN_SAVE"] = str(kill_in_save)
    return env


def _start(root: Path, mode: str, *args: str, kill_in_save: int = 0) -> Any:
    return subprocess.Popen(
        [sys.executable, WORKER, str(root), mode, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(kill_in_save),
    )


def run_to_end(root: Path, mode: str, *args: str, kill_in_save: int = 0) -> Run:
    """Run a worker until it exits by itself (with ``kill_in_save=k``: dies in its k-th save)."""
    proc = _start(root, mode, *args, kill_in_save=kill_in_save)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()  # only does something when the worker hung past the timeout
    return Run(proc.returncode, out.splitlines())


def run_and_kill(root: Path, mode: str, saves: int, delay: float) -> Run:
    """Run a worker and SIGKILL it ``delay`` seconds after its ``saves``-th save (0: its start).

    The kill is synchronised on the worker's stdout; the extra delay (waiting on the process,
    so a run that finishes first is seen finishing) puts it anywhere: in a batch, in a save,
    in the epoch-end evaluation.
    """
    proc = _start(root, mode)
    assert proc.stdout is not None
    lines: list[str] = []
    saved = 0
    for line in proc.stdout:
        lines.append(line.strip())
        saved += line.startswith("saved ")
        if saved >= saves:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=delay)
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    lines += rest.splitlines()
    assert proc.returncode in (0, -signal.SIGKILL), lines
    return Run(proc.returncode, lines)


def resume_to_end(root: Path, mode: str, runs: list[Run]) -> Run:
    """Resume with new workers until one finishes; the killed runs before must have died by SIGKILL."""
    while runs[-1].code != 0:
        assert runs[-1].code == -signal.SIGKILL, runs[-1].lines
        assert len(runs) < 10, "resuming made no progress"
        runs.append(run_to_end(root, mode))
    return runs[-1]


def in_parallel(jobs: list[Callable[[], _T]]) -> list[_T]:
    """Run the jobs on a few threads (each mostly waits on its worker process)."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted runs: per mode, the final digest and store, and a mid run saving little."""
    root = tmp_path_factory.mktemp("reference")
    runs = in_parallel(
        [
            lambda: run_to_end(root / "epoch", "epoch"),
            lambda: run_to_end(root / "mid", "mid"),
            lambda: run_to_end(root / "mid-rare", "mid", "1000"),
            lambda: run_to_end(root / "lm", "lm"),
        ]
    )
    for run in runs:
        assert run.code == 0, run.lines
    return {
        "epoch": runs[0].digest,
        "mid": runs[1].digest,
        "mid-rare": runs[2].digest,
        "lm": runs[3].digest,
        "stores": {mode: root / mode for mode in MODES},
    }


def check_same_as_reference(reference: dict[str, Any], mode: str, root: Path, final: Run) -> None:
    """The resumed run's digest and last checkpoint equal the uninterrupted run's, bitwise."""
    assert final.digest == reference[mode], f"{mode}: the resumed run diverged"
    ref_store, store = CheckpointStore(reference["stores"][mode]), CheckpointStore(root)
    ref_last, last = ref_store.latest(), store.latest()
    assert ref_last is not None and last is not None
    assert ref_last.step == last.step == FINAL_STEP
    assert trees_identical(dict(ref_last.metadata), dict(last.metadata))  # the policy's state
    assert trees_identical(dict(ref_last.metrics), dict(last.metrics))
    assert trees_identical(ref_store.load(FINAL_STEP), store.load(FINAL_STEP))


def test_uninterrupted_runs_are_deterministic_and_saving_does_not_perturb_them(
    reference: dict[str, Any],
) -> None:
    """Mid-epoch saves leave the run unchanged: saving every 4 or every 1000 batches, same digest."""
    assert reference["mid"] == reference["mid-rare"]
    assert reference["epoch"] != reference["mid"]  # a different order source, a different run
    assert all(len(reference[m]) == 64 for m in MODES)


def test_sigkill_at_random_moments_resumes_bit_exactly(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    """Runs killed at random moments (up to twice each), then resumed, end as the uninterrupted."""

    def trial(mode: str, index: int) -> list[Run]:
        rng = random.Random(f"{mode}-{index}")
        root = tmp_path / f"{mode}-{index}"
        # After at least one commit, anywhere before the last save; a save takes some 10 ms,
        # an epoch some 100 ms.
        runs = [run_and_kill(root, mode, rng.randint(1, SAVES[mode] - 2), rng.uniform(0, 0.15))]
        if runs[-1].code != 0 and rng.random() < 0.5:
            # Kill the resumed run too, maybe before it commits anything.
            runs.append(run_and_kill(root, mode, rng.randint(0, 2), rng.uniform(0, 0.15)))
        final = resume_to_end(root, mode, runs)
        check_same_as_reference(reference, mode, root, final)
        return runs

    jobs = [lambda m=mode, i=i: trial(m, i) for mode in MODES for i in range(TRIALS)]
    results = in_parallel(jobs)
    killed = [run for runs in results for run in runs if run.code == -signal.SIGKILL]
    in_save = sum(run.killed_in_save for run in killed)
    resumed_mid_epoch = sum(
        any(line.startswith("resumed ") and int(line.split()[1]) % 16 for line in runs[-1].lines)
        for runs in results
    )
    assert killed, "no run was killed: every worker finished before its kill"
    print(
        f"{len(results)} trials, {len(killed)} kills ({in_save} inside a save), "
        f"{resumed_mid_epoch} trials ending in a resume from inside an epoch"
    )


def test_sigkill_inside_a_save_resumes_bit_exactly(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    """A run killed in the commit of its third save loses only that save and resumes exactly."""

    def chain(mode: str) -> list[Run]:
        root = tmp_path / mode
        runs = [run_to_end(root, mode, kill_in_save=3)]
        assert runs[0].code == -signal.SIGKILL and runs[0].killed_in_save
        saved = [int(line.split()[1]) for line in runs[0].lines if line.startswith("saved ")]
        assert len(saved) == 2
        # The torn third save is not listed (its directory is swept when the store is opened).
        assert [r.step for r in CheckpointStore(root).records()] == saved
        final = resume_to_end(root, mode, runs)
        check_same_as_reference(reference, mode, root, final)
        return runs

    in_parallel([lambda m=mode: chain(m) for mode in MODES])
