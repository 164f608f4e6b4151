"""A worker process for the concurrency tests: one role of a stress run, or one store action.

Usage: ``python stress_worker.py ROOT CONFIG ROLE [ARGS...]``, where CONFIG is the JSON of the
keyword arguments every process opens the store with. Stress roles:

- ``saver INDEX SECONDS NSAVERS FIRST``: saves steps ``FIRST + INDEX + k * NSAVERS`` (its own,
  disjoint from the other savers'), and every fourth time overwrites its previous step with a
  new version of the same size and metrics.
- ``loader INDEX SECONDS SEED``: loads latest, best and listed steps, verifies, lists records, and
  checks that every state it gets is the one its record says.
- ``pruner INDEX SECONDS SEED``: prunes, and pins or unpins listed steps (at most two pinned).

A stress worker prints ``ready`` once its store is open, waits for a line on stdin, works for
SECONDS, then prints ``report <json>``: its counts of each outcome, the records its saves
returned, and every unexpected exception with its traceback. Other roles:

- ``hold``: takes the store's lock, prints ``held``, waits for stdin to close, releases it and
  prints ``released``.
- ``serve``: reads one JSON command a line (``root``, ``config``, ``saves`` as
  ``[step, version, loss]`` triples saved with ``overwrite=True``, ``prune``), runs it against
  that store and answers one line ``done <json>``, until stdin closes. ROOT and CONFIG are unused.
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from collections import Counter
from typing import Any

import numpy as np

from ckptkit import CheckpointNotFoundError, CheckpointRecord, CheckpointStore

#: float64 values per state: about 256 KiB, different for every step so sizes vary a little.
ARRAY_LEN = 32_768
#: Unexpected exceptions kept in full per worker (all are counted).
MAX_FAILURES_KEPT = 20


def expected_state(step: int, version: int = 0) -> dict[str, Any]:
    """The state saved at ``step``; every ``version`` of a step has the same file sizes."""
    rng = np.random.default_rng([step, version])
    return {
        "step": step,
        "version": version,
        "w": rng.standard_normal(ARRAY_LEN + step % 7),
        "b": rng.integers(0, 255, size=5, dtype=np.uint8),
    }


def expected_loss(step: int) -> float:
    """The monitored metric of ``step`` (the same for every version, so rankings never change)."""
    return float(np.random.default_rng([7, step]).uniform())


def check_state(record: CheckpointRecord, state: Any) -> None:
    """Raise AssertionError unless ``state`` is exactly the state that ``record`` describes."""
    step, version = state["step"], state["version"]
    assert step == record.step, f"record of step {record.step} came with the state of step {step}"
    assert record.metadata.get("version") == version, (
        f"step {step}: record of version {record.metadata.get('version')} came with the "
        f"state of version {version}"
    )
    want = expected_state(step, version)
    for key in ("w", "b"):
        got = state[key]
        assert got.dtype == want[key].dtype and got.shape == want[key].shape, (step, version, key)
        assert got.tobytes() == want[key].tobytes(), (
            f"step {step} version {version}: array {key!r} holds other bytes"
        )


def record_to_json(record: CheckpointRecord) -> dict[str, Any]:
    """A record as plain JSON (floats round-trip exactly)."""
    return {
        "step": record.step,
        "directory": record.directory,
        "files": [[f.name, f.size, f.checksum] for f in record.files],
        "metrics": dict(record.metrics),
        "metadata": dict(record.metadata),
        "created": record.created,
        "pinned": record.pinned,
    }


class Worker:
    """Counts outcomes and keeps the unexpected exceptions of one stress worker."""

    def __init__(self, role: str, index: int) -> None:
        self.role = role
        self.index = index
        self.counts: Counter[str] = Counter()
        self.failures: list[dict[str, str]] = []
        self.failure_count = 0
        self.committed: list[dict[str, Any]] = []

    def fail(self, op: str, error: BaseException) -> None:
        self.failure_count += 1
        self.counts[f"{op}: FAILED"] += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(
                {
                    "op": op,
                    "type": type(error).__name__,
                    "message": str(error),
                    "traceback": "".join(traceback.format_exception(error)),
                }
            )

    def report(self, seconds: float) -> str:
        return json.dumps(
            {
                "role": self.role,
                "index": self.index,
                "seconds": seconds,
                "counts": dict(self.counts),
                "committed": self.committed,
                "failures": self.failures,
                "failure_count": self.failure_count,
            }
        )


def _gone(error: CheckpointNotFoundError) -> str | None:
    """How an int step went away, if ``error`` says it did; None for any other not-found error."""
    message = str(error)
    if "another process" in message:
        return "gone during"
    if "no checkpoint for step" in message:
        return "gone before"
    return None


def run_saver(store: CheckpointStore, w: Worker, args: list[str], deadline: float) -> None:
    nsavers, first = int(args[0]), int(args[1])
    step = first + w.index
    versions: Counter[int] = Counter()
    previous = None
    n = 0
    # The lock is not fair (see run_pruner): go on until this saver has overwritten once.
    while time.monotonic() < deadline or not w.counts["overwrite"]:
        n += 1
        if n % 4 == 0 and previous is not None:
            op, target = "overwrite", previous
        else:
            op, target, step = "save", step, step + nsavers
        version = versions[target]
        try:
            record = store.save(
                target,
                expected_state(target, version),
                metrics={"loss": expected_loss(target)},
                metadata={"version": version},
                overwrite=op == "overwrite",
            )
        except Exception as e:
            w.fail(op, e)
            continue
        versions[target] += 1
        previous = target
        w.committed.append(record_to_json(record))
        w.counts[op] += 1


def run_loader(store: CheckpointStore, w: Worker, args: list[str], deadline: float) -> None:
    rng = random.Random(int(args[0]))
    ops = ("latest", "best", "step", "verify latest", "verify step", "records")
    n = 0
    while time.monotonic() < deadline:
        op = ops[n % len(ops)]
        n += 1
        try:
            if op == "records":
                records = store.records()
                steps = [r.step for r in records]
                assert steps == sorted(set(steps)), f"records out of order: {steps}"
                for r in records:
                    assert r.metrics["loss"] == expected_loss(r.step), r
                    assert r.files, r
            elif op in ("latest", "best"):
                checkpoint = store.load_checkpoint(op)
                check_state(checkpoint.record, checkpoint.state)
            elif op == "verify latest":
                store.verify("latest")
            else:
                step = rng.choice(store.records()).step
                if op == "step":
                    checkpoint = store.load_checkpoint(step)
                    assert checkpoint.record.step == step, (step, checkpoint.record)
                    check_state(checkpoint.record, checkpoint.state)
                else:
                    assert store.verify(step).step == step
        except CheckpointNotFoundError as e:
            # An int step may go away before or during the call; latest and best never do.
            how = _gone(e)
            if op in ("step", "verify step") and how is not None:
                w.counts[f"{op}: {how}"] += 1
            else:
                w.fail(op, e)
            continue
        except Exception as e:
            w.fail(op, e)
            continue
        w.counts[f"{op}: ok"] += 1


def run_pruner(store: CheckpointStore, w: Worker, args: list[str], deadline: float) -> None:
    rng = random.Random(int(args[0]))
    n = 0
    # The store's lock is not fair: under load a pruner may get it rarely, so it goes on past
    # the deadline until it has pruned and pinned at least once (the savers stop meanwhile).
    while time.monotonic() < deadline or not (w.counts["prune: ok"] and w.counts["pin: ok"]):
        n += 1
        op = "prune"
        try:
            if n % 2:
                plan = store.prune()
                w.counts["pruned steps"] += len(plan.delete)
            else:
                records = store.records()
                pinned = [r for r in records if r.pinned]
                if len(pinned) >= 2:
                    op = "unpin"
                    assert not store.unpin(rng.choice(pinned).step).pinned
                else:
                    op = "pin"
                    assert store.pin(rng.choice(records).step).pinned
        except CheckpointNotFoundError as e:
            if _gone(e) == "gone before" and op != "prune":
                w.counts[f"{op}: gone before"] += 1
            else:
                w.fail(op, e)
            continue
        except Exception as e:
            w.fail(op, e)
            continue
        w.counts[f"{op}: ok"] += 1


ROLES = {"saver": run_saver, "loader": run_loader, "pruner": run_pruner}


def stress(root: str, config: dict[str, Any], role: str, args: list[str]) -> None:
    index, seconds, rest = int(args[0]), float(args[1]), args[2:]
    store = CheckpointStore(root, **config)
    w = Worker(role, index)
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        raise SystemExit("the test did not send 'go'")
    start = time.monotonic()
    ROLES[role](store, w, rest, start + seconds)
    print("report " + w.report(time.monotonic() - start), flush=True)


def hold(root: str, config: dict[str, Any]) -> None:
    store = CheckpointStore(root, **config)
    with store._storage.lock(store.lock_timeout):
        print("held", flush=True)
        sys.stdin.read()
    print("released", flush=True)


def serve() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        store = CheckpointStore(command["root"], **command["config"])
        records = [
            record_to_json(
                store.save(
                    step,
                    expected_state(step, version),
                    metrics={"loss": loss},
                    metadata={"version": version},
                    overwrite=True,
                )
            )
            for step, version, loss in command.get("saves", [])
        ]
        # Retention's deletions run on after save returns: done means deleted too.
        store.wait()
        pruned = list(store.prune().delete) if command.get("prune") else []
        print("done " + json.dumps({"records": records, "pruned": pruned}), flush=True)


def main() -> None:
    root, config, role, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
    if role == "hold":
        hold(root, config)
    elif role == "serve":
        serve()
    else:
        stress(root, config, role, args)


if __name__ == "__main__":
    main()
