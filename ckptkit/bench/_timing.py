"""Round-robin timing: every method once per round, the order rotated each round.

On a shared machine the disk and the CPUs drift over a run; running the methods side by side,
in a different order each round, spreads that drift over all of them instead of one.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

#: A measured case: given the round number, do the work and return the seconds it took (any
#: setup and cleanup around it happens outside the returned figure).
Case = Callable[[int], float]


class Progress:
    """Progress lines on stderr, each stamped with the seconds since the run began."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, kw_only=True)
class Summary:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        return cls(median=statistics.median(values), min=min(values), max=max(values))


def alternate(
    cases: dict[str, Case], rounds: int, progress: Progress, what: str
) -> dict[str, list[float]]:
    """Run every case once per round, rotating the order; return each case's seconds."""
    names = list(cases)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            seconds = cases[name](r)
            results[name].append(seconds)
            progress(f"{what} round {r + 1}/{rounds}: {name}: {format_seconds(seconds)}")
    return results


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds_text(rounds: int) -> str:
    return f"{rounds} round" if rounds == 1 else f"{rounds} rounds"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.2f} us"
