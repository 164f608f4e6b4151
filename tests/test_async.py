"""save_async: the state is copied before it returns, committed in the background, one at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
import errno
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptkit._store_save as store_save
from ckptkit import CheckpointExistsError, CheckpointRecord, CheckpointStore, StoreWriteError
from ckptkit._async import PendingSave


class Gate:
    """Holds every background write until ``release`` is set; ``order`` logs each write."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.order: list[str] = []


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Writes of checkpoint files wait for the gate; it opens at the end of the test regardless."""
    held = Gate()
    real = store_save.write_files

    def gated(storage: Any, job: Any, *args: Any) -> Any:
        held.order.append(f"start {job.step}")
        held.release.wait()
        result = real(storage, job, *args)
        held.order.append(f"end {job.step}")
        return result

    monkeypatch.setattr(store_save, "write_files", gated)
    yield held
    held.release.set()


def _full(fd: int, data: Any) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _failed_in_background(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, step: int
) -> PendingSave:
    """A save_async of ``step`` that failed with ENOSPC, and whose error nobody collected."""
    with monkeypatch.context() as m:
        m.setattr(os, "write", _full)
        pending = store.save_async(step, {"w": np.ones(3)})
        futures.wait([pending])
    return pending


def _raised_without_waiting(call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, run in a thread; fails the test if it is still blocked after 60 s."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)  # a deadline for a broken build, not synchronisation
    assert not thread.is_alive(), "the call waited for the save in flight instead of raising"
    return raised[0] if raised else None


def test_the_checkpoint_holds_the_state_as_it_was_when_save_async_returned(tmp_path: Path) -> None:
    """Changing the arrays right after save_async returns does not change what is committed."""
    store = CheckpointStore(tmp_path)
    w = np.arange(1000, dtype=np.float32)
    pending = store.save_async(0, {"w": w, "n": 3}, metrics={"loss": 1.0})
    w += 100
    record = pending.result()
    assert record.step == 0 and pending.done()
    loaded = store.load(0)
    np.testing.assert_array_equal(loaded["w"], np.arange(1000, dtype=np.float32))
    assert loaded["n"] == 3
    assert store.records() == [record]


def test_buffers_are_reused_across_saves_of_the_same_shapes(tmp_path: Path) -> None:
    """A second save of the same layout copies into the same buffer; a new layout gets a new one."""
    store = CheckpointStore(tmp_path)
    state = {"a": np.zeros(10), "b": np.ones((2, 3), dtype=np.int8)}
    store.save_async(0, state).result()
    buffer = store._buffers._buffer
    assert buffer is not None and buffer.nbytes == 80 + 6
    store.save_async(1, state).result()
    assert store._buffers._buffer is buffer
    store.save_async(2, {"a": np.zeros(11)}).result()
    assert store._buffers._buffer is not buffer and store._buffers.nbytes == 88
    for step in (0, 1):
        assert store.load(step)["b"].tolist() == [[1, 1, 1], [1, 1, 1]]


def test_one_save_in_flight_the_next_waits_for_it(tmp_path: Path, monkeypatch: Any) -> None:
    """A second save_async does not start writing until the first one has committed."""
    store = CheckpointStore(tmp_path)
    release = threading.Event()
    order: list[str] = []
    real = store_save.write_files

    def gated(storage: Any, job: Any, *args: Any) -> Any:
        order.append(f"start {job.step}")
        if job.step == 0:
            release.wait()
        result = real(storage, job, *args)
        order.append(f"end {job.step}")
        return result

    monkeypatch.setattr(store_save, "write_files", gated)
    first = store.save_async(0, {"w": np.zeros(3)})
    waiter = threading.Thread(target=lambda: store.save_async(1, {"w": np.ones(3)}))
    waiter.start()
    assert not first.done()
    release.set()
    waiter.join()
    store.wait()
    assert order == ["start 0", "end 0", "start 1", "end 1"]
    assert [r.step for r in store.records()] == [0, 1]


def test_a_failed_background_save_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the background is raised once, by the next save, and the store is unchanged."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    pending = _failed_in_background(store, monkeypatch, 1)
    assert repr(pending) == "PendingSave(step=1, failed)"
    with pytest.raises(StoreWriteError, match="No space left on device"):
        store.save_async(2, {"w": np.ones(3)})
    assert [r.step for r in store.records()] == [0]
    assert store.load(0)["w"].tolist() == [0.0, 0.0, 0.0]
    store.save_async(2, {"w": np.ones(3)}).result()  # raised once, then the store goes on
    assert [r.step for r in store.records()] == [0, 2]


@pytest.mark.parametrize("call", ["wait", "close", "save", "save_async", "prune", "pin", "unpin"])
def test_each_waiting_call_raises_the_background_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Each call that waits raises the error of a background save nobody collected, once."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    _failed_in_background(store, monkeypatch, 1)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        if call in ("save", "save_async"):
            getattr(store, call)(2, {"w": np.ones(3)})
        elif call in ("pin", "unpin"):
            getattr(store, call)(0)
        else:
            getattr(store, call)()
    assert store.wait() is None
    assert [r.step for r in store.records()] == [0]


def test_an_error_collected_by_result_is_not_raised_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once PendingSave.result() has raised the error, the next save does not raise it again."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    pending = _failed_in_background(store, monkeypatch, 1)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        pending.result()
    assert store.save(1, {"w": np.ones(3)}).step == 1


def test_an_error_collected_by_exception_is_not_raised_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PendingSave.exception() returns the error and counts as collecting it, like result()."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    pending = _failed_in_background(store, monkeypatch, 1)
    error = pending.exception()
    assert isinstance(error, StoreWriteError) and error.errno == errno.ENOSPC
    assert store.wait() is None
    assert store.save(1, {"w": np.ones(3)}).step == 1
    assert [r.step for r in store.records()] == [0, 1]


def test_disk_errors_in_the_background_are_store_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC during a background commit surfaces as StoreWriteError and leaves the store intact."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    before = (tmp_path / "manifest.json").read_bytes()
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    pending = store.save_async(1, {"w": np.ones(3)})
    with pytest.raises(StoreWriteError, match="No space left on device") as e:
        pending.result()
    monkeypatch.setattr(os, "write", real_write)
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckptkit-tmp-")]


def test_a_state_that_cannot_be_saved_is_refused_before_returning(tmp_path: Path) -> None:
    """Unsupported leaves raise from save_async itself; nothing goes to the background."""
    store = CheckpointStore(tmp_path)
    with pytest.raises(TypeError, match="set"):
        store.save_async(0, {"s": {1, 2}})
    assert store._pending is None and store.records() == []


def test_result_with_a_timeout_raises_while_in_flight(tmp_path: Path, monkeypatch: Any) -> None:
    """PendingSave.result(timeout) raises TimeoutError while the commit is still running."""
    store = CheckpointStore(tmp_path)
    release = threading.Event()
    real = store_save.write_files

    def gated(*args: Any) -> Any:
        release.wait()
        return real(*args)

    monkeypatch.setattr(store_save, "write_files", gated)
    pending = store.save_async(0, {"w": np.zeros(3)})
    with pytest.raises(TimeoutError, match="step 0 is still in flight"):
        pending.result(timeout=0.01)
    assert "in flight" in repr(pending)
    release.set()
    assert pending.result().step == 0
    assert isinstance(pending, PendingSave) and "done" in repr(pending)


def test_a_pending_save_is_finished_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that exits right after save_async still commits the checkpoint."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from ckptkit import CheckpointStore
        store = CheckpointStore({str(tmp_path)!r})
        store.save_async(7, {{"w": np.arange(1 << 20, dtype=np.float64)}})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    loaded = CheckpointStore(tmp_path).load(7)
    np.testing.assert_array_equal(loaded["w"], np.arange(1 << 20, dtype=np.float64))


def test_the_store_is_a_context_manager_that_finishes_the_save(tmp_path: Path) -> None:
    """Leaving a with block waits for the save in flight and frees the buffers."""
    with CheckpointStore(tmp_path) as store:
        store.save_async(0, {"w": np.zeros(1000)})
    assert store._pending is None and store._buffers.nbytes == 0
    assert [r.step for r in CheckpointStore(tmp_path).records()] == [0]


def test_a_non_blocking_checkpointer_resumes_like_a_blocking_one(tmp_path: Path) -> None:
    """Checkpointer(blocking=False) commits the same steps, and resume/restore_best see them."""
    from ckptkit import Checkpointer, StoppingPolicy

    class Weights:
        def __init__(self) -> None:
            self.w = np.zeros(100)

        def state_dict(self) -> dict[str, Any]:
            return {"w": self.w}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.w = state["w"].copy()

    losses = [1.0, 0.5, 0.7, 0.4, 0.6, 0.8, 0.9]
    runs = {}
    for blocking in (True, False):
        root = tmp_path / str(blocking)
        model = Weights()
        ckpt = Checkpointer(
            CheckpointStore(root, keep_last=2),
            StoppingPolicy(monitor="loss", patience=2),
            model,
            blocking=blocking,
        )
        for epoch, loss in enumerate(losses):
            model.w += 1  # in place, right after the previous step's save returned
            ckpt.step(epoch, {"loss": loss})
            if ckpt.should_stop:
                break
        best = ckpt.restore_best()
        assert best.step == 3 and model.w[0] == 4.0
        runs[blocking] = [(r.step, r.metrics) for r in CheckpointStore(root).records()]
        again = Weights()
        resumed = Checkpointer(
            CheckpointStore(root), StoppingPolicy(monitor="loss", patience=2), again
        )
        assert resumed.resume() == epoch + 1 and again.w[0] == epoch + 1
    assert runs[True] == runs[False]


def test_a_preempted_non_blocking_checkpointer_has_committed_before_it_says_so(
    tmp_path: Path,
) -> None:
    """With blocking=False, ckpt.preempted is set only once the step's save is on disk."""
    import signal

    from ckptkit import Checkpointer, PreemptionGuard

    class Weights:
        def __init__(self) -> None:
            self.w = np.zeros(1 << 20)

        def state_dict(self) -> dict[str, Any]:
            return {"w": self.w}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.w = state["w"].copy()

    model = Weights()
    with PreemptionGuard(signals=(signal.SIGUSR1,)) as guard:
        ckpt = Checkpointer(
            CheckpointStore(tmp_path), None, model, save_every=100, preemption=guard, blocking=False
        )
        ckpt.step(0)
        signal.raise_signal(signal.SIGUSR1)
        ckpt.step(1)
        assert ckpt.preempted
        # Read by another store object: the commit is on disk, not only in flight.
        assert [r.step for r in CheckpointStore(tmp_path).records()] == [1]
        assert ckpt.store._pending is None


