"""Optimizers built as ``model.fit`` builds them: under their name scope, with all their state."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import CheckpointStore, ConfigMismatchError  # noqa: E402
from ckptkit.adapters._keras_build import optimizer_variables  # noqa: E402
from ckptkit.adapters.keras import (  # noqa: E402
    CheckpointCallback,
    KerasState,
    load_state,
    save_state,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 6)).astype("float32")
Y = (np.tanh(X @ RNG.normal(size=(6, 1))) + 0.2 * RNG.normal(size=(48, 1))).astype("float32")


def _functional_shared() -> Any:
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh")
    h = shared(shared(inputs))  # one layer, applied twice
    h = keras.layers.Dropout(0.2)(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


MODELS = {"functional-shared": _functional_shared}


def _compiled(kind: str, optimizer: Any = None) -> Any:
    keras.utils.set_random_seed(4)
    model = MODELS[kind]()
    model.compile(optimizer=optimizer or keras.optimizers.Nadam(0.01), loss="mse")
    return model


def _fit(model: Any, root: Path, epochs: int) -> None:
    model.fit(
        X,
        Y,
        batch_size=12,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[CheckpointCallback(CheckpointStore(root))],
    )


def _unnumbered(path: str) -> str:
    return re.sub(r"_\d+(?=[_/]|$)", "", path)


def _digest(*groups: Any) -> str:
    h = hashlib.sha256()
    for variables in groups:
        for v in variables:
            h.update(np.asarray(v.numpy()).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["Nadam", "Adafactor"])
def test_optimizer_state_saved_by_fit_loads_into_one_built_outside_fit(
    name: str, tmp_path: Path
) -> None:
    """Nadam and Adafactor, built by fit under their name scope, load into a fresh optimizer (and back)."""
    model = _compiled("functional-shared", getattr(keras.optimizers, name)(0.01))
    _fit(model, tmp_path, 1)
    again = _compiled("functional-shared", getattr(keras.optimizers, name)(0.01))
    load_state(CheckpointStore(tmp_path), KerasState(again, again.optimizer))
    assert _digest(again.optimizer.variables) == _digest(model.optimizer.variables)
    # Built as fit builds it: under the optimizer's name scope ("adafactor/bias"), so the
    # paths agree but for Keras' per-process numbering.
    assert [_unnumbered(v.path) for v in again.optimizer.variables] == [
        _unnumbered(v.path) for v in model.optimizer.variables
    ]


def test_a_nadam_inside_a_loss_scale_optimizer_keeps_its_unlisted_state(tmp_path: Path) -> None:
    """Nadam's u_product, which LossScaleOptimizer's build leaves out of .variables, is saved and restored."""
    model = _compiled(
        "functional-shared", keras.optimizers.LossScaleOptimizer(keras.optimizers.Nadam())
    )
    _fit(model, tmp_path, 1)
    u_product = model.optimizer.inner_optimizer._u_product
    assert not any(v is u_product for v in model.optimizer.variables)
    assert any(v is u_product for v in optimizer_variables(model.optimizer, model))
    saved = float(u_product.numpy())
    assert saved != 1.0  # it moved during the epoch

    again = _compiled(
        "functional-shared", keras.optimizers.LossScaleOptimizer(keras.optimizers.Nadam())
    )
    load_state(CheckpointStore(tmp_path), KerasState(again, again.optimizer))
    assert float(again.optimizer.inner_optimizer._u_product.numpy()) == saved


def test_optimizer_variables_must_match_in_shape_and_dtype(tmp_path: Path) -> None:
    """Matched by position, a saved optimizer variable of another shape is refused by its key; nothing changes."""
    model = _compiled("functional-shared", keras.optimizers.Adam())
    store = CheckpointStore(tmp_path)
    save_state(store, 0, KerasState(model, model.optimizer, rng=False))
    tree = store.load(0)
    key = sorted(tree["optimizer"])[2]  # the first moment, of the shared layer's (6, 6) kernel
    tree["optimizer"][key] = np.zeros((7,), "float32")
    other = _compiled("functional-shared", keras.optimizers.Adam())
    before = _digest(other.variables)
    with pytest.raises(ConfigMismatchError) as info:
        KerasState(other, other.optimizer, rng=False).load_state_dict(tree)
    assert "KerasState: part 'optimizer': the saved variables do not fit: ['0002:" in str(
        info.value
    )
    assert "saved (7,) float32, here (6, 6) float32" in str(info.value)
    assert _digest(other.variables) == before
