"""KerasState on every backend: exact round trips through a real store, strict checks, exact resume."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")
BACKEND = keras.backend.backend()

from keras.src.backend.common import global_state  # noqa: E402
from keras.src.random import seed_generator  # noqa: E402

from ckptkit import CheckpointStore, ConfigMismatchError, CorruptCheckpointError  # noqa: E402
from ckptkit.adapters._keras_convert import to_numpy  # noqa: E402
from ckptkit.adapters._keras_state import (  # noqa: E402
    KerasState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")


def _model(width: int = 8, extra: bool = False) -> keras.Model:
    inputs = keras.Input((4,))
    x = keras.layers.Dense(width)(inputs)
    x = keras.layers.BatchNormalization()(x)
    # Unseeded, PyTorch's Dropout draws from torch's global generator, which fit also draws
    # from while it sets up (before on_train_begin): state loaded before fit (not by the
    # callback) then resumes exactly only for a seeded Dropout.
    x = keras.layers.Dropout(0.3, seed=5 if BACKEND == "torch" else None)(x)
    x = keras.layers.Dense(8, dtype="mixed_float16")(x)
    x = keras.layers.Dense(8, dtype="bfloat16")(x)
    if extra:
        x = keras.layers.Dense(8)(x)
    outputs = keras.layers.Dense(1, dtype="float32")(x)
    return keras.Model(inputs, outputs)


def _compiled(**kwargs: object) -> keras.Model:
    model = _model(**kwargs)  # type: ignore[arg-type]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _fit(model: keras.Model, epochs: int, initial_epoch: int = 0) -> None:
    model.fit(
        X, Y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0
    )


def _bytes(variables: list[object]) -> list[tuple[str, bytes]]:
    return [(str(v.dtype), to_numpy(v).tobytes()) for v in variables]  # type: ignore[attr-defined]


def test_fit_resumed_from_store_is_bitwise_equal_to_uninterrupted_fit(tmp_path):
    """A fit stopped after 2 epochs, saved and loaded into a fresh model and Adam, ends bitwise equal."""
    keras.utils.set_random_seed(7)
    whole = _compiled()
    _fit(whole, 4)

    keras.utils.set_random_seed(7)
    first = _compiled()
    _fit(first, 2)
    store = CheckpointStore(tmp_path / "run")
    save_state(store, 2, KerasState(first, first.optimizer), metrics={"loss": 1.0})

    keras.utils.set_random_seed(12345)  # a restarted process starts from other states
    resumed = _compiled()  # built anew, so Keras numbers its layers and optimizer differently
    assert not resumed.optimizer.built
    record = load_state(store, KerasState(resumed, resumed.optimizer))
    assert record.step == 2 and resumed.optimizer.built
    assert int(to_numpy(resumed.optimizer.iterations)) == 8
    _fit(resumed, 4, initial_epoch=2)

    assert _bytes(resumed.variables) == _bytes(whole.variables)
    assert _bytes(resumed.optimizer.variables) == _bytes(whole.optimizer.variables)
    assert {str(v.dtype) for v in whole.variables} >= {"float32", "bfloat16"}


def test_keys_are_index_and_path_and_cover_every_variable():
    """Every model and optimizer variable is saved under "{index:04d}:{path}", BatchNorm statistics and seed states too."""
    keras.backend.clear_session()
    model = _compiled()
    tree = KerasState(model, model.optimizer, rng=False).state_dict()
    assert list(tree) == ["model", "optimizer"]
    assert list(tree["model"]) == [f"{i:04d}:{v.path}" for i, v in enumerate(model.variables)]
    assert "0004:batch_normalization/moving_mean" in tree["model"]
    assert "0006:seed_generator/seed_generator_state" in tree["model"]
    assert tree["model"]["0009:dense_2/kernel"].dtype.name == "bfloat16"
    assert list(tree["optimizer"])[:2] == ["0000:adam/iteration", "0001:adam/learning_rate"]
    assert len(tree["optimizer"]) == 2 + 2 * len(model.trainable_variables)
    assert list(state_to_tree(model)) == list(tree["model"])


def test_float16_and_bfloat16_variables_round_trip_exactly(tmp_path):
    """float16 and bfloat16 values, subnormals and infinities included, come back bit for bit."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, dtype="float16"),
            keras.layers.Dense(2, dtype="bfloat16"),
        ]
    )
    special = [np.inf, -np.inf, 6e-8, -0.0, 1e-40, 3.140625]
    for variable in model.variables:
        values = np.resize(np.array(special, "float32"), variable.shape).astype(variable.dtype)
        variable.assign(values)
    before = _bytes(model.variables)
    store = CheckpointStore(tmp_path / "run")
    save_state(store, 0, model)
    for variable in model.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    load_state(store, model)
    assert _bytes(model.variables) == before
    assert [str(v.dtype) for v in model.variables] == ["float16"] * 2 + ["bfloat16"] * 2


