"""The only module that reaches into TensorFlow's private modules and attributes.

Imported on Keras' TensorFlow backend only (by ``TFState`` and the TensorFlow global
generator's part of the RNG state). Each piece of state TensorFlow does not expose publicly
is reached here, through one function, with the reason it cannot be had another way.
"""

from __future__ import annotations

from typing import Any

import keras  # type: ignore[import-untyped,import-not-found,unused-ignore]
import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

# TensorFlow's global tf.random.Generator: tf.random.get_global_generator() creates it when it
# does not exist yet, and there is no public way to remove it again.
from tensorflow.python.ops import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    stateful_random_ops as _tf_random,
)


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
