"""Exact resume of ``model.fit``: a run SIGKILLed after a save, then resumed, ends bit for bit the same.

Each run is a worker script in a fresh process: ``fit_worker.py`` (Dropout, Adam, NumPy data
in order), ``stages_worker.py`` (a subclassed model fine-tuned in two stages),
``optimizers_worker.py`` (every Keras optimizer, fit twice on one store) and ``tape_worker.py``
(a GradientTape loop through TFState). A killed run is resumed by a new process; its final
variables must equal the uninterrupted run's byte for byte.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

WORKER = str(Path(__file__).parent / "workers" / "fit_worker.py")
#: Kill trials; CKPTKIT_KERAS_KILL_TRIALS=50 runs a long campaign.
TRIALS = int(os.environ.get("CKPTKIT_KERAS_KILL_TRIALS", "2"))
EPOCHS = 6

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@dataclass(frozen=True)
class Run:
    """One worker process: its exit status and the lines it printed."""

    code: int
    lines: list[str]

    @property
    def digest(self) -> str | None:
        """The final digest, if the run finished."""
        done = [line.split()[1] for line in self.lines if line.startswith("digest ")]
        return done[0] if done else None

    def first(self, prefix: str) -> int:
        """The number on the first line starting with ``prefix``."""
        return next(int(line.split()[1]) for line in self.lines if line.startswith(prefix))


def _start(root: Path, worker: str, args: tuple[str, ...]) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    env["TF_NUM_INTRAOP_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, worker, str(root), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def run_to_end(root: Path, worker: str = WORKER, *args: str, timeout: float = 120) -> Run:
    """Run a worker until it exits by itself."""
    proc = _start(root, worker, args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # only does something when the worker hung past the timeout
    return Run(proc.returncode, out.splitlines())


def run_and_kill(root: Path, after_saves: int, worker: str = WORKER) -> Run:
    """Run a worker and SIGKILL it as soon as it has printed ``after_saves`` ``saved`` lines."""
    proc = _start(root, worker, ())
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.strip())
        if sum(x.startswith("saved ") for x in lines) >= after_saves:
            break
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    return Run(proc.returncode, lines + rest.splitlines())


def test_fit_killed_after_a_save_resumes_bit_exactly(tmp_path: Path) -> None:
    """SIGKILL after a random epoch's save, resume in a new process: same final variables."""
    rng = random.Random(0)
    kills = [rng.randint(1, EPOCHS - 1) for _ in range(TRIALS)]

    def trial(index: int) -> tuple[Run, Run]:
        root = tmp_path / f"trial-{index}"
        killed = run_and_kill(root, kills[index])
        return killed, run_to_end(root)

    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        reference = pool.submit(run_to_end, tmp_path / "reference")
        trials = [pool.submit(trial, i) for i in range(TRIALS)]
        ref = reference.result()
        results = [t.result() for t in trials]

    assert ref.code == 0 and ref.digest is not None, ref.lines
    for (killed, resumed), after in zip(results, kills, strict=True):
        assert killed.code == -signal.SIGKILL, killed.lines
        assert resumed.code == 0, resumed.lines
        # Killed right after its after-th save (the kill may land later, never earlier).
        assert after <= resumed.first("resumed ") < EPOCHS, resumed.lines
        assert resumed.digest == ref.digest, f"resumed after {after} saves: diverged"


TAPE_WORKER = str(Path(__file__).parent / "workers" / "tape_worker.py")


@pytest.mark.tensorflow_only
def test_gradient_tape_loop_killed_after_a_save_resumes_bit_exactly(tmp_path: Path) -> None:
    """A GradientTape loop (TFState) SIGKILLed after a random step's save resumes to the same variables."""
    after = random.Random(1).randint(2, 10)
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_to_end, tmp_path / "reference", TAPE_WORKER)
        killed = run_and_kill(tmp_path / "killed", after, TAPE_WORKER)
        ref = reference.result()
    resumed = run_to_end(tmp_path / "killed", TAPE_WORKER)
    assert ref.code == 0 and ref.digest is not None, ref.lines
    assert killed.code == -signal.SIGKILL, killed.lines
    assert after <= resumed.first("resumed ") < 12, resumed.lines
    assert resumed.digest == ref.digest


