"""PreemptionGuard: the flag, chaining, the second-signal rule, and real signals to a training run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
from ckptkit._preemption import DEFAULT_SIGNALS, PreemptionGuard
from tests.helpers.preempt_worker import PAUSE_BATCH, SAVE_EVERY

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGUSR1 and kill are POSIX")

WORKER = str(Path(__file__).parent / "helpers" / "preempt_worker.py")
REPO = str(Path(__file__).parent.parent)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
#: CKPTKIT_PREEMPT_EVERY_EPOCH=1 signals the training worker in every epoch, not just one.
EVERY_EPOCH = os.environ.get("CKPTKIT_PREEMPT_EVERY_EPOCH") == "1"


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    """Whatever a test does, the test process gets its signal handlers back."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Recorder:
    """A Python signal handler that remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.calls.append(signum)


# In-process: signal.raise_signal runs the Python handler before it returns.


def test_install_and_uninstall_restore_the_previous_handlers() -> None:
    """uninstall() puts back the very handler objects that were there, and a context does too."""
    mine = Recorder()
    signal.signal(signal.SIGUSR1, mine)
    before = {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS}
    guard = PreemptionGuard()
    assert guard.install() is guard and guard.installed
    assert all(signal.getsignal(sig) is not before[sig] for sig in DEFAULT_SIGNALS)
    guard.uninstall()
    guard.uninstall()  # a no-op once uninstalled
    assert not guard.installed
    assert {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS} == before
    assert signal.getsignal(signal.SIGUSR1) is mine
    with PreemptionGuard(signals=[signal.SIGUSR1]) as other:
        assert other.installed and signal.getsignal(signal.SIGUSR1) is not mine
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_a_signal_sets_the_flag_and_chains_to_a_python_handler() -> None:
    """The handler records the signal and calls the previous Python handler once with it."""
    mine = Recorder()
    signal.signal(signal.SIGUSR1, mine)
    with PreemptionGuard() as guard:
        assert not guard.requested and guard.signal is None and guard.count == 0
        signal.raise_signal(signal.SIGUSR1)
        assert guard.requested and guard.signal is signal.SIGUSR1 and guard.count == 1
        assert mine.calls == [signal.SIGUSR1]
    assert guard.requested  # uninstalling keeps the request
    assert repr(guard) == (
        "PreemptionGuard(signals=(SIGTERM, SIGINT, SIGUSR1), installed=False, signal=SIGUSR1)"
    )
    guard.reset()
    assert not guard.requested and guard.signal is None and guard.count == 0


def test_the_first_signal_wins_and_another_signal_is_only_counted() -> None:
    """A different signal after the request is counted and chained, never escalated."""
    first, second = Recorder(), Recorder()
    signal.signal(signal.SIGUSR1, first)
    signal.signal(signal.SIGUSR2, second)
    with PreemptionGuard(signals=(signal.SIGUSR2, signal.SIGUSR1)) as guard:
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR1)
        assert guard.signal is signal.SIGUSR2 and guard.count == 2
        assert (first.calls, second.calls) == ([signal.SIGUSR1], [signal.SIGUSR2])
        assert signal.getsignal(signal.SIGUSR1) is not first  # still the guard's


def test_sigint_never_raises_keyboardinterrupt_until_the_second_one() -> None:
    """A first Ctrl-C is only recorded; a second gets Python's handler back and raises."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with PreemptionGuard() as guard:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the first SIGINT raised KeyboardInterrupt")
        assert guard.signal is signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert guard.count == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_delivery_goes_to_the_previous_python_handler() -> None:
    """The second delivery restores the previous handler and re-delivers: it is called twice."""
    mine = Recorder()
    signal.signal(signal.SIGUSR1, mine)
    with PreemptionGuard(signals=[signal.SIGUSR1]):
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert mine.calls == [signal.SIGUSR1, signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is mine
        signal.raise_signal(signal.SIGUSR1)  # now the previous handler's alone
        assert len(mine.calls) == 3


def test_a_handler_installed_over_the_guard_is_never_replaced_by_it() -> None:
    """A later handler chaining to the guard's stays in place on a second delivery."""
    first = Recorder()
    signal.signal(signal.SIGUSR1, first)  # where a wrong escalation would deliver
    with PreemptionGuard(signals=[signal.SIGUSR1]) as guard:
        inner = signal.getsignal(signal.SIGUSR1)
        assert callable(inner)
        later = Recorder()

        def chaining(signum: int, frame: Any) -> None:
            later(signum, frame)
            inner(signum, frame)

        signal.signal(signal.SIGUSR1, chaining)
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert guard.count == 2 and len(later.calls) == len(first.calls) == 2
        assert signal.getsignal(signal.SIGUSR1) is chaining


def test_install_outside_the_main_thread_raises() -> None:
    """install() from another thread says why and changes no handler."""
    before = {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS}
    errors: list[BaseException] = []
    guard = PreemptionGuard()

    def install() -> None:
        try:
            guard.install()
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=install, name="trainer")
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "thread 'trainer'" in str(errors[0]) and "only lets the main thread" in str(errors[0])
    assert not guard.installed
    assert {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS} == before


