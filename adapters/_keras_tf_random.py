"""TensorFlow's random generators: a ``tf.random.Generator``'s state, and the global one's.

Imported on Keras' TensorFlow backend only: by ``TFState``, and for the ``"tf"`` entry of the
RNG state (:mod:`._keras_rng`), TensorFlow's global generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

from ckptkit._errors import ConfigMismatchError

from . import _keras_tf_private as private
from ._keras_convert import to_numpy


def generator_state(generator: tf.random.Generator) -> dict[str, Any]:
    """A ``tf.random.Generator``'s state: its state variable and its algorithm."""
    return {"state": np.asarray(generator.state.numpy()), "algorithm": int(generator.algorithm)}


def check_generator(saved: Any, where: str, generator: tf.random.Generator | None) -> None:
    """Refuse a saved generator state of the wrong form, or (given one) another algorithm."""
    if not (
        isinstance(saved, Mapping)
        and set(saved) == {"state", "algorithm"}
        and isinstance(saved["algorithm"], int)
        and isinstance(to_numpy(saved["state"]), np.ndarray)
    ):
        raise ConfigMismatchError(f"{where}: the saved state is not a tf.random.Generator's")
    state = to_numpy(saved["state"])
    if generator is not None:
        here = generator_state(generator)
        if saved["algorithm"] != here["algorithm"] or state.shape != here["state"].shape:
            raise ConfigMismatchError(
                f"{where}: saved from a generator with algorithm {saved['algorithm']} and state "
                f"shape {state.shape}, this one has {here['algorithm']} and "
                f"{here['state'].shape}; make it with the same algorithm"
            )


def capture_global() -> dict[str, Any] | None:
    """TensorFlow's global generator's state, or None while nothing has created it."""
    generator = private.tf_global_generator()
    return None if generator is None else generator_state(generator)


def check_global(saved: Any, where: str) -> None:
    """Refuse a malformed saved state of the global generator."""
    if saved is not None:
        check_generator(saved, where, None)


def restore_global(saved: Any) -> None:
    """Set TensorFlow's global generator to a state checked by :func:`check_global`.

    None removes it, so it is created the same way the next time it is needed.
    """
    current = private.tf_global_generator()
    if saved is None:
        private.remove_tf_global_generator()
    elif current is not None and int(current.algorithm) == saved["algorithm"]:
        current.reset(to_numpy(saved["state"]))  # in place: tf.functions keep seeing it
    else:
        tf.random.set_global_generator(
            tf.random.Generator.from_state(to_numpy(saved["state"]), saved["algorithm"])
        )
