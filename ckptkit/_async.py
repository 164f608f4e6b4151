"""Saves that return once the state is copied: reused host buffers and one writer thread.

``CheckpointStore.save_async`` copies every array of the state into one buffer it keeps between
saves (``_snapshot.py``: laid out as the file's data area, kept while the names, shapes and
dtypes stay the same, so a training loop that saves the same model allocates it once), then
commits the checkpoint in a background thread while training goes
on. At most one save is in flight: the next save first waits for it, and a failure nobody
collected (with ``result()`` or ``exception()``) is raised by the next call that waits
(``save``, ``save_async``, ``wait``, ``close``, ``prune``, ``pin``, ``unpin``). A save of the
step in flight, or ``save_async`` of a committed step, is refused before anything is copied.
The thread is not a daemon, so a save still in flight when the interpreter exits is finished
before the process ends.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import sys
import threading
from collections.abc import Callable

from ckptkit._errors import CheckpointExistsError
from ckptkit._record import CheckpointRecord

logger = logging.getLogger("ckptkit")

if sys.version_info >= (3, 11):
    _SaveTimeout = TimeoutError
else:  # concurrent.futures.TimeoutError is not the builtin before 3.11: be both.

    class _SaveTimeout(futures.TimeoutError, TimeoutError):
        pass


class PendingSave(futures.Future[CheckpointRecord]):
    """A checkpoint being written in the background by ``CheckpointStore.save_async``.

    A :class:`concurrent.futures.Future` of the committed :class:`CheckpointRecord`, so
    ``concurrent.futures.wait``, ``as_completed`` and ``asyncio.wrap_future`` take it. It is
    running from the moment ``save_async`` returns: ``cancel()`` returns False (a commit cannot
    be taken back halfway), ``cancelled()`` is False, ``running()`` is True until ``done()``.

    Collecting a failed save's error with :meth:`result` or :meth:`exception` (in a done
    callback too) counts as reporting it: the store's next call does not raise it again.

    Attributes:
        step: the step being saved.

    Example:
        >>> pending = store.save_async(step, {"w": weights})
        >>> pending.add_done_callback(lambda p: log.info("finished: %r", p))
        >>> done, not_done = concurrent.futures.wait([pending, other.save_async(step, state)])
        >>> pending.result().step == step
        True
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self._reported = False

    def __repr__(self) -> str:
        if not self.done():
            return f"PendingSave(step={self.step}, in flight)"
        return f"PendingSave(step={self.step}, {'done' if self._error is None else 'failed'})"

    @property
    def _error(self) -> BaseException | None:
        """The save's error, if it failed, without counting it as reported."""
        return self._exception

    def result(self, timeout: float | None = None) -> CheckpointRecord:
        """Wait for the commit and return its record; raise the save's error if it failed.

        Raises:
            TimeoutError: the save is still in flight after ``timeout`` seconds.
            Exception: whatever the save raised (e.g. ``StoreWriteError``).
        """
        self.exception(timeout)
        return super().result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the save; return its error, or None if it committed.

        Raises:
            TimeoutError: the save is still in flight after ``timeout`` seconds.
        """
        try:
            error = super().exception(timeout)
        except futures.TimeoutError:
            raise _SaveTimeout(
                f"the save of step {self.step} is still in flight after {timeout} s; call "
                "result() or exception() again with a longer timeout, or none, to wait for it"
            ) from None
        if error is not None:
            self._reported = True
        return error

    def add_done_callback(self, fn: Callable[[PendingSave], object]) -> None:
        """Call ``fn(self)`` when the save has committed or failed.

        Callbacks run in the saving thread, in the order they were added, before
        ``store.wait()`` returns; one added after the save finished runs at once, in the
        caller's thread. An exception a callback raises is logged to the ``ckptkit`` logger
        and changes nothing else, as ``concurrent.futures`` does. A callback must not call
        the store's saving methods: they wait for the thread the callback runs in.
        """

        def call(future: futures.Future[CheckpointRecord]) -> None:
            try:
                fn(self)
            except Exception:
                logger.exception(
                    "done callback %r of %r raised; the save is unaffected: catch errors "
                    "inside the callback",
                    fn,
                    self,
                )

        super().add_done_callback(call)

    def _run(self, commit: Callable[[], CheckpointRecord]) -> None:
        try:
            record = commit()
        except BaseException as e:  # handed to whoever collects it, or to the store's next call
            logger.error("background save of step %d failed: %s", self.step, e)
            self.set_exception(e)
        else:
            self.set_result(record)


def refuse_in_flight(
    location: str, pending: PendingSave | None, step: int, *, overwrite: bool
) -> None:
    """Raise at once if ``step`` is being saved in the background and ``overwrite`` is False."""
    if overwrite or pending is None or pending.step != step or pending.done():
        return
    raise CheckpointExistsError(
        f"{location}: step {step} is in flight (a save_async of it has not committed yet); "
        "pass overwrite=True to replace it once it commits, or save under another step"
    )


def refuse_committed(location: str, records: list[CheckpointRecord], step: int) -> None:
    """Raise at once if ``step`` is among the committed ``records``."""
    old = next((r for r in records if r.step == step), None)
    if old is not None:
        raise CheckpointExistsError(
            f"{location}: step {step} is already committed ({old.directory}); pass "
            "overwrite=True to replace it atomically, or save under another step"
        )


def start(pending: PendingSave, commit: Callable[[], CheckpointRecord]) -> threading.Thread:
    """Run ``commit`` in a new non-daemon thread that records its outcome in ``pending``.

    ``pending`` is marked running first, so it can never be cancelled: the caller gets it back
    with its commit already under way.
    """
    pending.set_running_or_notify_cancel()
    thread = threading.Thread(
        target=pending._run, args=(commit,), name=f"ckptkit-save-{pending.step}", daemon=False
    )
    thread.start()
    return thread
