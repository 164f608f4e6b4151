"""Save on one Keras backend, load on another, for the cross-backend test.

Usage: ``KERAS_BACKEND=B python cross_worker.py ROOT save`` fits a model with Dropout,
BatchNormalization and a bfloat16 layer for two epochs through ``CheckpointCallback`` into the
store ``ROOT/B``. ``KERAS_BACKEND=B python cross_worker.py ROOT load`` builds the same model on
backend B and loads every other backend's store under ROOT into it. Prints one JSON object per
line: ``{"saved": B, "dtypes": ...}`` after saving, and for each store loaded
``{"from": A, "to": B, ...}``: whether the weights are bitwise the saved ones, whether the
optimizer state and the full state load (or the error), and the loss of one more epoch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from ckptkit import CheckpointStore
from ckptkit.adapters._keras_convert import cast_seed_state, to_numpy
from ckptkit.adapters.keras import CheckpointCallback, KerasState, load_state

BACKEND = keras.backend.backend()


def build() -> Any:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(8, dtype="bfloat16")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(6, 1))).astype("float32")


def say(**fields: Any) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def save(root: Path) -> None:
    model = build()
    x, y = data()
    store = CheckpointStore(root / BACKEND)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[CheckpointCallback(store)])
    tree = store.load()
    dtypes = {
        part: {key: str(value.dtype) for key, value in tree[part].items()}
        for part in ("model", "optimizer")
    }
    say(saved=BACKEND, dtypes=dtypes, rng=sorted(tree["rng"]))


def load(root: Path) -> None:
    x, y = data()
    for source in sorted(p.name for p in root.iterdir() if p.name != BACKEND):
        store = CheckpointStore(root / source)
        saved = store.load()
        model = build()
        load_state(store, model)
        same, seeds = [], []
        for key, variable in zip(saved["model"], model.variables, strict=True):
            here = to_numpy(variable)
            if key.endswith("seed_generator_state"):
                seeds.append(cast_seed_state(saved["model"][key], variable.dtype).tolist())
                same.append(here.tolist() == seeds[-1])
            else:
                same.append(
                    here.dtype == saved["model"][key].dtype
                    and here.tobytes() == saved["model"][key].tobytes()
                )
        try:
            load_state(store, KerasState(model, model.optimizer, rng=False))
            optimizer = "loaded"
        except Exception as e:  # reported: which part does not load across backends is the finding
            optimizer = f"{type(e).__name__}: {e}"
        try:
            load_state(store, KerasState(model, model.optimizer))
            full = "loaded"
        except Exception as e:
            full = f"{type(e).__name__}: {e}"
        history = model.fit(x, y, batch_size=16, epochs=3, initial_epoch=2, verbose=0)
        say(
            **{"from": source, "to": BACKEND},
            weights_bitwise=all(same),
            seeds=seeds,
            optimizer=optimizer,
            full=full,
            loss=float(history.history["loss"][-1]),
        )


if __name__ == "__main__":
    {"save": save, "load": load}[sys.argv[2]](Path(sys.argv[1]))
