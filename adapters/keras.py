"""Keras 3 adapter: a ``model.fit`` callback and state objects for ``tf.GradientTape`` loops.

Model and optimizer variables, the Keras and TensorFlow random generators, and plain
``tf.Module``s convert to ckptkit's framework-free tree (numpy arrays and JSON values), with the
same function names as ``ckptkit.adapters.torch``. Keras runs on the TensorFlow backend here.

Example:
    >>> from ckptkit import CheckpointStore, StoppingPolicy
    >>> from ckptkit.adapters.keras import CheckpointCallback
    >>> callback = CheckpointCallback(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"))
    >>> model.fit(x, y, validation_data=(xv, yv), epochs=100,
    ...           initial_epoch=callback.initial_epoch, callbacks=[callback])
"""

from __future__ import annotations

try:
    import keras as _keras  # type: ignore[import-untyped,unused-ignore]
except ImportError as e:  # pragma: no cover - exercised in the torch test environment
    raise ImportError(
        "ckptkit.adapters.keras needs Keras 3 and TensorFlow, which are not installed: "
        "pip install 'ckptkit-ml[keras]'"
    ) from e

if _keras.backend.backend() != "tensorflow":
    # The state objects read TensorFlow variables and generators directly; on another backend
    # they would save a partial state, so refuse rather than resume inexactly.
    raise ImportError(
        "ckptkit.adapters.keras supports Keras on the TensorFlow backend only, and this Keras "
        f"runs on {_keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow before importing "
        "keras (for PyTorch models, use ckptkit.adapters.torch)"
    )

from ._keras_callback import CheckpointCallback
from ._keras_resume import NewStageWarning
from ._keras_state import (
    KerasState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)
from ._keras_tf import TFState

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
