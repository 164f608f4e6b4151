"""A training process for the preemption tests: the demo's numpy MLP under a PreemptionGuard.

Usage: ``python preempt_worker.py ROOT [--pause EPOCH] [--hold] [--chain]``. Trains
``ckptkit.demo``'s MLP (SGD with momentum, a shuffling generator, early stopping on val_loss),
resuming from ROOT's latest checkpoint, saving every SAVE_EVERY-th epoch and each improvement.
The safe point is the end of an epoch: ``ckpt.step()``.

It prints JSON lines: ``start``; one ``step`` per epoch with the decision (floats in hex) and
whether that epoch was saved; then ``preempted`` (the epoch committed and the signal) or
``done`` (digests of the final and the best parameters). With ``--pause E``, half-way through
epoch E it prints ``ready`` and reads a line from stdin: the parent signals, then writes the
line, so the signal lands at a known batch with no sleep. With ``--hold`` it then prints
``requested`` (the signal recorded) and reads another line, during which the parent's second
signal arrives. With ``--chain``, a Python handler is installed on each guarded signal before
the guard; it only counts, and the last event reports the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ckptkit import Checkpointer, CheckpointStore, Decision, StoppingPolicy
from ckptkit._preemption import PreemptionGuard
from ckptkit.demo import BATCH, MAX_EPOCHS, N_TRAIN, PATIENCE, TrainingState, make_data

SAVE_EVERY = 4
PAUSE_BATCH = N_TRAIN // BATCH // 2


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def decision_fields(decision: Decision) -> dict[str, Any]:
    """The decision as JSON values, floats in hex so that equal means bit-identical."""
    fields = dataclasses.asdict(decision)
    for key in ("value", "best"):
        if fields[key] is not None:
            fields[key] = float(fields[key]).hex()
    return fields


def recorded(guard: PreemptionGuard) -> str | None:
    """The guard's signal. Being a Python call, it runs any handler still pending first."""
    return None if guard.signal is None else guard.signal.name


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--pause", type=int)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--chain", action="store_true")
    args = parser.parse_args()

    calls: dict[str, int] = {}
    if args.chain:

        def previous(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            calls[name] = calls.get(name, 0) + 1

        for sig in PreemptionGuard().signals:
            signal.signal(sig, previous)

    data = make_data()
    state = TrainingState()
    store = CheckpointStore(args.root, monitor="val_loss")
    policy = StoppingPolicy(monitor="val_loss", mode="min", patience=PATIENCE)
    with PreemptionGuard() as guard:
        ckpt = Checkpointer(store, policy, state, save_every=SAVE_EVERY, preemption=guard)
        start = ckpt.resume()
        emit("start", restored=start - 1 if start else None)
        for epoch in range(start, MAX_EPOCHS):

            def on_batch(batch: int, epoch: int = epoch) -> None:
                if (epoch, batch) != (args.pause, PAUSE_BATCH):
                    return
                emit("ready", step=epoch, batch=batch)
                sys.stdin.readline()
                if args.hold:
                    emit("requested", signal=recorded(guard))
                    sys.stdin.readline()

            state.train_epoch(data, on_batch)
            val_loss, acc = state.evaluate(data)
            decision = ckpt.step(epoch, {"val_loss": val_loss, "acc": acc})
            assert decision is not None
            latest = store.latest()
            saved = latest is not None and latest.step == epoch
            emit("step", saved=saved, **decision_fields(decision))
            if ckpt.should_stop or ckpt.preempted:
                break
    if ckpt.preempted:
        assert guard.signal is not None
        emit("preempted", step=epoch, signal=guard.signal.name, count=guard.count, calls=calls)
        return 0
    digest = state.digest()
    ckpt.restore_best()
    emit("done", digest=digest, best_digest=state.digest(), calls=calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
