"""The only module that reaches into Keras' private modules; backend-neutral.

A bit-exact resume needs a few pieces of state that Keras does not expose publicly. Each is
reached here, through one function, with the reason it cannot be had another way; when a
Keras release moves one, this module (and the test that exercises that function) is where it
shows. TensorFlow's private pieces, needed by ``TFState`` only, are in ``_keras_tf_private``.
"""

from __future__ import annotations

from typing import Any

# Keras keeps its global SeedGenerator (what keras.random.* and initializers draw from when no
# seed is given) as a global attribute; no public function reads it without creating it, and a
# state saved before it existed must be restored as "not created yet".
from keras.src.backend.common import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    global_state as _keras_global_state,
)
from keras.src.random import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    seed_generator as _keras_seed_generator,
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
