"""TFState beyond variables: tf.data iterators, Keras objects inside tf.Modules, state it must refuse."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from ckptkit import (  # noqa: E402
    CheckpointStore,
    ConfigMismatchError,
    CorruptCheckpointError,
    UnsupportedStateError,
)
from ckptkit.adapters.keras import TFState, load_state, save_state  # noqa: E402

pytestmark = pytest.mark.tensorflow_only


def dataset(buffer: int = 50) -> Any:
    """Shuffled anew each pass, repeated, batched: its position is more than a count."""
    return tf.data.Dataset.range(100).shuffle(buffer, seed=3).repeat().batch(8)


def draw(iterator: Any, n: int) -> list[list[int]]:
    return [next(iterator).numpy().tolist() for _ in range(n)]


def test_a_tf_data_iterator_resumes_at_its_exact_position(tmp_path: Path) -> None:
    """Saved mid-pass (a shuffle buffer half used), an iterator of a new identical dataset continues exactly."""
    it = iter(dataset())
    draw(it, 17)  # into the second pass over the data
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TFState(it=it))
    expected = draw(it, 20)

    fresh = iter(dataset())
    load_state(store, TFState(it=fresh))
    assert draw(fresh, 20) == expected
    tensors = store.tensor_info(0)
    assert all(name.startswith("it.tf.data iterator.") for name in tensors)
    assert {info.dtype for info in tensors.values()} == {"U8"}


def test_an_iterator_of_another_dataset_is_refused_and_keeps_its_position(tmp_path: Path) -> None:
    """A position that does not fit the dataset raises; that iterator and every other part are unchanged."""
    store = CheckpointStore(tmp_path)
    w = tf.Variable(1.0)
    save_state(store, 0, TFState(it=iter(dataset()), w=w))

    other = iter(tf.data.Dataset.range(100).map(lambda x: x * 2).batch(8))
    draw(other, 2)
    w.assign(5.0)
    with pytest.raises(ConfigMismatchError) as info:
        load_state(store, TFState(it=other, w=w))
    assert str(info.value).startswith(
        f"{store.root}, step 0: part 'it': the saved position does not fit this iterator: make "
        "its dataset exactly as when it was saved (Failed to restore dataset iterator"
    )
    assert draw(other, 1) == [list(range(32, 48, 2))]  # its third batch, as before the call
    assert float(w.numpy()) == 5.0


def test_an_iterator_tensorflow_cannot_serialise_is_refused_when_saving(tmp_path: Path) -> None:
    """A dataset made by a Python generator: saving says why and what to do, and saves nothing."""

    def numbers() -> Any:
        yield from range(10)

    gen = tf.data.Dataset.from_generator(numbers, output_signature=tf.TensorSpec((), tf.int64))
    store = CheckpointStore(tmp_path)
    with pytest.raises(UnsupportedStateError) as info:
        save_state(store, 0, TFState(it=iter(gen)))
    assert str(info.value).startswith(
        "TFState(it=...): TensorFlow cannot save this tf.data iterator's position (PyFunc is "
        "stateful"
    )
    assert "build the dataset from tensors or files without Python functions" in str(info.value)
    assert len(store) == 0


def test_a_malformed_iterator_state_is_refused_as_corrupt() -> None:
    """Bytes that are not TensorFlow's serialised tensors raise CorruptCheckpointError, naming the piece."""
    with pytest.raises(
        CorruptCheckpointError,
        match=r"TFState: part 'it': piece 0 of the iterator state is malformed",
    ):
        TFState(it=iter(dataset())).load_state_dict(
            {"it": {"tf.data iterator": [np.frombuffer(b"garbage", np.uint8)]}}
        )
    with pytest.raises(
        ConfigMismatchError, match=r"part 'it': the saved state is not a tf.data iterator's"
    ):
        TFState(it=iter(dataset())).load_state_dict({"it": {"0000:w": np.zeros(2)}})


class WithKeras(tf.Module):
    """A tf.Module holding a Keras Dropout layer, a bare SeedGenerator and a Dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = keras.layers.Dropout(0.5, seed=1)
        self.noise = [keras.random.SeedGenerator(2)]
        self.dense = keras.layers.Dense(3)
        self.dense.build((None, 4))

    def __call__(self, x: Any) -> Any:
        h = self.drop(self.dense(x), training=True)
        return h + keras.random.normal(keras.ops.shape(h), seed=self.noise[0])


def test_keras_seed_generators_inside_a_tf_module_are_saved(tmp_path: Path) -> None:
    """Dropout's seed state and a bare SeedGenerator in a tf.Module come back: the same masks and noise."""
    net = WithKeras()
    x = np.ones((2, 4), "float32")
    net(x)
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TFState(net=net))
    expected = [net(x).numpy() for _ in range(3)]
    load_state(store, TFState(net=net))
    assert all(np.array_equal(net(x).numpy(), e) for e in expected)
    keys = [re.sub(r"_\d+(?=/)", "", key) for key in store.load(0)["net"]]
    assert keys == [
        "noise/0/0000:seed_generator/seed_generator_state",
        "drop/0000:seed_generator/seed_generator_state",
        "dense/0000:dense/kernel",
        "dense/0001:dense/bias",
    ]


def test_state_tfstate_cannot_save_is_refused_naming_its_path() -> None:
    """A tf.lookup table, or an iterator inside a module, raises naming the path and what to do."""
    net = tf.Module()
    net.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)
    with pytest.raises(UnsupportedStateError) as info:
        TFState(net=net).state_dict()
    assert str(info.value) == (
        "TFState(net=...): 'table' is a MutableHashTable, whose state is not variables and which "
        "TFState cannot save; keep it out of the objects you pass (or hold its values in "
        "tf.Variables)"
    )
    holder = tf.Module()
    holder.inner = tf.Module()
    holder.inner.it = iter(dataset())
    with pytest.raises(
        UnsupportedStateError,
        match=r"'inner/it' is a tf.data iterator inside the object; pass it as a part of its own \(TFState\(\.\.\., inner_it=iterator\)\)",
    ):
        TFState(net=holder).state_dict()