def test_tree_to_state_gives_tensors_that_load_too():
    """tree_to_state makes the backend's tensors of the same dtype, and load_state_dict accepts them."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="bfloat16")])
    state = KerasState(model, rng=False)
    tree = state.state_dict()
    tensors = tree_to_state(tree)
    assert all(keras.ops.is_tensor(t) for t in tensors["model"].values())
    dtypes = {keras.backend.standardize_dtype(t.dtype) for t in tensors["model"].values()}
    assert dtypes == {"bfloat16"}
    for variable in model.variables:
        variable.assign(np.zeros(variable.shape, "float32"))
    state.load_state_dict(tensors)
    assert all(
        to_numpy(v).tobytes() == tree["model"][k].tobytes()
        for k, v in zip(tree["model"], model.variables, strict=True)
    )


def _weights(model: keras.Model) -> list[tuple[str, bytes]]:
    return _bytes(model.variables)


def _saved(tmp_path, model: keras.Model, **kwargs: object) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run")
    save_state(store, 1, KerasState(model, model.optimizer, **kwargs))  # type: ignore[arg-type]
    return store


def test_shape_mismatch_lists_each_variable_and_assigns_nothing(tmp_path):
    """A layer of another width is refused, naming each variable's saved and current shape, before any assignment."""
    keras.backend.clear_session()
    store = _saved(tmp_path, _compiled())
    other = _compiled(width=9)
    before = _weights(other)
    with pytest.raises(ConfigMismatchError) as info:
        load_state(store, KerasState(other, other.optimizer))
    message = str(info.value)
    assert f"{store.root}, step 1: part 'model': the saved variables do not fit:" in message
    assert "0000:dense_4/kernel: saved (4, 8) float32, here (4, 9) float32" in message
    assert "build it with the same sizes and dtypes" in message
    assert _weights(other) == before


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    """A model with one more layer is refused with the missing and unexpected keys."""
    keras.backend.clear_session()
    store = _saved(tmp_path, _compiled(), rng=False)
    keras.backend.clear_session()
    other = _compiled(extra=True)
    with pytest.raises(ConfigMismatchError) as info:
        load_state(store, KerasState(other, other.optimizer, rng=False))
    assert str(info.value) == (
        f"{store.root}, step 1: part 'model': the saved variables do not match: missing keys "
        "['0013:dense_4/kernel', '0014:dense_4/bias'], unexpected keys []; load it into a model "
        "built like the one it was saved from (same layers, same order)"
    )


def test_dtype_mismatch_is_refused(tmp_path):
    """A variable saved as bfloat16 does not load into a float32 one."""
    bf16 = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="bfloat16")], name="m")
    f32 = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)], name="m")
    tree = KerasState(bf16, rng=False).state_dict()
    with pytest.raises(
        ConfigMismatchError, match=r"saved \(2, 2\) bfloat16, here \(2, 2\) float32"
    ):
        KerasState(f32, rng=False).load_state_dict(tree)


def test_unbuilt_model_is_refused_on_save_and_on_load():
    """An unbuilt model has no variables: saving says to build it, loading says so too."""
    built = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"Sequential has no variables yet: build it"):
        KerasState(unbuilt).state_dict()
    with pytest.raises(
        ConfigMismatchError,
        match=r"do not match \(it has no variables yet: build it before loading\)",
    ):
        KerasState(unbuilt, rng=False).load_state_dict(KerasState(built, rng=False).state_dict())


