"""A deterministic ``model.fit`` run for the SIGKILL resume test; resumes from its store.

Usage: ``python fit_worker.py ROOT``. An MLP with Dropout, trained with Adam on fixed NumPy data
(``shuffle=False``) for 6 epochs through :class:`CheckpointCallback`, which saves at each
epoch's end. Prints ``resumed N`` (the epoch fit starts at), ``saved N`` after each save
(flushed, so the test can kill right after it), and ``digest HEX`` (SHA-256 of every model
variable's bytes) at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from ckptkit import CheckpointStore, StoppingPolicy
from ckptkit.adapters._keras_callback import CheckpointCallback
from ckptkit.adapters._keras_convert import to_numpy

EPOCHS = 6


def say(line: str) -> None:
    print(line, flush=True)


class Announce(keras.callbacks.Callback):
    """Prints ``saved N`` after the checkpoint callback's save of epoch N (it runs after it)."""

    def __init__(self, store: CheckpointStore) -> None:
        super().__init__()
        self.store = store

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        latest = self.store.latest()
        if latest is not None and latest.step == epoch:
            say(f"saved {epoch}")


def main(root: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.3 * rng.normal(size=(512, 1))).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="val_loss")
    callback = CheckpointCallback(store, StoppingPolicy(monitor="val_loss", patience=100))
    say(f"resumed {callback.initial_epoch}")
    model.fit(
        x[:384],
        y[:384],
        validation_data=(x[384:], y[384:]),
        epochs=EPOCHS,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[callback, Announce(store)],
    )
    h = hashlib.sha256()
    for v in model.variables:
        h.update(to_numpy(v).tobytes())
    say(f"digest {h.hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
