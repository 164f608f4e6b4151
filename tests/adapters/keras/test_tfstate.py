"""TFState in tf.GradientTape loops: keys from the trackable graph, exact resume, strict checks."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from ckptkit import CheckpointStore, ConfigMismatchError  # noqa: E402
from ckptkit.adapters._keras_state import TFState, load_state, save_state  # noqa: E402

pytestmark = pytest.mark.tensorflow_only


def _bytes(variables: list[object]) -> list[tuple[str, bytes]]:
    return [(str(v.dtype), np.asarray(v.numpy()).tobytes()) for v in variables]  # type: ignore[attr-defined]


class _Block(tf.Module):
    def __init__(self, n_in: int, n_out: int, seed: int) -> None:
        super().__init__()
        init = tf.random.Generator.from_seed(seed)
        self.w = tf.Variable(init.normal((n_in, n_out)))
        self.b = tf.Variable(tf.zeros((n_out,)))


class _Net(tf.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.layers = [_Block(3, 8, seed), _Block(8, 1, seed + 1)]
        self.velocity = [tf.Variable(tf.zeros_like(p)) for p in self.params()]
        self.steps = tf.Variable(0, dtype=tf.int64)

    def params(self) -> list[tf.Variable]:
        return [self.layers[0].w, self.layers[0].b, self.layers[1].w, self.layers[1].b]

    def __call__(self, x: tf.Tensor, noise: tf.random.Generator) -> tf.Tensor:
        h = tf.nn.relu(x @ self.layers[0].w + self.layers[0].b)
        keep = tf.cast(noise.uniform(tf.shape(h)) > 0.2, h.dtype)  # dropout from the generator
        return (h * keep) @ self.layers[1].w + self.layers[1].b


def _tape_steps(net: _Net, noise: tf.random.Generator, data: tf.random.Generator, n: int) -> None:
    params, velocity = net.params(), net.velocity
    for _ in range(n):
        x = data.normal((16, 3))
        y = tf.reduce_sum(x, axis=1, keepdims=True)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((net(x, noise) - y) ** 2)
        for p, v, g in zip(params, velocity, tape.gradient(loss, params), strict=True):
            v.assign(0.9 * v + g)
            p.assign_sub(0.01 * v)
        net.steps.assign_add(1)


def test_tfstate_keys_come_from_the_trackable_object_graph():
    """A tf.Module's variables are keyed by their attribute path; generators hold state and algorithm."""
    net = _Net(0)
    tree = TFState(
        net=net, noise=tf.random.Generator.from_seed(1), lr=tf.Variable(0.5)
    ).state_dict()
    assert set(tree["net"]) >= {"layers/0/w", "layers/1/b", "velocity/0", "steps"}
    assert tree["noise"]["algorithm"] == 1 and tree["noise"]["state"].dtype == np.int64
    assert tree["lr"] == np.float32(0.5)


def test_gradient_tape_loop_resumed_from_store_is_bitwise_equal(tmp_path):
    """A GradientTape loop saved after 3 steps and resumed in fresh objects matches 6 uninterrupted steps."""
    whole = _Net(0)
    noise, data = tf.random.Generator.from_seed(1), tf.random.Generator.from_seed(2)
    _tape_steps(whole, noise, data, 6)

    first = _Net(0)
    noise, data = tf.random.Generator.from_seed(1), tf.random.Generator.from_seed(2)
    _tape_steps(first, noise, data, 3)
    store = CheckpointStore(tmp_path / "run")
    save_state(store, 3, TFState(net=first, noise=noise, data=data))

    resumed = _Net(99)
    noise, data = tf.random.Generator.from_seed(5), tf.random.Generator.from_seed(6)
    load_state(store, TFState(net=resumed, noise=noise, data=data))
    _tape_steps(resumed, noise, data, 3)
    assert _bytes(list(resumed.variables)) == _bytes(list(whole.variables))
    assert int(resumed.steps.numpy()) == 6


def test_tfstate_refuses_other_generators_paths_and_objects():
    """Another generator algorithm, another module layout and non-trackable objects are refused clearly."""
    philox = tf.random.Generator.from_seed(1, alg="philox")
    threefry = tf.random.Generator.from_seed(1, alg="threefry")
    with pytest.raises(
        ConfigMismatchError,
        match=r"TFState: part 'g': saved from a generator with algorithm 1 and state shape \(3,\), this one has 2 and \(2,\)",
    ):
        TFState(g=threefry).load_state_dict(TFState(g=philox).state_dict())
    small = tf.Module()
    small.w = tf.Variable(1.0)
    with pytest.raises(
        ConfigMismatchError,
        match=r"part 'net': the saved variables do not match: missing keys \['w'\], unexpected keys \['layers/0/b', 'layers/0/w'",
    ):
        TFState(net=small).load_state_dict(TFState(net=_Net(0)).state_dict())
    with pytest.raises(
        ConfigMismatchError,
        match=r"part 'v': the saved variables do not fit: \['value: saved \(\) float32, here \(\) int32'\]",
    ):
        TFState(v=tf.Variable(1)).load_state_dict({"v": np.float32(1.0)})
    with pytest.raises(TypeError, match=r"TFState\(x=\.\.\.\) is a list: pass tf.Modules"):
        TFState(x=[1])
    with pytest.raises(ValueError, match=r"TFState\(\) holds nothing"):
        TFState()


def test_tfstate_keys_keras_objects_as_keras_state_does(tmp_path):
    """In a TFState, a Keras model keeps its Dropout seed state and its keys through compile, and an optimizer reloads."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dropout(0.5)])
    before = set(TFState(net=model).state_dict()["net"])
    assert any("seed_generator_state" in key for key in before)
    opt = keras.optimizers.Adam(0.01)
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 4)), epochs=1, verbose=0)
    assert set(TFState(net=model).state_dict()["net"]) == before

    store = CheckpointStore(tmp_path)
    save_state(store, 0, TFState(net=model, opt=opt))
    saved = [v.numpy().copy() for v in opt.variables]
    model.fit(np.ones((8, 3)), np.zeros((8, 4)), epochs=1, verbose=0)
    load_state(store, TFState(net=model, opt=opt))
    for variable, value in zip(opt.variables, saved, strict=True):
        assert variable.numpy().tobytes() == value.tobytes()