def test_a_save_in_flight_is_a_running_future_that_cannot_be_cancelled(
    tmp_path: Path, gate: Gate
) -> None:
    """While held, the PendingSave is running, not done, refuses cancel() and times out by step."""
    store = CheckpointStore(tmp_path)
    pending = store.save_async(0, {"w": np.zeros(3)})
    assert isinstance(pending, futures.Future)
    assert pending.running() and not pending.done()
    assert pending.cancel() is False and not pending.cancelled()
    with pytest.raises(TimeoutError, match=r"step 0 is still in flight after 0\.01 s"):
        pending.exception(timeout=0.01)
    with pytest.raises(futures.TimeoutError, match="step 0 is still in flight"):
        pending.result(timeout=0.01)
    assert repr(pending) == "PendingSave(step=0, in flight)"
    gate.release.set()
    assert pending.exception() is None
    assert pending.result() == store.record(0)
    assert pending.done() and not pending.running()
    assert pending.cancel() is False and not pending.cancelled()
    assert repr(pending) == "PendingSave(step=0, done)"


def test_concurrent_futures_waits_on_saves_of_several_stores(tmp_path: Path) -> None:
    """concurrent.futures.wait and as_completed take PendingSaves of different stores."""
    stores = [CheckpointStore(tmp_path / name) for name in ("a", "b", "c")]
    pending = [store.save_async(i, {"w": np.full(1000, i)}) for i, store in enumerate(stores)]
    done, not_done = futures.wait(pending, timeout=60)
    assert done == set(pending) and not not_done
    assert sorted(p.result().step for p in futures.as_completed(pending)) == [0, 1, 2]
    for i, store in enumerate(stores):
        assert CheckpointStore(store.root).load(i)["w"][0] == i


