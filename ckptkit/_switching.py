"""Faster thread switching while a save runs, so a busy training thread does not starve it.

A save spends its time in system calls (``write``, ``fsync``, ``open``, ``rename``) and in the
hash, all of which release the GIL. After each one the saving thread must take the GIL back.
If another thread is running Python code (a training loop, a data loader), CPython hands the
GIL over only after the switch interval, 5 ms by default: a save makes about 80 such calls,
so a 100 MiB background save measured 2.5x slower while the training thread ran a Python loop
than while it waited. For as long as a save runs, the interval is lowered to
:data:`SWITCH_INTERVAL`; it only matters when a thread is waiting for the GIL, so a process
with no save running, or a save with nothing else running, is unaffected.

The interval is process-wide: saves from several stores share one lowering (counted), and the
previous interval comes back when the last ends, unless someone set another one meanwhile.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds between forced GIL hand-overs while a save runs (CPython's default is 0.005).
SWITCH_INTERVAL = 0.0002

_lock = threading.Lock()
_saves = 0
_previous: float | None = None


@contextmanager
def fast_switching() -> Iterator[None]:
    """Lower the interpreter's switch interval for the duration of the block (see the module)."""
    global _saves, _previous
    with _lock:
        if _saves == 0:
            current = sys.getswitchinterval()
            if current > SWITCH_INTERVAL:
                _previous = current
                sys.setswitchinterval(SWITCH_INTERVAL)
        _saves += 1
    try:
        yield
    finally:
        with _lock:
            _saves -= 1
            if _saves == 0 and _previous is not None:
                # Put back the previous interval unless somebody chose another one meanwhile
                # (getswitchinterval returns the value rounded to microseconds).
                if abs(sys.getswitchinterval() - SWITCH_INTERVAL) < 1e-6:
                    sys.setswitchinterval(_previous)
                _previous = None