def test_option_and_state_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad signals, a second install and a handler set outside Python are refused clearly."""
    with pytest.raises(ValueError, match="signals is empty"):
        PreemptionGuard(signals=())
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        PreemptionGuard(signals=[signal.SIGKILL])
    with pytest.raises(ValueError, match="12345 is not a signal"):
        PreemptionGuard(signals=[12345])
    with pytest.raises(ValueError, match="True is not a signal"):
        PreemptionGuard(signals=[True])
    assert PreemptionGuard(signals=[int(signal.SIGUSR1), signal.SIGUSR1]).signals == (
        signal.SIGUSR1,
    )
    with PreemptionGuard() as guard, pytest.raises(RuntimeError, match="already installed"):
        guard.install()
    before = {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS}
    real = signal.getsignal
    monkeypatch.setattr(
        signal, "getsignal", lambda sig: None if sig == signal.SIGUSR1 else real(sig)
    )
    with pytest.raises(RuntimeError, match="handler of SIGUSR1 was set outside Python"):
        PreemptionGuard().install()
    monkeypatch.undo()
    assert {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS} == before


class Walk:
    """A training state: weights moved by a seeded generator, and the generator."""

    def __init__(self) -> None:
        self.w = np.full(3, 4.0)
        self.rng = np.random.default_rng(7)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].copy()
        self.rng.bit_generator.state = state["rng"]

    def train(self) -> float:
        self.w = 0.85 * self.w + self.rng.normal(size=3) * 0.4
        return float(np.abs(self.w).sum())


def walk(root: Path, *, signal_at: int | None = None, **kwargs: Any) -> tuple[Walk, list[Any]]:
    """Train with new objects, as a new process would; SIGUSR1 arrives in epoch ``signal_at``."""
    model = Walk()
    store = CheckpointStore(root, monitor="loss")
    policy = StoppingPolicy(monitor="loss", mode="min", patience=3)
    decisions = []
    with PreemptionGuard() as guard:
        ckpt = Checkpointer(store, policy, model, preemption=guard, **kwargs)
        for epoch in range(ckpt.resume(), 60):
            loss = model.train()
            if epoch == signal_at:
                signal.raise_signal(signal.SIGUSR1)
            decisions.append(ckpt.step(epoch, {"loss": loss}))
            if ckpt.should_stop or ckpt.preempted:
                break
    return model, decisions


@pytest.mark.parametrize(
    "options", [{"save_every": 1}, {"save_every": 100}, {"save_best_only": True}], ids=str
)
def test_a_request_saves_the_step_off_schedule_and_the_run_resumes_exactly(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Whatever the schedule, the signalled step is committed with the policy, once, and resumes."""
    ref, ref_decisions = walk(tmp_path / "ref", **options)
    stop = ref_decisions[-1].step
    cuts = [d.step for d in ref_decisions if not d.improved and d.step < stop]
    assert cuts, "the reference run never had a step without an improvement"
    root = tmp_path / "cut"
    _, first = walk(root, signal_at=cuts[0], **options)
    assert first[-1].step == cuts[0] and not first[-1].should_stop
    record = CheckpointStore(root).latest()
    assert record is not None and record.step == cuts[0]
    assert record.metadata["ckptkit"]["policy"]["wait"] == first[-1].wait > 0
    # Off schedule, the uninterrupted run did not save that step.
    assert (cuts[0] in CheckpointStore(tmp_path / "ref")) == (options == {"save_every": 1})
    model, second = walk(root, **options)
    assert first + second == ref_decisions
    assert model.w.tobytes() == ref.w.tobytes()


def test_preempted_waits_for_a_step_that_saved(tmp_path: Path) -> None:
    """A request caught after a step's check turns preempted True only once the next step saved."""
    store = CheckpointStore(tmp_path)
    model = Walk()
    with PreemptionGuard(signals=[signal.SIGUSR1]) as guard:
        ckpt = Checkpointer(store, None, model, save_every=10, preemption=guard)
        ckpt.step(0)
        signal.raise_signal(signal.SIGUSR1)
        assert guard.requested and not ckpt.preempted
        assert store.latest() is None
        ckpt.step(1)
        assert ckpt.preempted and [r.step for r in store.records()] == [1]
        guard.reset()
        ckpt.step(2)
        assert not ckpt.preempted and [r.step for r in store.records()] == [1]
    with pytest.raises(TypeError, match="preemption is a bool; pass a PreemptionGuard or None"):
        Checkpointer(store, None, model, preemption=True)  # type: ignore[arg-type]


# Real signals sent to a training subprocess.


