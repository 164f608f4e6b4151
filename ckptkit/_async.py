"""Saves that return once the state is copied: reused host buffers and one writer thread.

``CheckpointStore.save_async`` copies every array of the state into buffers it keeps between
saves (one per tensor name, shape and dtype, so a training loop that saves the same model
allocates them once), then commits the checkpoint in a background thread while training goes
on. At most one save is in flight: the next save first waits for it, and a failure is raised by
the next call that waits (``save``, ``save_async``, ``wait``, ``close``, ``prune``, ``pin``).
The thread is not a daemon, so a save still in flight when the interpreter exits is finished
before the process ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ckptkit._record import CheckpointRecord

logger = logging.getLogger("ckptkit")


class PendingSave:
    """A checkpoint being written in the background by ``CheckpointStore.save_async``.

    Attributes:
        step: the step being saved.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._finished = threading.Event()
        self._record: CheckpointRecord | None = None
        self._error: BaseException | None = None
        self._reported = False

    def __repr__(self) -> str:
        status = "done" if self.done() else "in flight"
        return f"PendingSave(step={self.step}, {status})"

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> CheckpointRecord:
        """Wait for the commit and return its record; raise the save's error if it failed.

        Raises:
            TimeoutError: the save is still in flight after ``timeout`` seconds.
            Exception: whatever the save raised (e.g. ``StoreWriteError``).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of step {self.step} is still in flight after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        assert self._record is not None
        return self._record

    def _run(self, commit: Callable[[], CheckpointRecord]) -> None:
        try:
            self._record = commit()
        except BaseException as e:  # handed to the caller's thread by result()
            self._error = e
            logger.error("background save of step %d failed: %s", self.step, e)
        finally:
            self._finished.set()


def start(pending: PendingSave, commit: Callable[[], CheckpointRecord]) -> threading.Thread:
    """Run ``commit`` in a new non-daemon thread that records its outcome in ``pending``."""
    thread = threading.Thread(
        target=pending._run, args=(commit,), name=f"ckptkit-save-{pending.step}", daemon=False
    )
    thread.start()
    return thread
