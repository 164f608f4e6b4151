"""A writer process for the crash tests: saves deterministic checkpoints until it is killed.

Usage: ``python crash_writer.py ROOT STEPS [KILL_AT]``. Saves steps continuing after the
store's latest; prints ``begin N`` before and ``committed N`` after each save. With STEPS=0 it
instead overwrites the latest step once, with ``expected_state(step, version=1)``. With KILL_AT=k,
the process SIGKILLs itself at the k-th file-system call of the run (write, fsync, rename,
replace, unlink, rmdir, mkdir), so every instant of the commit protocol can be hit exactly.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

from ckptkit import CheckpointStore

SIZES = (1 << 20, 3, 0)


def expected_state(step: int, version: int = 0) -> dict[str, object]:
    """The state saved at ``step`` (``version`` 1: the one that overwrites it)."""
    rng = np.random.default_rng(step + 1_000_000 * version)
    return {
        "step": step,
        "version": version,
        "weights": rng.standard_normal(SIZES[0] // 8 + step % 7),
        "small": {"bias": rng.integers(0, 255, size=SIZES[1], dtype=np.uint8), "t": (step, "x")},
        "empty": np.zeros((SIZES[2], 4), dtype=np.float32),
    }


def expected_loss(step: int) -> float:
    """A metric that goes up and down, so best-k keeps changing."""
    return float(np.random.default_rng(10_000 + step).uniform())


def open_store(root: str) -> CheckpointStore:
    return CheckpointStore(root, keep_last=3, keep_best=2, monitor="loss", mode="min")


def _install_kill_at(k: int) -> None:
    calls = 0
    names = ("write", "fsync", "rename", "replace", "unlink", "rmdir", "mkdir")

    def wrap(fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    for name in names:
        setattr(os, name, wrap(getattr(os, name)))


def main() -> None:
    root, steps = sys.argv[1], int(sys.argv[2])
    store = open_store(root)
    if len(sys.argv) > 3:
        # Installed after opening, so the kill lands in saves, not in the opening sweep.
        _install_kill_at(int(sys.argv[3]))
    latest = store.latest()
    if steps == 0:
        assert latest is not None
        print(f"begin {latest.step}", flush=True)
        store.save(
            latest.step,
            expected_state(latest.step, 1),
            overwrite=True,
            metrics=dict(latest.metrics),
        )
        print(f"committed {latest.step}", flush=True)
        return
    start = 0 if latest is None else latest.step + 1
    for step in range(start, start + steps):
        print(f"begin {step}", flush=True)
        store.save(step, expected_state(step), metrics={"loss": expected_loss(step)})
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
