"""Every optimizer in ``keras.optimizers``, each fit twice on one store, for the resume test.

Usage: ``python optimizers_worker.py ROOT PHASE``. For each case (every optimizer class in
``keras.optimizers``, found by walking the module, plus options that add state: EMA, gradient
accumulation, a learning-rate schedule (no learning-rate variable), a wrapped Nadam), one store under ROOT:

- ``PHASE=reference``: an uninterrupted fit of ``EPOCHS`` epochs;
- ``PHASE=first``: a fit of ``FIRST`` epochs, which saves at each epoch's end;
- ``PHASE=resume``: in a new process, a fit of ``EPOCHS`` epochs on the same store, which
  resumes after the first fit's last epoch.

Prints ``resumed NAME EPOCH`` (the epoch the fit starts at) and ``digest NAME HEX`` per case (SHA-256 of every model and optimizer variable's bytes),
or ``error NAME MESSAGE`` when a case fails, and ``cases N`` at the end.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from ckptkit import CheckpointStore
from ckptkit.adapters._keras_convert import to_numpy
from ckptkit.adapters.keras import CheckpointCallback

EPOCHS = 2
FIRST = 1
# Eager: every case makes a new model and optimizer, and tracing each costs more than it runs.
EAGER = True
opt = keras.optimizers

#: Optimizers that cannot be made without arguments, by class name.
NEEDS_ARGUMENTS: dict[str, Callable[[], Any]] = {
    "LossScaleOptimizer": lambda: opt.LossScaleOptimizer(opt.Adam(0.01)),
    "MultiOptimizer": lambda: opt.MultiOptimizer(
        opt.OptimizerMap(opt.SGD(0.01, momentum=0.9), {".*kernel": opt.Adam(0.01)})
    ),
}

#: Options that add optimizer state, on top of every class with its defaults.
VARIANTS: dict[str, Callable[[], Any]] = {
    "Adam+ema": lambda: opt.Adam(0.01, use_ema=True, ema_overwrite_frequency=3),
    "SGD+accumulation": lambda: opt.SGD(0.01, momentum=0.9, gradient_accumulation_steps=3),
    "Nadam+ema+accumulation": lambda: opt.Nadam(0.01, use_ema=True, gradient_accumulation_steps=2),
    "Adam+schedule": lambda: opt.Adam(opt.schedules.CosineDecay(0.01, decay_steps=20)),
    "LossScaleOptimizer(Nadam)": lambda: opt.LossScaleOptimizer(opt.Nadam(0.01)),
}


def optimizer_classes() -> list[type]:
    """Every optimizer class ``keras.optimizers`` exports (its base class aside), by name."""
    found = {
        obj
        for _, obj in inspect.getmembers(opt, inspect.isclass)
        if issubclass(obj, opt.Optimizer) and obj is not opt.Optimizer
    }
    return sorted(found, key=lambda cls: cls.__name__)


def cases() -> dict[str, Callable[[], Any]]:
    """Each case by name: every class (with its defaults, or as NEEDS_ARGUMENTS makes it)."""
    made: dict[str, Callable[[], Any]] = {}
    for cls in optimizer_classes():
        made[cls.__name__] = NEEDS_ARGUMENTS.get(cls.__name__, cls)
    return {**made, **VARIANTS}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(6, 1))) + 0.2 * rng.normal(size=(24, 1))).astype("float32")
    return x, y


def run(root: str, name: str, make: Callable[[], Any], epochs: int) -> str:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=make(), loss="mse", run_eagerly=EAGER)
    x, y = data()
    callback = CheckpointCallback(CheckpointStore(os.path.join(root, name)))
    print(f"resumed {name} {callback.initial_epoch}", flush=True)
    model.fit(x, y, batch_size=12, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])
    h = hashlib.sha256()
    for variable in [*model.variables, *model.optimizer.variables]:
        h.update(to_numpy(variable).tobytes())
    return h.hexdigest()


def main(root: str, phase: str) -> None:
    epochs = FIRST if phase == "first" else EPOCHS
    todo = cases()
    for name, make in todo.items():
        try:
            digest = run(root, name, make, epochs)
        except Exception as e:  # reported per case: one failing optimizer must not hide others
            print(f"error {name} {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        else:
            print(f"digest {name} {digest}", flush=True)
    print(f"cases {len(todo)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
