"""TFState: plain TensorFlow objects by name, for ``tf.GradientTape`` loops (TensorFlow backend).

What each object's state is: a ``tf.Module``'s variables keyed by their path in the trackable
object graph (the names ``tf.train.Checkpoint`` gives them), with the Keras layers, optimizers
and SeedGenerators in it keyed as Keras keys them (the graph misses their seed states); a
``tf.data`` iterator's position as the bytes TensorFlow serialises it to; a generator's state.
A state this module cannot save (a ``tf.lookup`` table, an iterator inside a module) is refused
when saving, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import numpy as np
import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

from ckptkit._errors import ConfigMismatchError, CorruptCheckpointError, UnsupportedStateError

from . import _keras_tf_private as private
from ._keras_convert import (
    VARIABLE_TYPES,
    Pairs,
    assign,
    capture,
    check_parts,
    keras_keys,
    match,
    to_numpy,
)
from ._keras_rng import capture_rng, check_rng, restore_rng
from ._keras_tf_random import check_generator, generator_state

_KERAS_OBJECTS = (keras.layers.Layer, keras.optimizers.Optimizer)
#: The key of an iterator's part: a list of uint8 arrays, one serialised tensor each.
ITERATOR_KEY = "tf.data iterator"


class TFState:
    """Plain TensorFlow objects by name, for ``tf.GradientTape`` loops.

    Each object is one part of the tree:

    - a ``tf.Module`` (or any trackable): its variables keyed by their path in the trackable
      object graph (``"dense/kernel"``, ``"layers/0/bias"``: the names ``tf.train.Checkpoint``
      gives them, so they do not depend on creation order). Keras layers, models, optimizers
      and SeedGenerators inside it are keyed ``"{path}/{index:04d}:{variable.path}"`` from
      their ``.variables``, which hold the seed-generator states the graph does not reach
      (Dropout's, for one);
    - a Keras layer, model or optimizer passed directly: its ``.variables``, as
      :class:`KerasState` keys them;
    - a ``tf.Variable``: its value; a ``tf.random.Generator``: its state and algorithm;
    - a ``tf.data`` iterator (``iter(dataset)``): its position, serialised by TensorFlow
      (shuffle buffers and their random state included), as raw bytes. Loading parses them
      with TensorFlow's ``parse_tensor`` and restores them with ``DeserializeIterator`` into an
      iterator made the same way; no Python code is read from the checkpoint.

    With ``rng=True`` the global generators too, as in :class:`KerasState`.

    Raises:
        TypeError: an object is not trackable, or is an iterator without a tf.data resource.

    Example:
        >>> it = iter(tf.data.Dataset.range(1000).shuffle(100, seed=0).batch(32))
        >>> state = TFState(net=net, opt=opt, noise=tf.random.Generator.from_seed(0), data=it)
        >>> record = save_state(store, 10, state)
    """

    def __init__(self, *, rng: bool = False, **objects: Any) -> None:
        for name, obj in objects.items():
            if not isinstance(obj, private.Trackable):
                raise TypeError(
                    f"TFState({name}=...) is a {type(obj).__name__}: pass tf.Modules, "
                    "tf.Variables, tf.random.Generators, tf.data iterators or other trackable "
                    "objects"
                )
            if isinstance(obj, tf.data.Iterator):
                try:
                    private.iterator_resource(obj)
                except TypeError as e:
                    raise TypeError(f"TFState({name}=...): {e}") from e
        if not objects and not rng:
            raise ValueError("TFState() holds nothing: pass objects by name, or rng=True")
        self.objects = dict(objects)
        self.rng = bool(rng)

    def __repr__(self) -> str:
        parts = [f"{n}={type(o).__name__}" for n, o in self.objects.items()]
        return f"TFState({', '.join([*parts, f'rng={self.rng}'])})"

    def state_dict(self) -> dict[str, Any]:
        """Every object's state (and with ``rng`` the generators'), as one core tree.

        Raises:
            UnsupportedStateError: an object holds state this adapter cannot save (the
                message names its path and what to do); nothing is saved.
        """
        tree = {name: own_state(obj, f"TFState({name}=...)") for name, obj in self.objects.items()}
        if self.rng:
            tree["rng"] = capture_rng()
        return tree

    def load_state_dict(self, tree: Any, /) -> None:
        """Restore every object from a tree made by :meth:`state_dict`, after checking it all.

        Raises:
            ConfigMismatchError: parts, variable paths, shapes, dtypes, a generator's
                algorithm or an iterator's dataset differ (listed); nothing is changed then.
            CorruptCheckpointError: an iterator's or the RNG's saved state is malformed.
        """
        self._load(tree, "TFState")

    def _load(self, tree: Any, where: str) -> None:
        names = set(self.objects) | ({"rng"} if self.rng else set())
        check_parts(tree, names, where, "the same names and rng=...")
        pairs: Pairs = []
        generators = []
        iterators = []
        for name, obj in self.objects.items():
            what = f"{where}: part {name!r}"
            if isinstance(obj, tf.random.Generator):
                check_generator(tree[name], what, obj)
                generators.append((obj, to_numpy(tree[name]["state"])))
            elif isinstance(obj, VARIABLE_TYPES):
                pairs += match(["value"], [obj], {"value": tree[name]}, what, "")
            elif isinstance(obj, tf.data.Iterator):
                iterators.append((obj, parse_iterator_state(tree[name], what), what))
            else:
                keys, variables = keyed_variables(obj, what)
                pairs += match(keys, variables, tree[name], what, "build it as when it was saved")
        if self.rng:
            check_rng(tree["rng"], f"{where}: part 'rng'")
        # The one step that can fail after every check: it is undone if it does.
        restore_iterators(iterators)
        assign(pairs)
        for generator, state in generators:
            generator.reset(state)
        if self.rng:
            restore_rng(tree["rng"])


def own_state(obj: Any, where: str) -> Any:
    """One object's state as TFState saves it."""
    if isinstance(obj, tf.random.Generator):
        return generator_state(obj)
    if isinstance(obj, VARIABLE_TYPES):
        return to_numpy(obj)
    if isinstance(obj, tf.data.Iterator):
        return iterator_state(obj, where)
    keys, variables = keyed_variables(obj, where)
    return capture(keys, variables)


