"""Retention's deletions run after the save returns, and a crash or failure during them is harmless."""

from __future__ import annotations

import errno
import logging
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckptkit import CheckpointStore, LockTimeoutError
from ckptkit._storage_local import LocalStorage

STEP0 = "step_000000000000"
STEP1 = "step_000000000001"


class _HeldDeletes(LocalStorage):
    """Deletes only once the test lets it; says when a deletion has started."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started = threading.Event()
        self.release = threading.Event()

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        self.started.set()
        self.release.wait(timeout=10)
        super().delete_checkpoint(directory, names)


def test_a_save_returns_at_its_commit_while_the_dropped_checkpoint_is_deleted(
    tmp_path: Path,
) -> None:
    """keep_last=1: save returns before the old step's files are gone; wait() waits for them."""
    storage = _HeldDeletes(tmp_path)
    store = CheckpointStore(storage, keep_last=1)
    store.save(0, {"w": np.zeros(1000)})
    record = store.save(1, {"w": np.ones(1000)})
    # Returned while the deletion is held: it runs in the background.
    assert not storage.release.is_set()
    assert storage.started.wait(timeout=10)
    assert (tmp_path / STEP0).exists()
    assert [r.step for r in store.records()] == [1] and record.step == 1
    assert store.load(1)["w"][0] == 1.0
    storage.release.set()
    store.wait()
    assert not (tmp_path / STEP0).exists()
    assert (tmp_path / STEP1).exists()


def _deleting_step_0(root: Path) -> tuple[_HeldDeletes, CheckpointStore]:
    """A keep_last=1 store whose deletion of step 0 has started and is held."""
    storage = _HeldDeletes(root)
    store = CheckpointStore(storage, keep_last=1)
    store.save(0, {"w": np.zeros(10)})
    store.save(1, {"w": np.zeros(10)})
    assert storage.started.wait(timeout=10)
    return storage, store


def test_the_next_save_waits_for_the_previous_deletion(tmp_path: Path) -> None:
    """Deletions never pile up: a save starts only after the last one's deletion has ended."""
    storage, store = _deleting_step_0(tmp_path)
    done = threading.Event()
    saver = threading.Thread(target=lambda: (store.save(2, {"w": np.zeros(10)}), done.set()))
    saver.start()
    assert not done.wait(timeout=0.2)  # held behind the deletion of step 0
    storage.release.set()
    saver.join()
    store.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        "step_000000000002"
    ]


def test_the_background_deletion_holds_the_store_lock(tmp_path: Path) -> None:
    """Another writer waits for the deletion: it may reuse the deleted directory's name."""
    storage, store = _deleting_step_0(tmp_path)
    other = CheckpointStore(tmp_path, lock_timeout=0.1)
    with pytest.raises(LockTimeoutError, match=r"lock_timeout=0\.1"):
        other.save(0, {"w": np.ones(10)})
    storage.release.set()
    store.wait()
    # Step 0's name is free again, and the new checkpoint takes it.
    assert other.save(0, {"w": np.ones(10)}).directory == STEP0
    assert other.load(0)["w"][0] == 1.0


class _FailingDeletes(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = 1

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "injected I/O error", directory)
        super().delete_checkpoint(directory, names)


def test_a_failed_deletion_is_logged_and_the_next_change_sweeps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The save stands; the leftover is named in a warning and removed by the next save."""
    store = CheckpointStore(_FailingDeletes(tmp_path), keep_last=1)
    store.save(0, {"w": np.zeros(10)})
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        record = store.save(1, {"w": np.ones(10)})
        store.wait()
    assert record.step == 1 and [r.step for r in store.records()] == [1]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"could not delete {STEP0}" in warning.getMessage()
    assert "injected I/O error" in warning.getMessage()
    assert "every listed checkpoint is intact" in warning.getMessage()
    assert (tmp_path / STEP0).exists()
    store.save(2, {"w": np.ones(10)})
    store.wait()
    assert not (tmp_path / STEP0).exists() and not (tmp_path / STEP1).exists()


_WORKER = """
import select, sys
from pathlib import Path
import numpy as np
from ckptkit import CheckpointStore, LockTimeoutError
from ckptkit._storage_local import LocalStorage

class Stuck(LocalStorage):
    def delete_checkpoint(self, directory, names):
        names = list(names)
        super().delete_checkpoint(directory, names[:1])  # the first file goes
        print("deleting", flush=True)
        if MODE == "kill":
            select.select([sys.stdin], [], [], 10)  # held here until killed
        super().delete_checkpoint(directory, names)

MODE = sys.argv[2]
store = CheckpointStore(Stuck(Path(sys.argv[1])), keep_last=1)
store.save(0, {"w": np.zeros(1000)})
store.save(1, {"w": np.ones(1000)})
print("committed", flush=True)
"""


def _run_worker(root: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WORKER), str(root), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_during_the_background_deletion_costs_nothing(tmp_path: Path) -> None:
    """Killed with the old checkpoint half deleted: the new one loads, the next save sweeps."""
    worker = _run_worker(tmp_path, "kill")
    assert worker.stdout is not None
    try:
        lines = {worker.stdout.readline().strip(), worker.stdout.readline().strip()}
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
    assert lines == {"deleting", "committed"}
    assert (tmp_path / STEP0).exists()  # half deleted
    store = CheckpointStore(tmp_path, keep_last=1)
    assert [r.step for r in store.records()] == [1]
    assert store.load(1)["w"][0] == 1.0
    store.verify(1)
    store.save(2, {"w": np.ones(1000)})
    store.wait()
    assert not (tmp_path / STEP0).exists()


def test_a_deletion_under_way_at_exit_is_finished(tmp_path: Path) -> None:
    """The interpreter waits for the background deletion before it exits."""
    worker = _run_worker(tmp_path, "finish")
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert "committed" in out and "deleting" in out
    assert not (tmp_path / STEP0).exists()
    assert [r.step for r in CheckpointStore(tmp_path).records()] == [1]
