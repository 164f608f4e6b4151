"""Hypothesis strategies for state trees and arrays, and an exact-equality check for trees."""

from __future__ import annotations

import math
import struct

import numpy as np
from hypothesis import strategies as st

from ckptkit._safetensors import numpy_dtype

#: Every safetensors dtype code ckptkit reads and writes (bfloat16/float8 through ml_dtypes).
DTYPE_CODES = (
    "BOOL",
    "U8",
    "I8",
    "U16",
    "I16",
    "U32",
    "I32",
    "U64",
    "I64",
    "F16",
    "F32",
    "F64",
    "C64",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
)

#: Dict keys that have tripped up tree codecs: tag look-alikes, separators, empty, non-ASCII.
AWKWARD_KEYS = (
    "$x",
    "$",
    "$$y",
    "$tuple",
    "$array",
    "$float",
    ".",
    "a.b",
    "",
    "0",
    "__metadata__",
    "é",
    "\u6f22\u5b57",
    "\U0001f600",
    "\ud800",
)


def dtypes() -> st.SearchStrategy[np.dtype[np.generic]]:
    """Native-order numpy dtypes of every supported safetensors code."""
    return st.sampled_from(DTYPE_CODES).map(numpy_dtype)


@st.composite
def _contiguous(draw: st.DrawFn, dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> np.ndarray:
    size = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=size, max_size=size))
    if dtype.kind == "b":
        raw = bytes(b & 1 for b in raw)  # numpy bools are the bytes 0 and 1
    # Arbitrary bytes reach every bit pattern: NaN payloads, -0.0, subnormals, float8 specials.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def arrays(draw: st.DrawFn, *, max_dims: int = 3, max_side: int = 4) -> np.ndarray:
    """Arrays of every supported dtype, 0-d and empty shapes, C, Fortran and strided layouts."""
    dtype = draw(dtypes())
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_dims)))
    layout = draw(st.sampled_from(["c", "fortran", "transposed", "strided", "reversed"]))
    if layout == "fortran":
        return np.asfortranarray(draw(_contiguous(dtype, shape)))
    if layout == "transposed":
        return draw(_contiguous(dtype, shape[::-1])).T
    if layout == "strided" and shape:
        wide = draw(_contiguous(dtype, (shape[0] * 2, *shape[1:])))
        return wide[::2]
    if layout == "reversed" and shape:
        return draw(_contiguous(dtype, shape))[::-1]
    return draw(_contiguous(dtype, shape))


def numpy_scalars() -> st.SearchStrategy[np.generic]:
    """Numpy scalars of every supported dtype, with arbitrary bit patterns."""
    return dtypes().flatmap(lambda dtype: _contiguous(dtype, ())).map(lambda a: a[()])


def floats_any_bits() -> st.SearchStrategy[float]:
    """Python floats of any value: every NaN payload, both infinities, -0.0 and the rest."""
    from_bits = st.integers(0, 2**64 - 1).map(
        lambda b: struct.unpack("<d", b.to_bytes(8, "little"))[0]
    )
    return st.one_of(st.floats(), from_bits, st.sampled_from([0.0, -0.0, math.inf, -math.inf]))


def json_leaves() -> st.SearchStrategy[object]:
    """The JSON scalars a state may hold: None, bool, ints of any size, any float, str."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**1990, max_value=2**2100).map(lambda i: -i if i % 2 else i),
        floats_any_bits(),
        st.text(max_size=8),
    )


def keys() -> st.SearchStrategy[str]:
    """Dict keys: short text and the awkward keys."""
    return st.one_of(st.text(max_size=6), st.sampled_from(AWKWARD_KEYS))


def state_trees(*, with_arrays: bool = True, max_leaves: int = 25) -> st.SearchStrategy[object]:
    """Nested dicts, lists and tuples holding every leaf kind a checkpoint state may hold."""
    leaves = st.one_of(json_leaves(), numpy_scalars(), *([arrays()] if with_arrays else []))
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(keys(), children, max_size=4),
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
        ),
        max_leaves=max_leaves,
    )


def assert_same_state(expected: object, actual: object, path: str = "state") -> None:
    """Assert two trees are equal in types, key order, dtypes, shapes, bytes and float bits."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            assert_same_state(value, actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple))
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert_same_state(want, got, f"{path}[{i}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert isinstance(actual, (np.ndarray, np.generic))
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, float):
        assert isinstance(actual, float)
        bits = struct.pack("<d", actual), struct.pack("<d", expected)
        assert bits[0] == bits[1], f"{path}: float bits {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
