"""Keras values as ckptkit trees: variables by stable keys, checked before loading; any backend.

A Keras model's (or optimizer's) variables are keyed ``"{index:04d}:{variable.path}"`` in
``.variables`` order: Keras paths can repeat (two layers may make ``"dense/kernel"``), and the
index keeps every key unique. Keras numbers auto-named objects per process (``dense``,
``dense_1``, ...), so two keys that differ only in those numbers after the index are the same
variable (:func:`match`). Optimizers are matched by position alone (:func:`match_by_position`).

Everything is checked (keys, shapes, dtypes) before any variable is assigned, so a state that
does not fit changes nothing. Arrays keep their dtype exactly: float16 as numpy's, bfloat16 as
``ml_dtypes``' (on PyTorch, whose tensors NumPy cannot hold in bfloat16, the value is read through
float32, which holds every bfloat16 exactly, and cast back). Integer dtypes may differ, since
backends pick integer widths of their own (a ``SeedGenerator``'s state, an optimizer's
iteration count): a saved integer array is converted when its values fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import ml_dtypes
import numpy as np

from ckptkit._errors import ConfigMismatchError

# Keras numbers auto-named objects per process ("dense", "dense_1", ...; "adam_1/dense_4_kernel_
# momentum"): the numbers depend on what the process made before, not on the architecture.
_AUTO_NUMBER = re.compile(r"_\d+(?=[_/]|$)")
# Where a Keras key starts in a key: at its start, or after a trackable path ("drop/0000:...").
_KERAS_KEY = re.compile(r"(?:^|/)\d{4,}:")
#: The dtypes Keras' backends give a SeedGenerator's state (keras.backend.random_seed_dtype()).
_SEED_DTYPES = {"int64", "uint32", "int32"}


def _variable_types() -> tuple[type, ...]:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

        return (tf.Variable, keras.Variable)
    return (keras.Variable,)


#: Keras variables, and on the TensorFlow backend plain ``tf.Variable``s too.
VARIABLE_TYPES = _variable_types()

Pairs = list[tuple[Any, np.ndarray[Any, Any]]]


def show(items: Sequence[str]) -> str:
    """At most ten items of a list for an error message, then how many more there are."""
    items = list(items)
    return str(items) if len(items) <= 10 else f"{items[:10]} and {len(items) - 10} more"


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a Keras dtype name (bfloat16 and the float8s from ``ml_dtypes``)."""
    found = getattr(ml_dtypes, name, None)
    return np.dtype(found if isinstance(found, type) else name)


def _tensor_to_numpy(tensor: Any) -> np.ndarray[Any, Any]:
    if keras.backend.backend() == "torch" and hasattr(tensor, "detach"):
        # Through Tensor.numpy (NumPy 2 warns on torch's __array__, which keras.ops uses), and
        # copied: the array shares the tensor's memory, which the next step changes in place.
        tensor = tensor.detach().cpu()
        try:
            return np.asarray(tensor.numpy()).copy()
        except TypeError:  # bfloat16 and the float8s, which NumPy cannot take from torch
            return np.asarray(tensor.float().numpy())
    if callable(getattr(tensor, "numpy", None)):  # TensorFlow's: np.array on them warns too
        return np.asarray(tensor.numpy())
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def to_numpy(value: Any) -> Any:
    """A tensor or variable's exact value as a numpy array of its dtype (anything else unchanged)."""
    if isinstance(value, VARIABLE_TYPES) or keras.ops.is_tensor(value):
        tensor: Any = value
        if isinstance(value, keras.Variable):
            tensor = value.value  # the backend's tensor; NumPy 2 warns on the variable itself
        elif isinstance(value, VARIABLE_TYPES):
            tensor = tensor.numpy()  # a tf.Variable
        array = _tensor_to_numpy(tensor)
        wanted = numpy_dtype(keras.backend.standardize_dtype(value.dtype))
        # PyTorch's bfloat16 reaches numpy as float32, which holds each value exactly.
        return array if array.dtype == wanted else array.astype(wanted)
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
    return shape, str(keras.backend.standardize_dtype(variable.dtype))


def keras_keys(variables: Sequence[Any], prefix: str = "") -> list[str]:
    """The key of each Keras variable: ``prefix``, its index in ``variables`` and its path."""
    return [f"{prefix}{index:04d}:{variable.path}" for index, variable in enumerate(variables)]


def capture(keys: Sequence[str], variables: Sequence[Any]) -> dict[str, Any]:
    """The variables' values as numpy arrays, by key."""
    return {key: to_numpy(variable) for key, variable in zip(keys, variables, strict=True)}


def cast_seed_state(array: np.ndarray[Any, Any], dtype: Any) -> np.ndarray[Any, Any]:
    """A SeedGenerator's state saved on one backend, in the dtype of another's.

    Each backend gives the state (a seed and a counter) its own dtype: int64 on TensorFlow,
    uint32 on JAX, int32 on PyTorch, which reads the 32 bits as unsigned. The values are kept
    (32-bit patterns as unsigned); the random numbers drawn from them differ between backends
    all the same, since each backend has its own generator algorithms.

    Raises:
        ValueError: a value does not fit the 32 bits of ``dtype``.
    """
    target = numpy_dtype(keras.backend.standardize_dtype(dtype))
    if array.dtype == target:
        return array
    values = array.view(np.uint32) if array.dtype == np.int32 else array
    values = values.astype(np.int64)
    if target.itemsize == 4 and (values.min(initial=0) < 0 or values.max(initial=0) >= 2**32):
        raise ValueError(f"a value of {values.tolist()} does not fit 32 bits")
    if target == np.int32:
        return values.astype(np.uint32).view(np.int32)
    return values.astype(target)


def _cast_integers(key: str, array: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """An integer variable saved on another backend, in this one's integer dtype.

    Backends differ in integer widths (an optimizer's iteration count is int64 on TensorFlow,
    int32 on JAX and PyTorch; seed states, :func:`cast_seed_state`). Only values that fit
    are converted.

    Raises:
        ValueError: a value does not fit ``dtype``.
    """
    if key.endswith("seed_generator_state") and {array.dtype.name, dtype} <= _SEED_DTYPES:
        return cast_seed_state(array, dtype)
    target = numpy_dtype(dtype)
    info = np.iinfo(target)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"a value does not fit {dtype}")
    return array.astype(target)


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
            continue
        integers = array.dtype.kind in "iu" and numpy_dtype(dtype).kind in "iu"
        if array.dtype.name != dtype and integers and tuple(array.shape) == shape:
            try:  # saved on another backend: the same values, in this backend's width
                array = _cast_integers(key, np.asarray(array), dtype)
            except ValueError as e:
                wrong.append(f"{key}: saved {tuple(array.shape)} {array.dtype.name}, {e}")
                continue
        if (tuple(array.shape), array.dtype.name) != (shape, dtype):
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