STAGES_WORKER = str(Path(__file__).parent / "workers" / "stages_worker.py")


def test_two_stage_fine_tuning_of_a_subclassed_model_killed_anywhere_resumes_bit_exactly(
    tmp_path: Path,
) -> None:
    """Killed inside stage 2, the restarted script (both fits again) ends the same.

    In the new process the unbuilt subclassed model is built from the checkpoint, stage 1
    finds that a later stage followed and trains nothing, and stage 2 resumes.
    (tests/adapters/keras/test_stages.py kills between the stages, in one process.)
    """
    kills = {"in stage 2": 5}

    def trial(name: str) -> tuple[Run, Run]:
        root = tmp_path / name.replace(" ", "-")
        killed = run_and_kill(root, kills[name], STAGES_WORKER)
        return killed, run_to_end(root, STAGES_WORKER)

    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_to_end, tmp_path / "reference", STAGES_WORKER)
        trials = {name: pool.submit(trial, name) for name in kills}
        ref = reference.result()
        results = {name: t.result() for name, t in trials.items()}

    assert ref.code == 0 and ref.digest is not None, ref.lines
    assert ref.lines[:1] == ["stage 1 0"] and "stage 2 3" in ref.lines, ref.lines
    for name, (killed, resumed) in results.items():
        assert killed.code == -signal.SIGKILL, (name, killed.lines)
        assert resumed.code == 0, (name, resumed.lines)
        assert resumed.digest == ref.digest, f"killed {name}: diverged"
    # The restarts' first fit starts past stage 1's epochs: it trains nothing.
    for _, resumed in results.values():
        assert int(resumed.lines[0].split()[2]) >= 3, resumed.lines


OPTIMIZERS_WORKER = str(Path(__file__).parent / "workers" / "optimizers_worker.py")


def _digests(run: Run) -> dict[str, str]:
    errors = [line for line in run.lines if line.startswith("error ")]
    assert run.code == 0 and not errors, errors or run.lines
    return dict(line.split()[1:3] for line in run.lines if line.startswith("digest "))


def test_every_keras_optimizer_fit_twice_on_one_store_equals_one_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    """Each optimizer in keras.optimizers (and EMA, accumulation, schedules, wrappers) resumes exactly.

    One process fits each case for one epoch on its store; a new process fits it on to two
    epochs on the same store (resuming); a third fits two epochs uninterrupted. The model and
    optimizer variables must match bit for bit, for every case.
    """
    classes = {
        name
        for name, obj in vars(keras.optimizers).items()
        if isinstance(obj, type)
        and issubclass(obj, keras.optimizers.Optimizer)
        and obj is not keras.optimizers.Optimizer
    }
    assert {"Nadam", "Adafactor", "Lion", "Lamb", "Muon", "Ftrl", "LossScaleOptimizer"} <= classes
    limit = 400  # each process fits some 23 cases eagerly
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(
            run_to_end, tmp_path / "reference", OPTIMIZERS_WORKER, "reference", timeout=limit
        )
        first = run_to_end(tmp_path / "run", OPTIMIZERS_WORKER, "first", timeout=limit)
        resumed = run_to_end(tmp_path / "run", OPTIMIZERS_WORKER, "resume", timeout=limit)
        ref = reference.result()
    expected = _digests(ref)
    assert classes <= set(expected), f"not covered: {sorted(classes - set(expected))}"
    assert {"Adam+ema", "SGD+accumulation"} <= set(expected)
    assert set(_digests(first)) == set(expected)
    got = _digests(resumed)
    diverged = sorted(name for name in expected if got.get(name) != expected[name])
    assert not diverged, f"resumed differently from the uninterrupted fit: {diverged}"
    resumed_at = {
        line.split()[1]: line.split()[2] for line in resumed.lines if line.startswith("resumed ")
    }
    assert set(resumed_at.values()) == {"1"} and set(resumed_at) == set(expected)