class Worker:
    """A preempt_worker process and the events it has printed so far."""

    def __init__(self, root: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": REPO}
        # The same float summation order in every worker: one BLAS thread.
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(root), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr = ""

    def wait_for(self, name: str) -> dict[str, Any]:
        """Read events up to the one called ``name`` (the worker then blocks on stdin)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))
            if self.events[-1]["event"] == name:
                return self.events[-1]
        raise AssertionError(f"the worker ended before {name!r}: {self.finish()} {self.stderr}")

    def go_on(self) -> None:
        """Let the worker's blocking read return."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close stdin, read the remaining events, and return the exit code."""
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.proc.stdin.close()
        self.events += [json.loads(line) for line in self.proc.stdout.read().splitlines()]
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.wait(timeout=120)

    def steps(self) -> list[dict[str, Any]]:
        """The ``step`` events: each epoch's decision and whether it was saved."""
        return [e for e in self.events if e["event"] == "step"]

    def decisions(self) -> list[dict[str, Any]]:
        """The policy's decision at each epoch, floats in hex."""
        return [{k: v for k, v in e.items() if k != "saved"} for e in self.steps()]


def run_worker(root: Path) -> Worker:
    """Run an uninterrupted worker on ``root`` to its end."""
    worker = Worker(root)
    assert worker.finish() == 0, worker.stderr
    return worker


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """An uninterrupted run."""
    return run_worker(tmp_path_factory.mktemp("reference"))


def saved_steps(worker: Worker) -> set[int]:
    return {s["step"] for s in worker.steps() if s["saved"]}


def epoch_off_schedule(reference: Worker) -> int:
    """The first epoch the reference run did not save: no improvement, and not due."""
    unsaved = [s["step"] for s in reference.steps() if not s["saved"]]
    assert unsaved and unsaved[0] > 0 and (unsaved[0] + 1) % SAVE_EVERY != 0
    return int(unsaved[0])


@pytest.mark.parametrize("sig", DEFAULT_SIGNALS, ids=lambda sig: sig.name)
def test_a_signal_mid_epoch_commits_that_epoch_and_the_restart_ends_identically(
    tmp_path: Path, reference: Worker, sig: signal.Signals
) -> None:
    """Signalled mid-epoch, the worker commits that epoch, exits 0; a restart matches bit for bit."""
    epochs = [epoch_off_schedule(reference)]
    if EVERY_EPOCH:
        epochs = [s["step"] for s in reference.steps()][:-1]  # all but the stop
    for epoch in epochs:
        signal_and_resume(tmp_path / f"epoch{epoch}", reference, sig, epoch)
    print(f"{sig.name} in epochs {epochs}: committed, resumed, identical")


def signal_and_resume(root: Path, reference: Worker, sig: signal.Signals, epoch: int) -> None:
    """Signal a worker in the middle of ``epoch``, check what it committed, resume, compare."""
    worker = Worker(root, "--pause", str(epoch))
    assert worker.wait_for("ready") == {"event": "ready", "step": epoch, "batch": PAUSE_BATCH}
    worker.proc.send_signal(sig)
    assert worker.finish() == 0, worker.stderr  # closing stdin lets the paused batch go on
    assert worker.events[-1] == {
        "event": "preempted",
        "step": epoch,
        "signal": sig.name,
        "count": 1,
        "calls": {},
    }
    store = CheckpointStore(root)
    latest = store.latest()
    assert latest is not None and latest.step == epoch
    # Beyond the reference run's checkpoints up to there, only the signalled epoch's.
    expected = {s for s in saved_steps(reference) if s < epoch} | {epoch}
    assert saved_steps(worker) == {r.step for r in store.records()} == expected

    resumed = run_worker(root)
    assert resumed.events[0] == {"event": "start", "restored": epoch}
    assert worker.decisions() + resumed.decisions() == reference.decisions()
    assert resumed.events[-1] == reference.events[-1]  # final and best digests
    assert {r.step for r in store.records()} == saved_steps(reference) | {epoch}


@pytest.mark.parametrize(
    ("sig", "text"),
    [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_second_signal_stops_at_once_and_commits_nothing(
    tmp_path: Path, reference: Worker, sig: signal.Signals, text: str
) -> None:
    """A second SIGINT raises KeyboardInterrupt, a second SIGTERM kills; the store is as it was."""
    epoch = epoch_off_schedule(reference)
    worker = Worker(tmp_path, "--pause", str(epoch), "--hold")
    worker.wait_for("ready")
    worker.proc.send_signal(sig)
    worker.go_on()
    assert worker.wait_for("requested") == {"event": "requested", "signal": sig.name}
    worker.proc.send_signal(sig)
    assert worker.finish() == -sig, worker.stderr
    assert text in worker.stderr
    assert [e["event"] for e in worker.events][-2:] == ["ready", "requested"]
    store = CheckpointStore(tmp_path)
    assert {r.step for r in store.records()} == saved_steps(worker)
    latest = store.latest()
    assert latest is not None and latest.step == max(saved_steps(worker)) < epoch
    assert store.load()["params"]["w1"].shape == (30, 32)  # the last commit loads and verifies


def test_the_previous_python_handler_is_called_once(tmp_path: Path, reference: Worker) -> None:
    """A handler the worker had installed before the guard gets the signal once, and still exits 0."""
    epoch = epoch_off_schedule(reference)
    worker = Worker(tmp_path, "--pause", str(epoch), "--chain")
    worker.wait_for("ready")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.finish() == 0, worker.stderr
    event = worker.events[-1]
    assert (event["event"], event["step"], event["calls"]) == ("preempted", epoch, {"SIGTERM": 1})
