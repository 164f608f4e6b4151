"""What stands in for ``TFState`` on Keras' JAX and PyTorch backends: a clear refusal.

``TFState`` holds TensorFlow objects (``tf.Module``, ``tf.Variable``, ``tf.random.Generator``,
``tf.data`` iterators), whose state this adapter reads with TensorFlow itself; on another
backend there is no TensorFlow to read them with, or they are not what the model trains with.
The names exist, so code written for both backends imports, and raise where used.
"""

from __future__ import annotations

from typing import Any, NoReturn

import keras  # type: ignore[import-untyped,unused-ignore]

from ckptkit._errors import UnsupportedStateError


def _refuse(what: str) -> NoReturn:
    raise UnsupportedStateError(
        f"{what} is for TensorFlow objects (tf.Module, tf.Variable, tf.random.Generator, "
        "tf.data iterators) on Keras' TensorFlow backend, and this Keras runs on "
        f"{keras.backend.backend()!r}: use KerasState(model, optimizer) for a Keras model, "
        "its optimizer and its keras.random.SeedGenerators (it works on every backend), or "
        "set KERAS_BACKEND=tensorflow before importing keras"
    )


class TFState:
    """``TFState`` on a backend other than TensorFlow: making one raises.

    Raises:
        UnsupportedStateError: always, saying to use ``KerasState`` or the TensorFlow backend.
    """

    def __init__(self, *, rng: bool = False, **objects: Any) -> None:
        _refuse("TFState")

    def _load(self, tree: Any, where: str) -> None:  # pragma: no cover - never made
        _refuse("TFState")


def is_tf_object(obj: Any) -> bool:
    """Whether ``obj`` is a TensorFlow object (its class comes from the tensorflow package)."""
    return type(obj).__module__.split(".", 1)[0] in {"tensorflow", "tf_keras"}


def own_state(obj: Any, where: str) -> Any:
    """Refuse a TensorFlow object: its state is read on the TensorFlow backend only.

    Raises:
        UnsupportedStateError: always, naming the object.
    """
    raise UnsupportedStateError(
        f"{where}: a {type(obj).__name__} is a TensorFlow object, whose state this adapter "
        f"reads on Keras' TensorFlow backend only, and this Keras runs on "
        f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow, or keep the state in "
        "Keras variables and save it with KerasState"
    )
