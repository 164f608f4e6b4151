"""The only module that reaches into Keras' and TensorFlow's private modules and attributes.

A bit-exact resume needs a few pieces of state that neither library exposes publicly. Each is
reached here, through one function, with the reason it cannot be had another way; when a
Keras or TensorFlow release moves one, this module (and the test that exercises that function)
is where it shows.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf  # type: ignore[import-untyped,unused-ignore]

# Keras keeps its global SeedGenerator (what keras.random.* and initializers draw from when no
# seed is given) as a global attribute; no public function reads it without creating it, and a
# state saved before it existed must be restored as "not created yet".
from keras.src.backend.common import (  # type: ignore[import-untyped,unused-ignore]
    global_state as _keras_global_state,
)
from keras.src.random import (  # type: ignore[import-untyped,unused-ignore]
    seed_generator as _keras_seed_generator,
)

# TensorFlow's global tf.random.Generator: tf.random.get_global_generator() creates it when it
# does not exist yet, and there is no public way to remove it again.
from tensorflow.python.ops import (  # type: ignore[import-untyped,unused-ignore]
    stateful_random_ops as _tf_random,
)

_KERAS_GLOBAL = _keras_seed_generator.GLOBAL_SEED_GENERATOR


def keras_global_seed_generator() -> Any:
    """Keras' global SeedGenerator, or None while nothing has created it."""
    return _keras_global_state.get_global_attribute(_KERAS_GLOBAL)


def make_keras_global_seed_generator() -> Any:
    """Keras' global SeedGenerator, created as Keras creates it when it does not exist yet."""
    return _keras_seed_generator.global_seed_generator()


def remove_keras_global_seed_generator() -> None:
    """Forget Keras' global SeedGenerator, so the next use creates it again."""
    _keras_global_state.set_global_attribute(_KERAS_GLOBAL, None)


def tf_global_generator() -> Any:
    """TensorFlow's global tf.random.Generator, or None while nothing has created it."""
    return _tf_random.global_generator


def remove_tf_global_generator() -> None:
    """Forget TensorFlow's global generator, so the next use creates it again."""
    _tf_random.global_generator = None


# TensorFlow's trackable base class, reached as tf.__internal__.tracking.Trackable (TensorFlow's
# internal namespace): what tf.train.Checkpoint saves, and what TFState accepts.
Trackable = tf.__internal__.tracking.Trackable
