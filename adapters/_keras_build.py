"""Building a Keras model and its optimizer as ``model.fit`` does, and what identifies each.

A subclassed model has no weights until it is first called, and ``model.fit`` (on TensorFlow,
without a distribution strategy) calls it only inside the first training step, after every
callback's ``on_train_begin``; on JAX and PyTorch, fit builds the model and the optimizer
symbolically before any callback runs. Keras records the shapes a model was built with
(``get_build_config()``); calling the model once on symbolic ``keras.KerasTensor``s of those
shapes makes the same variables, under the same name scopes, with no computation.

On TensorFlow, ``model.fit`` builds an optimizer on its first step, inside
``keras.name_scope(optimizer.name)``, over ``model.trainable_variables`` (on JAX and PyTorch,
before the first callback, outside any scope; :func:`build_optimizer` does as fit does). The scope changes the
paths of the variables an optimizer makes without ``add_variable`` (Nadam's ``u_product``,
Adafactor's placeholders, a wrapped optimizer's slots), never their number, order, shapes or
dtypes; so variables are matched by position, as Keras loads them itself, and
:func:`signature` identifies an optimizer by its class and those shapes and dtypes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]

from ckptkit._errors import ConfigMismatchError

from ._keras_convert import convert, spec


def model_is_built(model: Any) -> bool:
    """Whether a Keras model (or layer) has made its variables: Keras' own ``built`` flag.

    A subclassed model holding a SeedGenerator has a variable before it is built, so the
    variables alone do not say it.
    """
    return bool(model.built)


def not_built(model: Any) -> str:
    """What to do about a model that is not built, for an error message."""
    return (
        f"{type(model).__name__} is not built yet (a subclassed model makes its weights when "
        "first called): call it on one batch (model(x[:1])) or model.build(input_shape) first"
    )


def build_config(model: Any) -> Any:
    """The shapes a built model was built with (``model.get_build_config()``) as JSON, or None.

    None when Keras recorded none (a model built by hand) or the shapes are not plain ints.
    """
    try:
        config = convert(model.get_build_config())
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return config if isinstance(config, Mapping) else None


def build_model(model: Any, config: Any, where: str) -> None:
    """Build an unbuilt model from a :func:`build_config`, by one symbolic call.

    Raises:
        ConfigMismatchError: there is no config, or the model cannot be called on those
            shapes (the message says to build it by hand).
    """
    if model_is_built(model):
        return
    if not isinstance(config, Mapping) or not (
        "input_shape" in config or isinstance(config.get("shapes_dict"), Mapping)
    ):
        raise ConfigMismatchError(
            f"{where}: the checkpoint does not say how the model was built, and {not_built(model)}"
        )

    def symbolic(shape: Any) -> Any:
        return keras.tree.map_shape_structure(keras.KerasTensor, shape)

    try:
        if "input_shape" in config:
            model(symbolic(config["input_shape"]))
        else:
            shapes = config["shapes_dict"]
            model(**{k.removesuffix("_shape"): symbolic(s) for k, s in shapes.items()})
    except Exception as e:  # anything the model's own call() raises on these shapes
        raise ConfigMismatchError(
            f"{where}: building {type(model).__name__} from the checkpoint's input shapes "
            f"{config} failed ({type(e).__name__}: {e}); {not_built(model)}"
        ) from e


def build_optimizer(optimizer: Any, model: Any, where: str) -> list[Any]:
    """Build ``optimizer`` over ``model.trainable_variables`` as fit does; return its state.

    An unbuilt optimizer has no moments to save or restore, and one built over a model that
    is not built yet would hold no slot for the variables the model makes later.

    Returns:
        :func:`optimizer_variables`.

    Raises:
        ValueError: the model is not built yet (the optimizer is left unbuilt).
    """
    if not optimizer.built:
        if not model_is_built(model):
            raise ValueError(
                f"{where}: the optimizer cannot be built before the model: {not_built(model)}"
            )
        if keras.backend.backend() == "tensorflow":
            # The same scope as Optimizer.apply's on fit's first step, so variable paths agree.
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(model.trainable_variables)
        else:  # as fit builds it on JAX and PyTorch, before any callback, outside any scope
            optimizer.build(model.trainable_variables)
    return optimizer_variables(optimizer, model)


def optimizer_variables(optimizer: Any, model: Any) -> list[Any]:
    """Every variable of a built optimizer's state: ``optimizer.variables``, then those it hides.

    An optimizer built inside a wrapper's ``build`` (LossScaleOptimizer's) makes its own
    variables while Keras' attribute tracking is off, so a Nadam's ``u_product`` (or an
    Adafactor's placeholders) is held but not listed in ``.variables``, and a resumed run
    would start it over. Such variables (held in an attribute of the optimizer or of one it
    wraps, directly or in a list; not the model's) come after the listed ones, by attribute
    name, so the order is the same in every process.
    """
    listed = list(optimizer.variables)
    seen = {id(v) for v in listed} | {id(v) for v in model.variables}
    hidden = []
    for owner in _with_wrapped(optimizer):
        for _, value in sorted(vars(owner).items()):
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, keras.Variable) and id(item) not in seen:
                    seen.add(id(item))
                    hidden.append(item)
    return listed + hidden


def _wrapped(optimizer: Any) -> list[Any]:
    inner = getattr(optimizer, "inner_optimizer", None)
    return [inner] if inner is not None else list(getattr(optimizer, "optimizers", None) or [])


def _with_wrapped(optimizer: Any) -> list[Any]:
    return [optimizer, *(o for inner in _wrapped(optimizer) for o in _with_wrapped(inner))]


def kind(optimizer: Any) -> str:
    """The optimizer's class, with the classes of the optimizers it wraps.

    ``"Adam"``, ``"LossScaleOptimizer(Adam)"``, ``"MultiOptimizer(Adam, SGD)"``.
    """
    wrapped = _wrapped(optimizer)
    name = type(optimizer).__qualname__
    return f"{name}({', '.join(kind(o) for o in wrapped)})" if wrapped else name


def signature(optimizer: Any, model: Any) -> dict[str, Any]:
    """What makes two built optimizers interchangeable: class, variable count, shapes, dtypes.

    Plain JSON, small whatever the model's size (the shapes and dtypes as a digest), for a
    checkpoint's metadata. Hyperparameters are not part of it: the learning rate is a
    variable, saved and restored with the others.
    """
    variables = optimizer_variables(optimizer, model)
    specs = json.dumps([spec(v) for v in variables], separators=(",", ":"))
    return {
        "class": kind(optimizer),
        "variables": len(variables),
        "digest": hashlib.sha256(specs.encode()).hexdigest()[:16],
    }
