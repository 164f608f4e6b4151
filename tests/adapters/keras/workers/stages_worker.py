"""Two-stage fine-tuning of a subclassed model, for the SIGKILL resume test; resumes by itself.

Usage: ``python stages_worker.py ROOT``. The model is subclassed (built only by its first
call), with a custom layer holding its own weights and a ``keras.random.SeedGenerator`` used
twice (a shared layer), Dropout, and an output tied to the first layer's kernel. Stage 1 fits
3 epochs with Nadam; stage 2 freezes that first layer, compiles with Adafactor and fits on to
epoch 6, on the same store (the trainable variables and the optimizer change: a new stage). Data is shuffled by Keras (NumPy arrays,
``shuffle=True``). Prints ``saved N`` after each save, ``stage K START`` as each fit starts
(the epoch it starts at) and ``digest HEX`` of every model variable at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from ckptkit import CheckpointStore, StoppingPolicy
from ckptkit.adapters._keras_convert import to_numpy
from ckptkit.adapters.keras import CheckpointCallback, NewStageWarning


def say(line: str) -> None:
    print(line, flush=True)


class Noisy(keras.layers.Layer):
    """A custom layer: its own weights (made in build) and its own seed generator."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.noise = keras.random.SeedGenerator(5)

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")
        self.gain = self.add_weight(shape=(self.units,), initializer="ones", name="gain")

    def call(self, x: Any, training: bool = False) -> Any:
        y = keras.ops.tanh(x @ self.w) * self.gain
        if training:
            y = y + 0.05 * keras.random.normal(keras.ops.shape(y), seed=self.noise)
        return y


class Net(keras.Model):
    """Embed, a shared noisy block applied twice, Dropout, and an output tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = keras.layers.Dense(12, activation="relu")
        self.block = Noisy(12)
        self.drop = keras.layers.Dropout(0.2)
        self.head = keras.layers.Dense(1)

    def call(self, x: Any, training: bool = False) -> Any:
        h = self.embed(x)
        h = self.block(self.block(h, training=training), training=training)
        h = self.drop(h, training=training)
        back = h @ keras.ops.transpose(self.embed.kernel)  # tied to the embedding's kernel
        return self.head(back)


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
    x = rng.normal(size=(96, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.2 * rng.normal(size=(96, 1))).astype("float32")
    keras.utils.set_random_seed(2)
    model = Net()
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="val_loss")

    def fit(stage: int, epochs: int) -> None:
        callback = CheckpointCallback(
            store, StoppingPolicy(monitor="val_loss", patience=20), restore_best_weights=True
        )
        say(f"stage {stage} {callback.initial_epoch}")
        model.fit(
            x[:72],
            y[:72],
            validation_data=(x[72:], y[72:]),
            epochs=epochs,
            batch_size=12,
            shuffle=True,
            verbose=0,
            callbacks=[callback, Announce(store)],
        )

    model.compile(optimizer=keras.optimizers.Nadam(0.01), loss="mse")
    fit(1, 3)
    model.embed.trainable = False
    model.compile(optimizer=keras.optimizers.Adafactor(0.01), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewStageWarning)  # stage 2 is intended
        fit(2, 6)
    h = hashlib.sha256()
    for v in model.variables:
        h.update(to_numpy(v).tobytes())
    say(f"digest {h.hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