def test_parts_must_match_the_state(tmp_path):
    """A state saved without an optimizer or RNG is refused by a KerasState that has them."""
    model = _compiled()
    tree = KerasState(model, rng=False).state_dict()
    with pytest.raises(
        ConfigMismatchError,
        match=r"KerasState: the saved parts do not match: missing \['optimizer', 'rng'\], unexpected \[\]",
    ):
        KerasState(model, model.optimizer).load_state_dict(tree)
    with pytest.raises(ConfigMismatchError, match=r"the saved state is a list, not a dict"):
        KerasState(model).load_state_dict([])


def test_other_optimizer_is_refused_and_nothing_is_assigned(tmp_path):
    """Adam's state does not load into SGD, and the model (which fits) is not changed either."""
    keras.backend.clear_session()
    model = _compiled()
    store = _saved(tmp_path, model, rng=False)
    model.get_layer("dense").kernel.assign(np.ones((4, 8), "float32"))
    before = _weights(model)
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    with pytest.raises(ConfigMismatchError) as info:
        load_state(store, KerasState(model, sgd, rng=False))
    message = str(info.value)
    assert (
        "part 'optimizer': the saved variables do not match: missing keys ['0000:sgd/iteration'"
        in message
    )
    assert "use the same optimizer class and options" in message
    assert _weights(model) == before


def test_malformed_rng_state_is_refused_before_anything_is_assigned():
    """A corrupt Python RNG state raises CorruptCheckpointError naming it, and no variable changes."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    state = KerasState(model)
    tree = state.state_dict()
    tree["rng"]["python"] = (3, (1, 2), None)
    model.layers[0].kernel.assign(np.ones((2, 2), "float32"))
    with pytest.raises(
        CorruptCheckpointError,
        match=r"KerasState: part 'rng': the saved state of the python random generator is malformed",
    ):
        state.load_state_dict(tree)
    assert np.all(to_numpy(model.layers[0].kernel) == 1.0)


def _draws() -> list[float]:
    """One draw from each global generator: Keras', Python's, NumPy's, then the backend's own."""
    draws = [float(to_numpy(keras.random.normal(()))), random.random(), float(np.random.rand())]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        draws.append(float(tf.random.get_global_generator().normal(()).numpy()))
    elif BACKEND == "torch":
        import torch

        draws.append(float(torch.rand(())))
    return draws


def test_global_generators_are_restored():
    """Keras' global seed generator, Python's, NumPy's and the backend's own (TF's, torch's) continue exactly."""
    keras.utils.set_random_seed(3)
    _draws()
    state = KerasState(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    tree = state.state_dict()
    expected = _draws()
    _draws()
    state.load_state_dict(tree)
    assert _draws() == expected


def test_generators_not_yet_created_are_removed_again():
    """A state saved before the global Keras (and TF) generators existed leaves them uncreated."""
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    if BACKEND == "tensorflow":
        from tensorflow.python.ops import stateful_random_ops

        stateful_random_ops.global_generator = None
    state = KerasState(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    tree = state.state_dict()
    assert tree["rng"]["keras"] is None and tree["rng"].get("tf") is None
    expected = _draws()
    state.load_state_dict(tree)
    assert global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR) is None
    if BACKEND == "tensorflow":
        assert stateful_random_ops.global_generator is None
    assert _draws()[1:3] == expected[1:3]  # Python's and NumPy's; the others are made anew


def test_the_rng_part_names_the_backend_it_was_saved_on():
    """Each backend saves its own generator: TF's global one, torch's CPU one, none on JAX."""
    tree = KerasState(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])).state_dict()
    own = {"tensorflow": {"tf"}, "torch": {"torch"}}.get(BACKEND, set())
    assert set(tree["rng"]) == {"keras", "python", "numpy"} | own


def test_a_keras_model_loads_its_weights_from_a_keras_state_checkpoint(tmp_path):
    """load_state(store, model) takes the "model" part of what KerasState (or fit's callback) saved."""
    keras.backend.clear_session()
    model = _compiled()
    _fit(model, 1)
    store = _saved(tmp_path, model)
    other = _compiled()
    assert _weights(other) != _weights(model)
    record = load_state(store, other)
    assert record.step == 1 and _weights(other) == _weights(model)
    assert not other.optimizer.built  # the weights only