def keyed_variables(obj: Any, where: str) -> tuple[list[str], list[Any]]:
    """An object's variables and their keys, the same way on save and on load.

    Keras layers, models and optimizers list every variable themselves (seed-generator states
    included, which the trackable graph misses, and compiling a model adds its optimizer to
    that graph), so they are keyed as :class:`KerasState` keys them; other trackables by path.
    """
    if isinstance(obj, _KERAS_OBJECTS):
        variables = list(obj.variables)
        return keras_keys(variables), variables
    return trackable_variables(obj, where)


def trackable_variables(root: Any, where: str) -> tuple[list[str], list[Any]]:
    """The variables reachable from ``root`` in the trackable object graph, keyed by path.

    Breadth first over ``tf.train.TrackableView.children``; a variable reached by several
    paths is keyed by the first (the shortest), so each is saved once. A Keras object is not
    entered: its ``.variables`` are taken under its path. A tf.Module's Keras SeedGenerators
    (invisible to the graph) are taken too.

    Raises:
        UnsupportedStateError: the graph reaches an object with state of its own that is not
            a variable (a ``tf.lookup`` table; an iterator, which must be a part of its own).
    """
    keys: list[str] = []
    found: list[Any] = []
    seen = {id(root)}

    def take(prefix: str, variables: list[Any]) -> None:
        fresh = [v for v in variables if id(v) not in seen]
        seen.update(id(v) for v in fresh)
        keys.extend(keras_keys(fresh, prefix))
        found.extend(fresh)

    queue: list[tuple[str, Any]] = [("", root)]
    while queue:
        prefix, obj = queue.pop(0)
        if isinstance(obj, tf.Module):
            for path, generator in private.module_seed_generators(obj):
                take(f"{prefix}{path}/", [generator.state])
        for name, child in tf.train.TrackableView.children(obj).items():
            if id(child) in seen:
                continue
            path = f"{prefix}{name}"
            if isinstance(child, VARIABLE_TYPES):
                seen.add(id(child))
                keys.append(path)
                found.append(child)
            elif isinstance(child, _KERAS_OBJECTS):
                seen.add(id(child))
                take(f"{path}/", list(child.variables))
            elif isinstance(child, tf.data.Iterator) or private.has_own_checkpoint_state(child):
                raise UnsupportedStateError(_unsaved(where, path, child))
            else:
                seen.add(id(child))
                queue.append((f"{path}/", child))
    return keys, found


