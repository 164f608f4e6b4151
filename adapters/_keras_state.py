"""KerasState, and the functions that save and load any Keras (or TensorFlow) state.

The conversion and the checks are in ``_keras_convert``, the global generators in
``_keras_rng``, building as fit does in ``_keras_build``, plain TensorFlow objects in
``_keras_tf`` (on the TensorFlow backend; ``_keras_notf`` refuses them on the others); this
module decides what a Keras model's state is and restores every part only after every part has
been checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import numpy as np

from ckptkit._errors import ConfigMismatchError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from ._keras_build import build_optimizer, model_is_built, not_built
from ._keras_convert import (
    assign,
    capture,
    check_parts,
    convert,
    keras_keys,
    match,
    match_by_position,
)
from ._keras_rng import capture_rng, check_rng, restore_rng

if keras.backend.backend() == "tensorflow":
    from ._keras_tf import TFState as TFState
    from ._keras_tf import is_tf_object, own_state
else:  # TFState and TensorFlow objects are refused, saying what to use instead
    from ._keras_notf import TFState as TFState  # type: ignore[assignment]
    from ._keras_notf import is_tf_object, own_state

_SAME_MODEL = "load it into a model built like the one it was saved from (same layers, same order)"
_SAME_OPTIMIZER = "use the same optimizer class and options, over the same model"
_PARTS = {"model", "optimizer", "rng"}
_KERAS_OBJECTS = (keras.layers.Layer, keras.optimizers.Optimizer)


class KerasState:
    """A Keras model, its optimizer and the global random generators, as one state.

    For :class:`ckptkit.Checkpointer` (or :func:`save_state`/:func:`load_state`) in a custom
    loop, and what ``CheckpointCallback`` saves. The tree has three parts: ``"model"``, every
    variable in ``model.variables`` (trainable ones, BatchNorm statistics, the seed-generator
    states of Dropout and other random layers); ``"optimizer"``, every variable in
    ``optimizer.variables`` (the iteration count, the learning rate, Adam's moments, EMA
    averages and gradient accumulators), then any it holds without listing them there; and
    with ``rng`` ``"rng"``: Keras' global seed generator (if created), Python's ``random``,
    NumPy's global state, and the backend's own generator: TF's global
    ``tf.random.Generator`` (if created) on TensorFlow, torch's CPU generator on PyTorch,
    none on JAX. It works the same on every Keras backend; the ``"rng"`` part loads on the
    backend it was saved on only (see the Keras tutorial for what loads across backends).

    Variables are keyed ``"{index:04d}:{path}"``. Loading checks every key, shape and dtype
    before it assigns anything. Model keys may differ only in Keras' auto-numbering
    (``dense_3`` for ``dense``), as in a model built again in the same process. Optimizer
    variables are matched by position, as Keras loads them: their paths depend on where the
    optimizer was built, not on what they hold; their number, shapes and dtypes must match.
    An optimizer that is not built yet is built first, as ``model.fit`` builds it (under its
    name scope, over ``model.trainable_variables``): an unbuilt one has no moments to restore.
    On TensorFlow, TF's legacy seeded ops (``tf.random.normal`` without a generator) keep
    state no API exposes and are not saved: use ``keras.random`` or a ``tf.random.Generator``.

    Args:
        model: a built Keras model (or layer). A subclassed model is built by its first
            call; in a custom loop, call it on one batch (or ``model.build``) before loading.
            ``CheckpointCallback`` builds it by itself.
        optimizer: its optimizer, usually ``model.optimizer``; None saves none.
        rng: capture and restore the global random generators (the part ``"rng"``). With
            False, a saved ``"rng"`` part is not loaded either: how to load a model and its
            optimizer saved on another backend.

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
            ValueError: the model is not built yet (build it first).
        """
        variables = list(self.model.variables)
        if not model_is_built(self.model):
            what = "has no variables yet" if not variables else "is not built yet"
            raise ValueError(
                f"{type(self.model).__name__} {what}: build it (call it on data, or "
                "model.build(input_shape)) before saving its state"
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
            ConfigMismatchError: parts, variable keys, shapes or dtypes differ (all listed),
                or the model is not built yet; nothing is assigned then.
            CorruptCheckpointError: the saved RNG state is malformed (nothing is assigned).
        """
        self._load(tree, "KerasState")

    def _load(self, tree: Any, where: str) -> None:
        names = {"model"} | ({"optimizer"} if self.optimizer is not None else set())
        names |= {"rng"} if self.rng else set()
        if not self.rng and isinstance(tree, Mapping) and "rng" in tree:
            # rng=False leaves the global generators alone, a saved state of theirs included
            # (one saved on another backend, say).
            tree = {name: part for name, part in tree.items() if name != "rng"}
        check_parts(tree, names, where, "KerasState(model, optimizer, rng=...)")
        if not model_is_built(self.model):
            raise ConfigMismatchError(
                f"{where}: part 'model': the saved variables do not match (it has no variables "
                f"yet: build it before loading): {not_built(self.model)}; in model.fit, "
                "CheckpointCallback builds it from the checkpoint by itself"
            )
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


