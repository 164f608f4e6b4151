"""Exact resume: an Optax run SIGKILLed at random moments, or inside a save, ends bit for bit the same.

Each run is ``workers/train_worker.py`` in a fresh process: an MLP trained with a clipped
AdamW, minibatches shuffled by NumPy's global generator and noise drawn from a typed jax key,
checkpointed each epoch through ``Checkpointer(store, StoppingPolicy(...), JaxState(...))``.
A killed run is resumed by new processes until one finishes; its final parameters, the epoch
it stopped at and its last checkpoint must equal the uninterrupted run's.
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

pytest.importorskip("jax")

from ckptkit import CheckpointStore
from ckptkit.demo import trees_identical

WORKER = str(Path(__file__).parent / "workers" / "train_worker.py")
#: Random-kill trials; CKPTKIT_JAX_KILL_TRIALS=50 runs a long campaign.
TRIALS = int(os.environ.get("CKPTKIT_JAX_KILL_TRIALS", "2"))
PARALLEL = max(2, min(4, os.cpu_count() or 1))
#: Environment of every worker; the module's fixture adds a compilation cache shared by its
#: workers (the same executables, compiled once: most of a worker's time is starting up).
WORKER_ENV: dict[str, str] = {}
_T = TypeVar("_T")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@dataclass(frozen=True)
class Run:
    """One worker process: its exit status and the lines it printed."""

    code: int
    lines: list[str]

    def value(self, word: str) -> str | None:
        found = [line.split()[1] for line in self.lines if line.startswith(word + " ")]
        return found[-1] if found else None


def _env(kill_in_save: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CKPTKIT_KILL_IN_SAVE", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", **WORKER_ENV)
    if kill_in_save:
        env["CKPTKIT_KILL_IN_SAVE"] = str(kill_in_save)
    return env


def _start(root: Path, kill_in_save: int = 0) -> Any:
    return subprocess.Popen(
        [sys.executable, WORKER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(kill_in_save),
    )


def run_to_end(root: Path, kill_in_save: int = 0) -> Run:
    """Run a worker until it exits by itself (with ``kill_in_save=k``: dies in its k-th save)."""
    proc = _start(root, kill_in_save)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()  # only does something when the worker hung past the timeout
    return Run(proc.returncode, out.splitlines())


def run_and_kill(root: Path, saves: int, delay: float) -> Run:
    """SIGKILL a worker ``delay`` seconds after its ``saves``-th committed save (0: its start).

    The kill is synchronised on the worker's stdout; the bounded wait after it (on the
    process, so a run that finishes first is seen finishing) puts it anywhere in an epoch.
    """
    proc = _start(root)
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


def resume_to_end(root: Path, runs: list[Run]) -> Run:
    """Resume with new workers until one finishes; the runs before must have died by SIGKILL."""
    while runs[-1].code != 0:
        assert runs[-1].code == -signal.SIGKILL, runs[-1].lines
        assert len(runs) < 10, "resuming made no progress"
        runs.append(run_to_end(root))
    return runs[-1]


def in_parallel(jobs: list[Callable[[], _T]]) -> list[_T]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """The uninterrupted run and its store."""
    WORKER_ENV.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    root = tmp_path_factory.mktemp("reference") / "store"
    run = run_to_end(root)
    assert run.code == 0, run.lines
    return run, root


def check_same_as_reference(reference: tuple[Run, Path], root: Path, final: Run) -> None:
    """Same final parameters, same stopping epoch, same last checkpoint (state and policy)."""
    ref, ref_root = reference
    assert final.value("digest") == ref.value("digest"), "the resumed run diverged"
    assert final.value("stopped") == ref.value("stopped")
    ref_store, store = CheckpointStore(ref_root), CheckpointStore(root)
    ref_last, last = ref_store.latest(), store.latest()
    assert ref_last is not None and last is not None and ref_last.step == last.step
    assert trees_identical(dict(ref_last.metadata), dict(last.metadata))
    assert trees_identical(ref_store.load(last.step), store.load(last.step))


def test_the_reference_run_stops_early(reference: tuple[Run, Path]) -> None:
    """The uninterrupted run stops by patience well before its 60 epochs, after several saves."""
    run, _ = reference
    stopped = run.value("stopped")
    assert stopped is not None and stopped != "None" and 10 <= int(stopped) < 59


def test_sigkill_at_random_moments_resumes_bit_exactly(
    reference: tuple[Run, Path], tmp_path: Path
) -> None:
    """Runs killed at random moments (up to twice each), then resumed, end as the uninterrupted."""
    epochs = int(reference[0].value("stopped") or 0) + 1

    def trial(index: int) -> list[Run]:
        rng = random.Random(f"jax-{index}")
        root = tmp_path / str(index)
        # After at least one commit, before the last save; an epoch takes some 50 ms.
        runs = [run_and_kill(root, rng.randint(1, epochs - 3), rng.uniform(0, 0.1))]
        if runs[-1].code != 0 and rng.random() < 0.5:
            runs.append(run_and_kill(root, rng.randint(0, 2), rng.uniform(0, 0.1)))
        final = resume_to_end(root, runs)
        check_same_as_reference(reference, root, final)
        return runs

    results = in_parallel([lambda i=i: trial(i) for i in range(TRIALS)])
    killed = [run for runs in results for run in runs if run.code == -signal.SIGKILL]
    assert killed, "no run was killed: every worker finished before its kill"
    assert all(
        any(line.startswith("resumed ") and line != "resumed 0" for line in runs[-1].lines)
        for runs in results
    ), "a trial resumed from no checkpoint"


def test_sigkill_inside_a_save_resumes_bit_exactly(
    reference: tuple[Run, Path], tmp_path: Path
) -> None:
    """A run killed in the commit of its fifth save loses only that save and resumes exactly."""
    root = tmp_path / "store"
    runs = [run_to_end(root, kill_in_save=5)]
    assert runs[0].code == -signal.SIGKILL
    saved = [int(line.split()[1]) for line in runs[0].lines if line.startswith("saved ")]
    assert saved == [0, 1, 2, 3]
    assert CheckpointStore(root).latest().step == 3  # type: ignore[union-attr]
    final = resume_to_end(root, runs)
    assert runs[1].lines[0] == "resumed 4"
    check_same_as_reference(reference, root, final)