def _unsaved(where: str, path: str, child: Any) -> str:
    kind = type(child).__name__
    if isinstance(child, tf.data.Iterator):
        return (
            f"{where}: {path!r} is a tf.data iterator inside the object; pass it as a part of "
            f"its own (TFState(..., {path.replace('/', '_')}=iterator)) so its position is saved"
        )
    return (
        f"{where}: {path!r} is a {kind}, whose state is not variables and which TFState cannot "
        "save; keep it out of the objects you pass (or hold its values in tf.Variables)"
    )


def iterator_state(iterator: Any, where: str) -> dict[str, Any]:
    """A tf.data iterator's position, as TensorFlow serialises it: a list of uint8 arrays.

    Raises:
        UnsupportedStateError: TensorFlow cannot serialise it (its dataset runs Python code,
            ``from_generator`` or ``py_function``, or holds other external state).
    """
    try:
        variant = tf.raw_ops.SerializeIterator(
            resource_handle=private.iterator_resource(iterator),
            external_state_policy=private.iterator_external_state_policy(iterator),
        )
    except tf.errors.OpError as e:
        raise UnsupportedStateError(
            f"{where}: TensorFlow cannot save this tf.data iterator's position "
            f"({_first_line(e)}); build the dataset from tensors or files without Python "
            "functions, or set its options().experimental_external_state_policy"
        ) from e
    parts = [tf.io.serialize_tensor(piece).numpy() for piece in tf.unstack(variant)]
    return {ITERATOR_KEY: [np.frombuffer(part, dtype=np.uint8).copy() for part in parts]}


def parse_iterator_state(saved: Any, what: str) -> Any:
    """The serialised iterator state of :func:`iterator_state` as a variant tensor; changes nothing.

    Raises:
        ConfigMismatchError: the part is not an iterator's state.
        CorruptCheckpointError: its bytes do not parse as TensorFlow's serialised tensors.
    """
    pieces = saved.get(ITERATOR_KEY) if isinstance(saved, Mapping) else None
    if not isinstance(pieces, list) or set(saved) != {ITERATOR_KEY}:
        raise ConfigMismatchError(
            f"{what}: the saved state is not a tf.data iterator's; pass the object it was saved from"
        )
    parsed = []
    for index, piece in enumerate(pieces):
        array = to_numpy(piece)
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
            raise CorruptCheckpointError(
                f"{what}: piece {index} of the iterator state is not bytes"
            )
        try:
            parsed.append(tf.io.parse_tensor(array.tobytes(), out_type=tf.variant))
        except tf.errors.OpError as e:
            raise CorruptCheckpointError(
                f"{what}: piece {index} of the iterator state is malformed ({_first_line(e)})"
            ) from e
    if not parsed:
        raise CorruptCheckpointError(f"{what}: the saved iterator state is empty")
    return tf.stack(parsed)


def restore_iterators(iterators: list[tuple[Any, Any, str]]) -> None:
    """Restore each iterator's position; on a failure, put back those already restored.

    TensorFlow leaves an iterator it failed to restore cancelled, so each one's current
    position is serialised first and restored again if any restore fails.

    Raises:
        ConfigMismatchError: a saved state does not fit its iterator's dataset.
    """
    done: list[tuple[Any, Any]] = []
    for iterator, variant, what in iterators:
        resource = private.iterator_resource(iterator)
        before = tf.raw_ops.SerializeIterator(
            resource_handle=resource,
            external_state_policy=private.iterator_external_state_policy(iterator),
        )
        try:
            tf.raw_ops.DeserializeIterator(resource_handle=resource, serialized=variant)
        except tf.errors.OpError as e:
            for undo, state in [*done, (resource, before)]:
                tf.raw_ops.DeserializeIterator(resource_handle=undo, serialized=state)
            raise ConfigMismatchError(
                f"{what}: the saved position does not fit this iterator: make its dataset "
                f"exactly as when it was saved ({_first_line(e)})"
            ) from e
        done.append((resource, before))


def _first_line(error: tf.errors.OpError) -> str:
    """TensorFlow's own reason, without its op-wrapper prefix: its first sentence."""
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", str(error.message).strip())
    return message.split("\n", 1)[0].split(". ", 1)[0].split(" [Op:", 1)[0].rstrip(". ")[:300]


def is_tf_object(obj: Any) -> bool:
    """Whether ``obj`` is an object TFState saves on its own (a trackable or a variable)."""
    return isinstance(obj, (private.Trackable, *VARIABLE_TYPES))