def state_to_tree(obj: Any) -> Any:
    """Convert an object's state, or a state with tensors in it, to the core's tree.

    Args:
        obj: a :class:`KerasState` or :class:`TFState`; a Keras model (its ``model.variables``
            keyed as in KerasState); a Keras layer or optimizer (its ``.variables``, keyed the
            same way); on the TensorFlow backend, a ``tf.Module``, ``tf.Variable``,
            ``tf.random.Generator`` or ``tf.data`` iterator (as in TFState); or a nested
            dict/list of tensors, numpy arrays and JSON values.

    Returns:
        A tree :meth:`ckptkit.CheckpointStore.save` accepts (tensors as numpy arrays of the
        same dtype, bfloat16 through ``ml_dtypes``).

    Raises:
        UnsupportedStateError: the object holds state that cannot be saved (see TFState).

    Example:
        >>> tree = state_to_tree(model)
        >>> sorted(tree)[:2]
        ['0000:dense/kernel', '0001:dense/bias']
    """
    if isinstance(obj, (KerasState, TFState)):
        return obj.state_dict()
    if isinstance(obj, keras.Model):
        return KerasState(obj, rng=False).state_dict()["model"]
    if isinstance(obj, _KERAS_OBJECTS):
        variables = list(obj.variables)
        return capture(keras_keys(variables), variables)
    if is_tf_object(obj):
        return own_state(obj, f"state_to_tree({type(obj).__name__})")
    return convert(obj)


def tree_to_state(tree: Any) -> Any:
    """Convert a tree made by :func:`state_to_tree` back to tensors of Keras' backend.

    Every array becomes a tensor of the same dtype, shape and values
    (``keras.ops.convert_to_tensor``: a ``tf.Tensor``, a ``jax.Array`` or a ``torch.Tensor``);
    JSON values are kept.
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
    if isinstance(tree, (np.ndarray, np.generic)):
        return keras.ops.convert_to_tensor(tree, dtype=tree.dtype.name)
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
        state: a :class:`KerasState` or :class:`TFState`; a Keras model, from a checkpoint of
            that model alone or from the ``"model"`` part of a KerasState checkpoint (what
            ``CheckpointCallback`` saves, on any backend): its weights only; a Keras layer or
            optimizer saved on its own; on the TensorFlow backend, a ``tf.Module``,
            ``tf.Variable``, ``tf.random.Generator`` or ``tf.data`` iterator saved on its own.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: from the store.
        ConfigMismatchError: the checkpoint does not fit ``state`` (nothing is changed).

    Example:
        >>> record = load_state(store, KerasState(model, model.optimizer))
        >>> record = load_state(store, model, "best")  # the weights of a fit's best epoch
    """
    loaded = store.load_checkpoint(step)
    where = f"{store.root}, step {loaded.record.step}"
    if isinstance(state, (KerasState, TFState)):
        state._load(loaded.state, where)
    elif isinstance(state, keras.Model):
        saved = loaded.state
        if isinstance(saved, Mapping) and "model" in saved and set(saved) <= _PARTS:
            KerasState(state, rng=False)._load({"model": saved["model"]}, where)
        else:
            KerasState(state, rng=False)._load({"model": saved}, where)
    elif isinstance(state, _KERAS_OBJECTS):
        variables = list(state.variables)
        what = f"{where}: {type(state).__name__}"
        assign(match(keras_keys(variables), variables, loaded.state, what, _SAME_MODEL))
    else:
        TFState(part=state)._load({"part": loaded.state}, where)
    return loaded.record
