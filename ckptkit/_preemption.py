"""PreemptionGuard: SIGTERM, SIGINT and SIGUSR1 become "save at the next safe point, then stop"."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from signal import Signals
from types import FrameType, TracebackType
from typing import Any

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

#: The signals a guard catches unless told otherwise: what schedulers send before a kill
#: (SIGTERM: Kubernetes, SLURM at the time limit, systemd, docker stop), Ctrl-C (SIGINT), and
#: the signal SLURM sends ahead of time with ``--signal=USR1@90``.
if sys.platform == "win32":
    DEFAULT_SIGNALS: tuple[Signals, ...] = (Signals.SIGTERM, Signals.SIGINT)
else:
    DEFAULT_SIGNALS = (Signals.SIGTERM, Signals.SIGINT, Signals.SIGUSR1)


class PreemptionGuard:
    """Turns termination signals into a request to save at the next safe point, then stop.

    While installed, a caught signal only records the request (:attr:`requested`, the first
    :attr:`signal`) and then calls the handler that was there before if that is a Python
    function of yours: it never interrupts the step in progress. Python's own SIGINT handler
    (the one raising ``KeyboardInterrupt``), the default action and "ignore" are not called.
    Pass the guard to :class:`~ckptkit.Checkpointer` (``preemption=guard``): its next
    ``step()`` saves that step whatever the schedule, and ``ckpt.preempted`` tells the loop
    to stop. The safe point is that next ``step()``: the end of the epoch (or whatever one
    step is) in progress when the signal came.

    A second delivery of the same signal means "stop now": the guard gives that signal its
    previous handler back and delivers it again, so a second Ctrl-C raises
    ``KeyboardInterrupt`` and a second SIGTERM (default action) terminates the process, without
    a new checkpoint; the last committed one stays intact. From then on the guard leaves that
    signal to its previous handler. A different signal after the first (SLURM's SIGTERM at the
    time limit after its early SIGUSR1, a launcher's SIGTERM after Ctrl-C) is only counted.

    Handlers can only be set in the main thread; Python runs them there, between two bytecodes.

    Args:
        signals: the signals to catch (SIGKILL and SIGSTOP cannot be caught).

    Raises:
        ValueError: ``signals`` is empty or names something that is not a catchable signal.

    Example:
        >>> with PreemptionGuard() as guard:
        ...     ckpt = Checkpointer(store, policy, model, preemption=guard)
        ...     for epoch in range(ckpt.resume(), 100):
        ...         ckpt.step(epoch, {"val_loss": train_one_epoch()})
        ...         if ckpt.should_stop or ckpt.preempted:
        ...             break
    """

    def __init__(self, *, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        resolved: list[Signals] = []
        for value in signals:
            sig = None if isinstance(value, bool) else _as_signal(value)
            if sig is None:
                raise ValueError(f"signals: {value!r} is not a signal on this platform")
            if sig.name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"signals: {sig.name} cannot be caught; leave it out")
            if sig not in resolved:
                resolved.append(sig)
        if not resolved:
            raise ValueError("signals is empty: name at least one signal to catch")
        self._signals = tuple(resolved)
        self._previous: dict[Signals, _Handler] = {}
        self._installed = False
        self._signal: Signals | None = None
        self._counts = dict.fromkeys(self._signals, 0)
        # One bound method, so that what install() sets is what uninstall() and the handler
        # compare against.
        self._handler = self._handle

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._signals)
        return (
            f"PreemptionGuard(signals=({names}), installed={self._installed}, "
            f"signal={self._signal.name if self._signal else None})"
        )

    @property
    def signals(self) -> tuple[Signals, ...]:
        """The signals this guard catches."""
        return self._signals

    @property
    def installed(self) -> bool:
        """True between :meth:`install` and :meth:`uninstall`."""
        return self._installed

    @property
    def requested(self) -> bool:
        """True once a caught signal has asked to stop (until :meth:`reset`)."""
        return self._signal is not None

    @property
    def signal(self) -> Signals | None:
        """The first signal that asked to stop, or None."""
        return self._signal

    @property
    def count(self) -> int:
        """How many caught signals have arrived, the first included (0 until one has)."""
        return sum(self._counts.values())

    def reset(self) -> None:
        """Forget the request, for a loop that saved and goes on (``SIGUSR1`` as "save now")."""
        self._signal = None
        for sig in self._counts:
            self._counts[sig] = 0

    def install(self) -> PreemptionGuard:
        """Catch the guard's signals from now on; return the guard.

        Raises:
            RuntimeError: not called from the main thread, already installed, or a current
                handler was set outside Python (it could not be restored). Nothing is changed.
        """
        if self._installed:
            raise RuntimeError("this PreemptionGuard is already installed; uninstall() it first")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"PreemptionGuard.install() was called from thread "
                f"{threading.current_thread().name!r}; Python only lets the main thread set "
                "signal handlers, so install the guard in the main thread (handlers run there "
                "whatever thread trains)"
            )
        previous: dict[Signals, _Handler] = {}
        for sig in self._signals:
            handler = signal.getsignal(sig)
            if handler is None:
                raise RuntimeError(
                    f"the handler of {sig.name} was set outside Python, so uninstall() could "
                    f"not restore it; leave {sig.name} out of signals"
                )
            previous[sig] = handler
        # The handler reads self._previous, and may run as soon as the first one is set.
        self._previous = previous
        done: list[Signals] = []
        try:
            for sig in self._signals:
                signal.signal(sig, self._handler)
                done.append(sig)
        except BaseException:
            for sig in done:
                signal.signal(sig, previous[sig])
            raise
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Give every signal the handler it had before :meth:`install`; no-op when not installed.

        The request, if any, is kept (see :meth:`reset`).

        Raises:
            RuntimeError: not called from the main thread.
        """
        if not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard.uninstall() must be called from the main thread, which "
                "installed it"
            )
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._installed = False

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of whatever the main thread is doing, possibly in the
        # middle of a save: record and return, no I/O and no locks.
        sig = Signals(signum)
        previous = self._previous.get(sig, signal.SIG_DFL)
        repeated = self._counts.get(sig, 0) > 0
        if self._signal is None:
            self._signal = sig
        self._counts[sig] = self._counts.get(sig, 0) + 1
        if repeated and signal.getsignal(sig) is self._handler:
            # Stop now: the previous disposition gets this delivery (KeyboardInterrupt, the
            # default action, or the user's handler). The check above leaves alone a handler
            # installed over this one that chains to it.
            signal.signal(sig, previous)
            signal.raise_signal(sig)
        elif callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)


def _as_signal(value: int) -> Signals | None:
    try:
        return Signals(value)
    except (TypeError, ValueError):
        return None
