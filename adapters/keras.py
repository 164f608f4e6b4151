"""Keras 3 adapter: a ``model.fit`` callback and state objects, on every Keras backend.

Model and optimizer variables, their ``keras.random.SeedGenerator`` states, Keras' global seed
generator and the backend's own (TensorFlow's global ``tf.random.Generator``, torch's CPU
generator) convert to ckptkit's framework-free tree (numpy arrays and JSON values), with the
same function names as ``ckptkit.adapters.torch``. ``KerasState`` and ``CheckpointCallback``
work on the TensorFlow, JAX and PyTorch backends (``KERAS_BACKEND``), with bit-exact
``model.fit`` resume on each; a model's weights saved on one backend load on another.
``TFState`` (plain TensorFlow objects: ``tf.Module``, ``tf.random.Generator``, ``tf.data``
iterators) needs the TensorFlow backend, and raises on the others saying what to use instead.

Example:
    >>> from ckptkit import CheckpointStore, StoppingPolicy
    >>> from ckptkit.adapters.keras import CheckpointCallback
    >>> callback = CheckpointCallback(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"))
    >>> model.fit(x, y, validation_data=(xv, yv), epochs=100,
    ...           initial_epoch=callback.initial_epoch, callbacks=[callback])
"""

from __future__ import annotations

try:
    import keras  # type: ignore[import-untyped,unused-ignore]  # noqa: F401 - the check itself
except ImportError as e:  # pragma: no cover - exercised in the torch test environment
    raise ImportError(
        "ckptkit.adapters.keras needs Keras 3 and a backend for it, which are not installed: "
        "pip install 'ckptkit-ml[keras]' (TensorFlow), 'ckptkit-ml[keras-jax]' or "
        "'ckptkit-ml[keras-torch]'"
    ) from e

from ._keras_callback import CheckpointCallback
from ._keras_resume import NewStageWarning
from ._keras_state import (
    KerasState,
    TFState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

__all__ = [
    "CheckpointCallback",
    "KerasState",
    "NewStageWarning",
    "TFState",
    "load_state",
    "save_state",
    "state_to_tree",
    "tree_to_state",
]
