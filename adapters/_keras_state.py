"""KerasState and TFState: a Keras model with its optimizer, or plain TF objects, as one state.

The conversion and the checks are in ``_keras_convert``; this module decides what each
object's state is and restores every part only after every part has been checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import tensorflow as tf  # type: ignore[import-untyped,unused-ignore]

from ckptkit._errors import ConfigMismatchError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from . import _keras_private as private
from ._keras_build import build_optimizer
from ._keras_convert import (
    assign,
    capture,
    capture_rng,
    check_generator,
    check_rng,
    convert,
    generator_state,
    keras_keys,
    match,
    match_by_position,
    restore_rng,
    to_numpy,
    trackable_variables,
)

_SAME_MODEL = "load it into a model built like the one it was saved from (same layers, same order)"
_SAME_OPTIMIZER = "use the same optimizer class and options, over the same model"


class KerasState:
    """A Keras model, its optimizer and the global random generators, as one state.

    For :class:`ckptkit.Checkpointer` (or :func:`save_state`/:func:`load_state`) in a custom
    loop, and what ``CheckpointCallback`` saves. The tree has three parts: ``"model"``, every
    variable in ``model.variables`` (trainable ones, BatchNorm statistics, the seed-generator
    states of Dropout and other random layers); ``"optimizer"``, every variable in
    ``optimizer.variables`` (the iteration count, the learning rate, Adam's moments, EMA
    averages and gradient accumulators), then any it holds without listing them there; and
    with ``rng`` ``"rng"``: Keras' global seed generator, TF's global ``tf.random.Generator``
    (each if created), Python's ``random`` and NumPy's global state.

    Variables are keyed ``"{index:04d}:{path}"``. Loading checks every key, shape and dtype
    before it assigns anything. Model keys may differ only in Keras' auto-numbering
    (``dense_3`` for ``dense``), as in a model built again in the same process. Optimizer
    variables are matched by position, as Keras loads them: their paths depend on where the
    optimizer was built, not on what they hold; their number, shapes and dtypes must match.
    An optimizer that is not built yet is built first, as ``model.fit`` builds it (under its
    name scope, over ``model.trainable_variables``): an unbuilt one has no moments to restore.
    TF's legacy seeded ops (``tf.random.normal`` without a generator) keep state
    no API exposes and are not saved: use ``keras.random`` or a ``tf.random.Generator``.

    Args:
        model: a built Keras model (or layer).
        optimizer: its optimizer, usually ``model.optimizer``; None saves none.
        rng: capture and restore the global random generators (the part ``"rng"``).

    Example:
        >>> state = KerasState(model, model.optimizer)
        >>> ckpt = Checkpointer(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"), state)
        >>> start = ckpt.resume()
    """

    def __init__(self, model: Any, optimizer: Any = None, *, rng: bool = True) -> None:
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"KerasState(model=...) is a {type(model).__name__}, not a Keras model")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"KerasState(optimizer=...) is a {type(optimizer).__name__}, not a Keras optimizer"
            )
        self.model = model
        self.optimizer = optimizer
        self.rng = bool(rng)

    def __repr__(self) -> str:
        opt = type(self.optimizer).__name__ if self.optimizer is not None else None
        return f"KerasState({type(self.model).__name__}, {opt}, rng={self.rng})"

    def state_dict(self) -> dict[str, Any]:
        """The model's and optimizer's variables and the RNG states, as one core tree.

        Raises:
            ValueError: the model has no variables yet (build it first).
        """
        variables = list(self.model.variables)
        if not variables:
            raise ValueError(
                f"{type(self.model).__name__} has no variables yet: build it (call it on data, "
                "or model.build(input_shape)) before saving its state"
            )
        tree: dict[str, Any] = {"model": capture(keras_keys(variables), variables)}
        if self.optimizer is not None:
            opt_vars = build_optimizer(self.optimizer, self.model, "KerasState")
            tree["optimizer"] = capture(keras_keys(opt_vars), opt_vars)
        if self.rng:
            tree["rng"] = capture_rng()
        return tree

    def load_state_dict(self, tree: Any, /) -> None:
        """Restore the model, optimizer and RNG from a tree made by :meth:`state_dict`.

        Raises:
            ConfigMismatchError: parts, variable keys, shapes or dtypes differ (all listed);
                nothing is assigned then.
            CorruptCheckpointError: the saved RNG state is malformed (nothing is assigned).
        """
        self._load(tree, "KerasState")

    def _load(self, tree: Any, where: str) -> None:
        names = {"model"} | ({"optimizer"} if self.optimizer is not None else set())
        names |= {"rng"} if self.rng else set()
        _check_parts(tree, names, where, "KerasState(model, optimizer, rng=...)")
        variables = list(self.model.variables)
        pairs = match(
            keras_keys(variables), variables, tree["model"], f"{where}: part 'model'", _SAME_MODEL
        )
        if self.optimizer is not None:
            opt_vars = build_optimizer(self.optimizer, self.model, where)
            pairs += match_by_position(
                keras_keys(opt_vars),
                opt_vars,
                tree["optimizer"],
                f"{where}: part 'optimizer'",
                _SAME_OPTIMIZER,
            )
        if self.rng:
            check_rng(tree["rng"], f"{where}: part 'rng'")
        assign(pairs)
        if self.rng:
            restore_rng(tree["rng"])


def _check_parts(tree: Any, names: set[str], where: str, how: str) -> None:
    if not isinstance(tree, Mapping):
        raise ConfigMismatchError(
            f"{where}: the saved state is a {type(tree).__name__}, not a dict"
        )
    missing, unexpected = sorted(names - set(tree)), sorted(set(tree) - names)
    if missing or unexpected:
        raise ConfigMismatchError(
            f"{where}: the saved parts do not match: missing {missing}, unexpected "
            f"{unexpected}; pass the same objects ({how}) as when it was saved"
        )


class TFState:
    """Plain TensorFlow objects by name, for ``tf.GradientTape`` loops.

    Each object is one part of the tree: a ``tf.Module`` (or a Keras layer, or any trackable)
    as its variables keyed by their path in the trackable object graph (``"dense/kernel"``,
    ``"layers/0/bias"``: the names ``tf.train.Checkpoint`` gives them, so they do not depend on
    creation order); a ``tf.Variable`` as its value; a ``tf.random.Generator`` as its state and
    algorithm. With ``rng=True`` the global generators too, as in :class:`KerasState`. A Keras
    optimizer is trackable: pass it by name (built) and its variables are saved as well.

    Raises:
        TypeError: an object is not trackable.

    Example:
        >>> state = TFState(net=net, opt=opt, noise=tf.random.Generator.from_seed(0))
        >>> record = save_state(store, 10, state)
    """

    def __init__(self, *, rng: bool = False, **objects: Any) -> None:
        for name, obj in objects.items():
            if not isinstance(obj, private.Trackable):
                raise TypeError(
                    f"TFState({name}=...) is a {type(obj).__name__}: pass tf.Modules, "
                    "tf.Variables, tf.random.Generators or other trackable objects"
                )
        if not objects and not rng:
            raise ValueError("TFState() holds nothing: pass objects by name, or rng=True")
        self.objects = dict(objects)
        self.rng = bool(rng)

    def __repr__(self) -> str:
        parts = [f"{n}={type(o).__name__}" for n, o in self.objects.items()]
        return f"TFState({', '.join([*parts, f'rng={self.rng}'])})"

    def state_dict(self) -> dict[str, Any]:
        """Every object's state (and with ``rng`` the generators'), as one core tree."""
        tree = {name: _own_state(obj) for name, obj in self.objects.items()}
        if self.rng:
            tree["rng"] = capture_rng()
        return tree

    def load_state_dict(self, tree: Any, /) -> None:
        """Restore every object from a tree made by :meth:`state_dict`, after checking it all.

        Raises:
            ConfigMismatchError: parts, variable paths, shapes, dtypes or a generator's
                algorithm differ (listed); nothing is assigned then.
        """
        self._load(tree, "TFState")

    def _load(self, tree: Any, where: str) -> None:
        names = set(self.objects) | ({"rng"} if self.rng else set())
        _check_parts(tree, names, where, "the same names and rng=...")
        pairs: list[Any] = []
        generators = []
        for name, obj in self.objects.items():
            what = f"{where}: part {name!r}"
            if isinstance(obj, tf.random.Generator):
                check_generator(tree[name], what, obj)
                generators.append((obj, to_numpy(tree[name]["state"])))
            elif isinstance(obj, (tf.Variable, keras.Variable)):
                pairs += match(["value"], [obj], {"value": tree[name]}, what, "")
            else:
                keys, variables = _keyed_variables(obj)
                pairs += match(keys, variables, tree[name], what, "build it as when it was saved")
        if self.rng:
            check_rng(tree["rng"], f"{where}: part 'rng'")
        assign(pairs)
        for generator, state in generators:
            generator.reset(state)
        if self.rng:
            restore_rng(tree["rng"])


def _own_state(obj: Any) -> Any:
    if isinstance(obj, tf.random.Generator):
        return generator_state(obj)
    if isinstance(obj, (tf.Variable, keras.Variable)):
        return to_numpy(obj)
    keys, variables = _keyed_variables(obj)
    return capture(keys, variables)


def _keyed_variables(obj: Any) -> tuple[list[str], list[Any]]:
    """An object's variables and their keys, the same way on save and on load.

    Keras layers, models and optimizers list every variable themselves (seed-generator states
    included, which the trackable graph misses, and compiling a model adds its optimizer to
    that graph), so they are keyed as :class:`KerasState` keys them; other trackables by path.
    """
    if isinstance(obj, (keras.optimizers.Optimizer, keras.layers.Layer)):
        variables = list(obj.variables)
        return keras_keys(variables), variables
    return trackable_variables(obj)


def state_to_tree(obj: Any) -> Any:
    """Convert an object's state, or a state with tensors in it, to the core's tree.

    Args:
        obj: a :class:`KerasState` or :class:`TFState`; a Keras model (its ``model.variables``
            keyed as in KerasState); a Keras optimizer; a ``tf.Module``, ``tf.Variable`` or
            ``tf.random.Generator`` (as in TFState); or a nested dict/list of tensors, numpy
            arrays and JSON values.

    Returns:
        A tree :meth:`ckptkit.CheckpointStore.save` accepts (tensors as numpy arrays of the
        same dtype, bfloat16 through ``ml_dtypes``).

    Example:
        >>> tree = state_to_tree(model)
        >>> sorted(tree)[:2]
        ['0000:dense/kernel', '0001:dense/bias']
    """
    if isinstance(obj, (KerasState, TFState)):
        return obj.state_dict()
    if isinstance(obj, keras.Model):
        return KerasState(obj, rng=False).state_dict()["model"]
    if isinstance(obj, (private.Trackable, keras.Variable)):
        return _own_state(obj)
    return convert(obj)


def tree_to_state(tree: Any) -> Any:
    """Convert a tree made by :func:`state_to_tree` back to tensors (``tf.constant``).

    Every array becomes a tensor of the same dtype, shape and values; JSON values are kept.
    :meth:`KerasState.load_state_dict` and the others take either form.

    Example:
        >>> tensors = tree_to_state(store.load())
    """
    if isinstance(tree, Mapping):
        return {key: tree_to_state(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [tree_to_state(value) for value in tree]
    if isinstance(tree, tuple):
        return tuple(tree_to_state(value) for value in tree)
    if hasattr(tree, "dtype") and hasattr(tree, "shape") and not isinstance(tree, tf.Tensor):
        return tf.constant(tree)
    return tree


def save_state(
    store: CheckpointStore,
    step: int,
    state: Any,
    *,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Save a state (a KerasState, TFState, model, module...) as checkpoint ``step``.

    Example:
        >>> save_state(store, 3, KerasState(model, model.optimizer), metrics={"loss": 0.1})
    """
    return store.save(step, state_to_tree(state), metrics, metadata)


def load_state(store: CheckpointStore, state: Any, step: StepSelector = None) -> CheckpointRecord:
    """Load checkpoint ``step`` (None: the latest; ``"best"``) into ``state``, in place.

    Args:
        state: a :class:`KerasState` or :class:`TFState`; a Keras model, ``tf.Module``,
            ``tf.Variable`` or ``tf.random.Generator`` saved on its own.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: from the store.
        ConfigMismatchError: the checkpoint does not fit ``state`` (nothing is changed).

    Example:
        >>> record = load_state(store, KerasState(model, model.optimizer))
    """
    loaded = store.load_checkpoint(step)
    where = f"{store.root}, step {loaded.record.step}"
    if isinstance(state, (KerasState, TFState)):
        state._load(loaded.state, where)
    elif isinstance(state, keras.Model):
        KerasState(state, rng=False)._load({"model": loaded.state}, where)
    else:
        TFState(part=state)._load({"part": loaded.state}, where)
    return loaded.record
