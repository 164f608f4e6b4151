"""Keras and TensorFlow values as ckptkit trees: variables by stable keys, checked before loading.

A Keras model's (or optimizer's) variables are keyed ``"{index:04d}:{variable.path}"`` in
``.variables`` order: Keras paths can repeat (two layers may make ``"dense/kernel"``), and the
index keeps every key unique. Keras numbers auto-named objects per process (``dense``,
``dense_1``, ...), so two keys that differ only in those numbers after the index are the same
variable (:func:`match`). Optimizers are matched by position alone (:func:`match_by_position`).

Everything is checked (keys, shapes, dtypes) before any variable is assigned, so a state that
does not fit changes nothing. Arrays keep their dtype exactly: float16 as numpy's, bfloat16 as
``ml_dtypes``' (what ``variable.numpy()`` returns for it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import numpy as np
import tensorflow as tf  # type: ignore[import-untyped,unused-ignore]

from ckptkit._errors import ConfigMismatchError, CorruptCheckpointError

from . import _keras_private as private

# Keras numbers auto-named objects per process ("dense", "dense_1", ...; "adam_1/dense_4_kernel_
# momentum"): the numbers depend on what the process made before, not on the architecture.
_AUTO_NUMBER = re.compile(r"_\d+(?=[_/]|$)")
# Where a Keras key starts in a key: at its start, or after a trackable path ("drop/0000:...").
_KERAS_KEY = re.compile(r"(?:^|/)\d{4,}:")
VARIABLE_TYPES = (tf.Variable, keras.Variable)

Pairs = list[tuple[Any, np.ndarray[Any, Any]]]


def show(items: Sequence[str]) -> str:
    """At most ten items of a list for an error message, then how many more there are."""
    items = list(items)
    return str(items) if len(items) <= 10 else f"{items[:10]} and {len(items) - 10} more"


def to_numpy(value: Any) -> Any:
    """A tensor or variable's exact value as a numpy array (anything else unchanged)."""
    if isinstance(value, (*VARIABLE_TYPES, tf.Tensor)):
        return np.asarray(value.numpy())
    return value


def convert(value: Any) -> Any:
    """A nested state with tensors and variables in it, with numpy arrays in their place."""
    if isinstance(value, Mapping):
        return {key: convert(item) for key, item in value.items()}
    if isinstance(value, list):
        return [convert(item) for item in value]
    if isinstance(value, tuple):
        return tuple(convert(item) for item in value)
    return to_numpy(value)


def spec(variable: Any) -> tuple[tuple[int, ...], str]:
    """A variable's shape and dtype name."""
    shape = tuple(int(d) for d in variable.shape)
    dtype = variable.dtype
    return shape, dtype if isinstance(dtype, str) else tf.as_dtype(dtype).name


def keras_keys(variables: Sequence[Any], prefix: str = "") -> list[str]:
    """The key of each Keras variable: ``prefix``, its index in ``variables`` and its path."""
    return [f"{prefix}{index:04d}:{variable.path}" for index, variable in enumerate(variables)]


def capture(keys: Sequence[str], variables: Sequence[Any]) -> dict[str, Any]:
    """The variables' values as numpy arrays, by key."""
    return {
        key: np.asarray(variable.numpy()) for key, variable in zip(keys, variables, strict=True)
    }


def _normal(key: Any) -> Any:
    """A key without Keras' per-process numbers in the Keras path after its index."""
    if not isinstance(key, str):
        return key
    found = _KERAS_KEY.search(key)
    if found is None:
        return key
    return key[: found.end()] + _AUTO_NUMBER.sub("", key[found.end() :])


def match(keys: Sequence[str], variables: Sequence[Any], saved: Any, what: str, hint: str) -> Pairs:
    """Pair each variable with its saved value, checking keys, shapes and dtypes; assign nothing.

    Keys must be equal, or differ only in Keras' auto-numbering after a Keras key's index
    (``"0003:dense_1/kernel"`` for ``"0003:dense/kernel"``), as in a model built again in the
    same process or built in another order.

    Raises:
        ConfigMismatchError: naming the missing and unexpected keys, or each key whose saved
            shape or dtype differs from the variable's.
    """
    saved = _mapping(saved, what, hint)
    by_key = dict(zip(keys, variables, strict=True))
    if set(saved) == set(by_key):
        return checked([(key, by_key[key], saved[key]) for key in keys], what)
    here = {_normal(key): key for key in keys}
    there = {_normal(key): key for key in saved}
    if len(here) != len(keys) or len(there) != len(saved) or set(here) != set(there):
        raise key_error(keys, saved, what, hint)
    return checked([(key, by_key[key], saved[there[normal]]) for normal, key in here.items()], what)


def match_by_position(
    keys: Sequence[str], variables: Sequence[Any], saved: Any, what: str, hint: str
) -> Pairs:
    """Pair the i-th variable with the i-th saved value (by the index in its key); assign nothing.

    Keras itself loads an optimizer's variables by position: their paths depend on where and
    under which name scope the optimizer was built (``model.fit`` builds it inside
    ``"adam/"``), which says nothing about what they hold. Shapes and dtypes must still match.

    Raises:
        ConfigMismatchError: another number of variables (the missing and unexpected keys are
            listed), or a variable whose saved shape or dtype differs.
    """
    saved = _mapping(saved, what, hint)
    indexed = {}
    for key in saved:
        head = key.split(":", 1)[0] if isinstance(key, str) else ""
        if head.isdigit():
            indexed[int(head)] = key
    if sorted(indexed) != list(range(len(keys))) or len(indexed) != len(saved):
        raise key_error(keys, saved, what, hint)
    return checked(
        [
            (key, variable, saved[indexed[i]])
            for i, (key, variable) in enumerate(zip(keys, variables, strict=True))
        ],
        what,
    )


