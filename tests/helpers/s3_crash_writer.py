"""A writer process for the S3 crash and concurrency tests (tests/test_crash_s3.py).

    python s3_crash_writer.py ENDPOINT URL FIRST COUNT [--kill-at N] [--arm-step S] [--wait-go]
                              [--keep-last K] [--value V]

Saves steps FIRST .. FIRST+COUNT-1 to the S3 store at URL and prints ``committed STEP`` after
each save returns. With ``--kill-at N`` it SIGKILLs itself at the N-th instant of the save of
step ``--arm-step``: instants are counted over every S3 request of that save, two per request
(just before it is sent, and just after its answer came back), in every thread. With
``--kill-at 0`` it prints ``instants N`` after that save instead. With ``--wait-go`` it prints
``ready`` and waits for a ``go`` line on stdin before saving, so several writers start together.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

import numpy as np

from ckptkit import CheckpointExistsError, CheckpointStore
from ckptkit._storage_s3 import MIN_PART_SIZE, S3Storage

#: Bytes of the large array: three parts of S3's minimum size, so it goes up as a multipart upload.
LARGE = 3 * MIN_PART_SIZE - 4096


def options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def open_store(endpoint: str, url: str, *, keep_last: int | None, grace: float) -> CheckpointStore:
    storage = S3Storage(
        url,
        storage_options=options(endpoint),
        part_size=MIN_PART_SIZE,
        max_concurrency=2,
        orphan_grace=grace,
    )
    return CheckpointStore(storage, keep_last=keep_last)


def expected_state(step: int, value: int = 0) -> dict[str, Any]:
    """What the writer saves at ``step``: every byte follows from the step (and the value)."""
    rng = np.random.default_rng(step * 1000 + value)
    return {
        "large": rng.integers(0, 256, LARGE, dtype=np.uint8),
        "small": rng.standard_normal(17),
        "step": step,
        "value": value,
    }


class Killer:
    """Counts the instants of S3 requests and SIGKILLs the process at the chosen one."""

    def __init__(self, client: Any, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.armed = False
        self._mutex = threading.Lock()
        client.meta.events.register("before-send.s3", self._tick)
        client.meta.events.register("after-call.s3", self._tick)

    def _tick(self, **_: Any) -> None:
        if not self.armed:
            return
        with self._mutex:
            self.count += 1
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("url")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--arm-step", type=int)
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--value", type=int, default=0)
    parser.add_argument("--grace", type=float, default=3600.0)
    args = parser.parse_args()
    store = open_store(args.endpoint, args.url, keep_last=args.keep_last, grace=args.grace)
    killer = None
    if args.kill_at is not None:
        killer = Killer(store._storage.client, args.kill_at)  # type: ignore[attr-defined]
    if args.wait_go:
        print("ready", flush=True)
        if sys.stdin.readline() != "go\n":
            raise SystemExit("no 'go' line on stdin")
    for step in range(args.first, args.first + args.count):
        if killer is not None:
            killer.armed = step == args.arm_step
        try:
            store.save(step, expected_state(step, args.value))
            # Retention's deletion runs on after save returns; count its requests in this
            # save's instants, before "committed" is printed.
            store.wait()
        except CheckpointExistsError:
            print(f"exists {step}", flush=True)
            continue
        print(f"committed {step}", flush=True)
        if killer is not None and killer.armed and args.kill_at == 0:
            print(f"instants {killer.count}", flush=True)


if __name__ == "__main__":
    main()
