"""The only module that reaches into Keras' and TensorFlow's private modules and attributes.

A bit-exact resume needs a few pieces of state that neither library exposes publicly. Each is
reached here, through one function, with the reason it cannot be had another way; when a
Keras or TensorFlow release moves one, this module (and the test that exercises that function)
is where it shows.
"""

from __future__ import annotations

from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
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


def iterator_resource(iterator: Any) -> Any:
    """The resource handle of a ``tf.data`` iterator (an ``OwnedIterator``).

    ``tf.raw_ops.SerializeIterator`` and ``DeserializeIterator`` (public) take it; tf.data has
    no public way to get an iterator's state as bytes (``tf.train.Checkpoint`` writes it into
    a checkpoint file of its own).

    Raises:
        TypeError: the iterator has no resource (a distributed or a Python iterator).
    """
    resource = getattr(iterator, "_iterator_resource", None)
    if resource is None:
        raise TypeError(
            f"{type(iterator).__name__} has no tf.data iterator resource: pass the iterator "
            "iter(dataset) returns for a tf.data.Dataset, outside any distribution strategy"
        )
    return resource


def iterator_external_state_policy(iterator: Any) -> int:
    """The external-state policy a checkpoint of this iterator uses, as tf.train.Checkpoint does.

    The dataset's ``options().experimental_external_state_policy`` when set, else FAIL (an
    iterator whose state depends on Python code or other state outside the graph is refused).
    The dataset is reachable only through the iterator's private ``_dataset``.
    """
    policy = tf.data.experimental.ExternalStatePolicy.FAIL
    dataset = getattr(iterator, "_dataset", None)
    if dataset is not None:
        policy = dataset.options().experimental_external_state_policy or policy
    return int(policy.value)


def module_seed_generators(module: tf.Module) -> list[tuple[str, Any]]:
    """The Keras SeedGenerators a ``tf.Module`` holds directly (in attributes, lists, dicts).

    A SeedGenerator is not a TensorFlow trackable, so the trackable object graph (and
    ``tf.train.Checkpoint``) never reaches its state; ``tf.Module._flatten`` walks the
    attributes as ``tf.Module.variables`` does. Paths are attribute names and positions
    joined with ``/``; nested tf.Modules are not entered (the caller visits each module).
    """
    found = module._flatten(
        recursive=False,
        predicate=lambda value: isinstance(value, keras.random.SeedGenerator),
        with_path=True,
    )
    return [("/".join(str(part) for part in path), generator) for path, generator in found]


# TensorFlow's trackable base class, reached as tf.__internal__.tracking.Trackable (TensorFlow's
# internal namespace): what tf.train.Checkpoint saves, and what TFState accepts.
Trackable = tf.__internal__.tracking.Trackable


def has_own_checkpoint_state(obj: Any) -> bool:
    """Whether a trackable saves state of its own in a ``tf.train.Checkpoint``, not variables.

    Such an object (a ``tf.lookup`` table, an iterator, a variable) overrides Trackable's
    private ``_serialize_to_tensors`` or its older ``_gather_saveables_for_checkpoint``; no
    public API tells it apart from a container of variables (a tf.Module, a list).
    """
    cls = type(obj)
    return (
        cls._serialize_to_tensors is not Trackable._serialize_to_tensors
        or cls._gather_saveables_for_checkpoint is not Trackable._gather_saveables_for_checkpoint
    )