def _mapping(saved: Any, what: str, hint: str) -> Mapping[Any, Any]:
    if not isinstance(saved, Mapping):
        raise ConfigMismatchError(
            f"{what}: the saved state is a {type(saved).__name__}, not a dict of variables; {hint}"
        )
    return saved


def checked(triples: Sequence[tuple[str, Any, Any]], what: str) -> Pairs:
    """Each (variable, array) whose saved value has the variable's shape and dtype.

    Raises:
        ConfigMismatchError: listing every key whose saved value does not fit.
    """
    wrong, out = [], []
    for key, variable, value in triples:
        array = to_numpy(value)
        shape, dtype = spec(variable)
        if not isinstance(array, (np.ndarray, np.generic)):
            wrong.append(f"{key}: saved a {type(value).__name__}, here {shape} {dtype}")
        elif (tuple(array.shape), array.dtype.name) != (shape, dtype):
            wrong.append(
                f"{key}: saved {tuple(array.shape)} {array.dtype.name}, here {shape} {dtype}"
            )
        else:
            out.append((variable, np.asarray(array)))
    if wrong:
        raise ConfigMismatchError(
            f"{what}: the saved variables do not fit: {show(wrong)}; build it with the same "
            "sizes and dtypes as when it was saved"
        )
    return out


def key_error(keys: Sequence[str], saved: Mapping[Any, Any], what: str, hint: str) -> Exception:
    """The error for saved keys that do not match ``keys``: what is missing, what is extra."""
    missing = sorted(k for k in keys if k not in saved)
    unexpected = sorted(str(k) for k in saved if k not in set(keys))
    empty = " (it has no variables yet: build it before loading)" if not keys else ""
    return ConfigMismatchError(
        f"{what}: the saved variables do not match{empty}: missing keys {show(missing)}, "
        f"unexpected keys {show(unexpected)}; {hint}"
    )


def check_parts(tree: Any, names: set[str], where: str, how: str) -> None:
    """Refuse a saved state whose parts are not exactly ``names``.

    Raises:
        ConfigMismatchError: naming the missing and unexpected parts.
    """
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


def assign(pairs: Pairs) -> None:
    """Assign each checked value to its variable."""
    for variable, array in pairs:
        variable.assign(array)


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


def capture_rng() -> dict[str, Any]:
    """The global generators: Keras' seed generator, TF's global generator, Python's, NumPy's.

    Keras' and TF's are None where they have not been created yet (and loading such a state
    removes them again, so they are created the same way the next time they are needed).
    """
    keras_gen = private.keras_global_seed_generator()
    tf_gen = private.tf_global_generator()
    return {
        "keras": None if keras_gen is None else np.asarray(keras_gen.state.numpy()),
        "tf": None if tf_gen is None else generator_state(tf_gen),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }


def _check_python(saved: Any) -> None:
    random.Random().setstate(saved)


def _check_numpy(saved: Any) -> None:
    np.random.RandomState().set_state(saved)


def _check_keras_seed(saved: Any) -> None:
    if saved is not None and to_numpy(saved).shape != (2,):
        raise ValueError("expected an array of shape (2,)")


def _check_tf_generator(saved: Any, where: str) -> None:
    if saved is not None:
        check_generator(saved, where, None)


def check_rng(saved: Any, where: str) -> None:
    """Refuse a malformed saved RNG state before anything is restored.

    Raises:
        CorruptCheckpointError: naming the generator whose state is malformed.
    """
    if not isinstance(saved, Mapping) or set(saved) != {"keras", "tf", "python", "numpy"}:
        raise CorruptCheckpointError(f"{where}: the saved random-generator state is malformed")
    checks: dict[str, Callable[[Any], None]] = {
        "python": _check_python,
        "numpy": _check_numpy,
        "keras": _check_keras_seed,
        "tf": lambda s: _check_tf_generator(s, where),
    }
    for name, check in checks.items():
        try:
            check(saved[name])
        except (TypeError, ValueError, KeyError, AttributeError, ConfigMismatchError) as e:
            raise CorruptCheckpointError(
                f"{where}: the saved state of the {name} random generator is malformed ({e})"
            ) from e


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Set the global generators to a state checked by :func:`check_rng`."""
    if saved["keras"] is None:
        private.remove_keras_global_seed_generator()
    else:
        # Creating it draws from Python's generator, which is restored after.
        gen = private.make_keras_global_seed_generator()
        gen.state.assign(to_numpy(saved["keras"]).astype(gen.state.dtype))
    tf_saved = saved["tf"]
    current = private.tf_global_generator()
    if tf_saved is None:
        private.remove_tf_global_generator()
    elif current is not None and int(current.algorithm) == tf_saved["algorithm"]:
        current.reset(to_numpy(tf_saved["state"]))  # in place: tf.functions keep seeing it
    else:
        tf.random.set_global_generator(
            tf.random.Generator.from_state(to_numpy(tf_saved["state"]), tf_saved["algorithm"])
        )
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])
