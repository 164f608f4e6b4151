"""A real Keras model given to the core names KerasState (or the fit callback) in its error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy  # noqa: E402


def test_checkpointer_of_a_bare_keras_model_says_to_wrap_it_in_keras_state(
    tmp_path: Path,
) -> None:
    """Checkpointer(store, policy, keras_model) fails at once with KerasState(model=model)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"^state is a Keras/TensorFlow Sequential") as e:
        Checkpointer(CheckpointStore(tmp_path), StoppingPolicy(monitor="val_loss"), model)
    assert "KerasState(model=model) from ckptkit.adapters.keras" in str(e.value)
    assert "CheckpointCallback" in str(e.value)


def test_checkpointer_of_a_dict_with_a_keras_optimizer_names_every_part(tmp_path: Path) -> None:
    """A dict of model and optimizer is refused naming one KerasState with both."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    parts = {"model": model, "optimizer": keras.optimizers.Adam()}
    with pytest.raises(TypeError, match=r"^state\['model'\] is a Keras/TensorFlow") as e:
        Checkpointer(CheckpointStore(tmp_path), None, parts)
    assert "KerasState(model=model, optimizer=optimizer)" in str(e.value)