def test_asyncio_awaits_a_pending_save_through_wrap_future(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Awaiting asyncio.wrap_future(pending) gives the record, or raises the save's error."""
    store = CheckpointStore(tmp_path)

    async def save(step: int) -> CheckpointRecord:
        return await asyncio.wrap_future(store.save_async(step, {"w": np.zeros(3)}))

    assert asyncio.run(save(0)) == store.record(0)
    failed = _failed_in_background(store, monkeypatch, 1)

    async def collect() -> CheckpointRecord:
        return await asyncio.wrap_future(failed)

    with pytest.raises(StoreWriteError, match="No space left on device"):
        asyncio.run(collect())
    assert store.wait() is None  # the await collected the error
    assert [r.step for r in store.records()] == [0]


def test_done_callbacks_run_in_order_in_the_saving_thread(tmp_path: Path, gate: Gate) -> None:
    """Callbacks get the PendingSave in the saving thread, in order; a late one runs at once."""
    store = CheckpointStore(tmp_path)
    pending = store.save_async(3, {"w": np.zeros(3)})
    calls: list[tuple[str, PendingSave, str]] = []
    for name in ("first", "second"):
        pending.add_done_callback(
            lambda p, name=name: calls.append((name, p, threading.current_thread().name))
        )
    assert calls == []
    gate.release.set()
    record = store.wait()  # returns once the saving thread, callbacks included, has ended
    assert record is not None and record.step == 3
    assert calls == [("first", pending, "ckptkit-save-3"), ("second", pending, "ckptkit-save-3")]
    pending.add_done_callback(lambda p: calls.append(("late", p, threading.current_thread().name)))
    assert calls[-1] == ("late", pending, threading.current_thread().name)
    assert threading.current_thread().name != "ckptkit-save-3"


def test_a_raising_callback_is_logged_and_breaks_nothing(
    tmp_path: Path, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback's exception goes to the ckptkit logger; later callbacks and the store go on."""
    caplog.set_level(logging.ERROR, logger="ckptkit")
    store = CheckpointStore(tmp_path)
    pending = store.save_async(0, {"w": np.zeros(3)})

    def broken(p: PendingSave) -> None:
        raise ValueError(f"bug in the callback of step {p.step}")

    after: list[PendingSave] = []
    pending.add_done_callback(broken)
    pending.add_done_callback(after.append)
    gate.release.set()
    record = store.wait()
    assert record is not None and record.step == 0 and after == [pending]
    pending.add_done_callback(broken)  # already done: runs here, and raises nothing here
    logged = [r for r in caplog.records if r.name == "ckptkit" and r.exc_info is not None]
    assert len(logged) == 2
    for entry in logged:
        assert entry.exc_info is not None
        assert str(entry.exc_info[1]) == "bug in the callback of step 0"
        assert "PendingSave(step=0, done)" in entry.getMessage()
    assert pending.result() == record and store.save(1, {"w": np.ones(3)}).step == 1
    assert [r.step for r in store.records()] == [0, 1]


@pytest.mark.parametrize("call", ["save_async", "save"])
def test_a_step_in_flight_is_refused_at_once_and_still_commits(
    tmp_path: Path, gate: Gate, call: str
) -> None:
    """Saving the step in flight again raises without waiting for it; the first save commits."""
    store = CheckpointStore(tmp_path)
    first = store.save_async(0, {"w": np.zeros(3)})
    error = _raised_without_waiting(lambda: getattr(store, call)(0, {"w": np.ones(3)}))
    assert isinstance(error, CheckpointExistsError)
    assert str(error) == (
        f"{tmp_path}: step 0 is in flight (a save_async of it has not committed yet); pass "
        "overwrite=True to replace it once it commits, or save under another step"
    )
    assert not first.done()
    gate.release.set()
    assert first.result().step == 0
    assert gate.order == ["start 0", "end 0"]
    assert store.load(0)["w"].tolist() == [0.0, 0.0, 0.0]
    assert [r.step for r in store.records()] == [0]


def test_overwrite_of_the_step_in_flight_waits_for_it_then_replaces_it(
    tmp_path: Path, gate: Gate
) -> None:
    """save_async(step, overwrite=True) of the step in flight commits after it, replacing it."""
    store = CheckpointStore(tmp_path)
    first = store.save_async(0, {"w": np.zeros(3)})
    second: list[PendingSave] = []
    waiter = threading.Thread(
        target=lambda: second.append(store.save_async(0, {"w": np.ones(3)}, overwrite=True))
    )
    waiter.start()
    gate.release.set()
    waiter.join()
    assert first.result().step == 0 and second[0].result().step == 0
    assert gate.order == ["start 0", "end 0", "start 0", "end 0"]
    assert store.load(0)["w"].tolist() == [1.0, 1.0, 1.0]
    assert [r.step for r in store.records()] == [0]


def test_save_async_of_a_committed_step_is_refused_at_once(tmp_path: Path) -> None:
    """save_async of a committed step raises before copying anything, and the store is unchanged."""
    store = CheckpointStore(tmp_path)
    record = store.save(0, {"w": np.zeros(3)})
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(CheckpointExistsError) as e:
        store.save_async(0, {"w": np.ones(3)})
    assert str(e.value) == (
        f"{tmp_path}: step 0 is already committed ({record.directory}); pass overwrite=True "
        "to replace it atomically, or save under another step"
    )
    assert store._pending is None and store._buffers.nbytes == 0
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert store.load(0)["w"].tolist() == [0.0, 0.0, 0.0]
    store.save_async(0, {"w": np.ones(3)}, overwrite=True).result()
    assert store.load(0)["w"].tolist() == [1.0, 1.0, 1.0]
