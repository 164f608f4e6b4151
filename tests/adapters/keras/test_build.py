"""Models and optimizers built as ``model.fit`` builds them: subclassed models, name scopes, hidden state."""

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
from ckptkit.adapters._keras_build import optimizer_variables, signature  # noqa: E402
from ckptkit.adapters._keras_convert import to_numpy  # noqa: E402
from ckptkit.adapters.keras import (  # noqa: E402
    CheckpointCallback,
    KerasState,
    load_state,
    save_state,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 6)).astype("float32")
Y = (np.tanh(X @ RNG.normal(size=(6, 1))) + 0.2 * RNG.normal(size=(48, 1))).astype("float32")


class Noisy(keras.layers.Layer):
    """A custom layer with its own weights (made in build) and its own SeedGenerator."""

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


class Tied(keras.Model):
    """Subclassed: a shared Noisy block used twice, Dropout, an output tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = keras.layers.Dense(8, activation="relu")
        self.block = Noisy(8)
        self.drop = keras.layers.Dropout(0.2)
        self.head = keras.layers.Dense(1)

    def call(self, x: Any, training: bool = False) -> Any:
        h = self.block(self.block(self.embed(x), training=training), training=training)
        h = self.drop(h, training=training)
        return self.head(h @ keras.ops.transpose(self.embed.kernel))


def _functional_shared() -> Any:
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh")
    h = shared(shared(inputs))  # one layer, applied twice
    h = keras.layers.Dropout(0.2)(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def _sequential_unbuilt() -> Any:
    return keras.Sequential(
        [keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.2), keras.layers.Dense(1)]
    )


MODELS = {
    "functional-shared": _functional_shared,
    "sequential-unbuilt": _sequential_unbuilt,
    "subclassed-tied": Tied,
}


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
            h.update(to_numpy(v).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_models_of_every_kind_resume_bit_exactly_into_a_fresh_unbuilt_object(
    kind: str, tmp_path: Path
) -> None:
    """Functional with a shared layer, Sequential without Input, subclassed with tied weights and a
    custom SeedGenerator layer: a fresh (unbuilt) object resumes the store and ends bit-equal."""
    whole = _compiled(kind)
    _fit(whole, tmp_path / "whole", 2)

    _fit(_compiled(kind), tmp_path / "run", 1)
    resumed = _compiled(kind)
    assert resumed.built == (kind == "functional-shared")
    _fit(resumed, tmp_path / "run", 2)

    assert _digest(resumed.variables, resumed.optimizer.variables) == _digest(
        whole.variables, whole.optimizer.variables
    )
    assert len(CheckpointStore(tmp_path / "run")) == 2


def test_a_checkpoint_without_input_shapes_says_how_to_build_the_model(tmp_path: Path) -> None:
    """An unbuilt model and a checkpoint that does not record its input shapes: the message says what to call."""
    built = _compiled("subclassed-tied")
    built(X[:1])
    store = CheckpointStore(tmp_path)
    save_state(store, 0, KerasState(built, built.optimizer))  # no fit: no input shapes recorded
    fresh = _compiled("subclassed-tied")
    callback = CheckpointCallback(store)
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(ConfigMismatchError) as info:
            fresh.fit(X, Y, epochs=2, verbose=0, callbacks=[callback])
        assert str(info.value) == (
            f"CheckpointCallback: {store.root}, step 0: the checkpoint does not say how the "
            "model was built, and Tied is not built yet (a subclassed model makes its weights "
            "when first called): call it on one batch (model(x[:1])) or "
            "model.build(input_shape) first"
        )
    else:  # JAX's and PyTorch's fit build the model from the data before any callback
        fresh.fit(X, Y, epochs=2, verbose=0, callbacks=[callback])
        assert callback.checkpointer is not None
        assert callback.checkpointer.resumed_from is not None
    unbuilt = _compiled("subclassed-tied")
    with pytest.raises(ConfigMismatchError) as info:
        load_state(store, KerasState(unbuilt, unbuilt.optimizer), 0)
    assert str(info.value).startswith(
        f"{store.root}, step 0: part 'model': the saved variables do not match (it has no "
        "variables yet: build it before loading): Tied is not built yet"
    )
    assert "CheckpointCallback builds it from the checkpoint by itself" in str(info.value)
    assert not unbuilt.optimizer.built


def test_the_optimizer_is_never_built_over_an_unbuilt_model() -> None:
    """Saving an unbuilt model's state fails, and leaves its optimizer unbuilt (fit could not train it otherwise)."""
    model = _compiled("subclassed-tied")
    with pytest.raises(ValueError, match=r"Tied is not built yet: build it \(call it on data"):
        KerasState(model, model.optimizer).state_dict()
    assert not model.optimizer.built


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
    # Built as fit builds it (on TensorFlow under the optimizer's name scope, "adafactor/bias"),
    # so the paths agree but for Keras' per-process numbering.
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
    saved = float(to_numpy(u_product))
    # It moves during the epoch, but not on JAX: fit there trains the listed variables only.
    assert (saved == 1.0) == (keras.backend.backend() == "jax")

    again = _compiled(
        "functional-shared", keras.optimizers.LossScaleOptimizer(keras.optimizers.Nadam())
    )
    load_state(CheckpointStore(tmp_path), KerasState(again, again.optimizer))
    assert float(to_numpy(again.optimizer.inner_optimizer._u_product)) == saved


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


def test_signature_tells_optimizers_apart_by_class_and_variables_not_by_learning_rate() -> None:
    """Adam and AdamW differ; so do Adam over other trainable variables; Adam at another rate does not."""

    def sig(optimizer: Any, frozen: bool = False) -> dict[str, Any]:
        model = _compiled("functional-shared", optimizer)
        model.layers[1].trainable = not frozen
        KerasState(model, model.optimizer).state_dict()  # builds it as fit would
        return signature(model.optimizer, model)

    adam = sig(keras.optimizers.Adam(1e-3))
    assert sig(keras.optimizers.Adam(1e-5)) == adam
    assert sig(keras.optimizers.AdamW(1e-3)) == {**adam, "class": "AdamW"}
    assert sig(keras.optimizers.Adam(1e-3), frozen=True)["variables"] < adam["variables"]
    lso = sig(keras.optimizers.LossScaleOptimizer(keras.optimizers.Nadam()))
    assert lso["class"] == "LossScaleOptimizer(Nadam)"
