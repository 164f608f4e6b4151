"""Rebuild a state tree from its JSON skeleton and arrays: the reading half of ``_tree``.

The encoding is described in :mod:`ckptkit._tree`. Everything read here is untrusted input: a
malformed tag, a reference to a missing tensor or a tensor referenced twice raises
:class:`CorruptCheckpointError` naming the key path, and nothing in a skeleton can make the
reader run code.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

import numpy as np

from ckptkit._errors import CorruptCheckpointError
from ckptkit._safetensors import numpy_dtype
from ckptkit._tree import INT_CODES, JSONValue, TreePath, render

_HEX_INT = re.compile(r"-?0x[0-9a-f]+")


class _Decoder:
    def __init__(self, source: str, root: str, arrays: Mapping[str, np.ndarray] | None) -> None:
        self._source = source
        self._root = root
        self._arrays = arrays
        self.used: set[str] = set()

    def _corrupt(self, path: TreePath, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self._source}: {render(self._root, path)}: {problem}; the saved state is "
            "damaged or was edited by hand: restore it or load another checkpoint"
        )

    def decode(self, data: object, path: TreePath) -> object:
        if data is None or type(data) in (bool, int, float, str):
            return data
        if type(data) is list:
            return [self.decode(item, (*path, i)) for i, item in enumerate(data)]
        if type(data) is not dict:
            raise self._corrupt(path, f"unexpected JSON value of type {type(data).__name__}")
        keys = list(data)
        if len(keys) == 1 and keys[0].startswith("$") and not keys[0].startswith("$$"):
            return self._tag(keys[0], data[keys[0]], path)
        out: dict[str, object] = {}
        for key, item in data.items():
            if key.startswith("$") and not key.startswith("$$"):
                raise self._corrupt(path, f"key {key!r} is neither a tag nor an escaped key")
            key = key[1:] if key.startswith("$") else key
            out[key] = self.decode(item, (*path, key))
        return out

    def _tag(self, tag: str, body: object, path: TreePath) -> object:
        if tag == "$tuple" and type(body) is list:
            return tuple(self.decode(item, (*path, i)) for i, item in enumerate(body))
        if tag == "$float" and isinstance(body, str) and len(body) == 16 and _is_hex(body):
            return float(struct.unpack(">d", bytes.fromhex(body))[0])
        if tag == "$int" and isinstance(body, str) and _HEX_INT.fullmatch(body):
            return int(body, 16)
        if tag == "$scalar" and type(body) is list and len(body) == 2:
            return self._scalar(body[0], body[1], path)
        if tag == "$array" and isinstance(body, str):
            return self._array(body, path)
        shown = repr(body) if len(repr(body)) <= 60 else repr(body)[:57] + "..."
        raise self._corrupt(path, f"malformed tag {tag!r} with value {shown}")

    def _scalar(self, code: object, value: object, path: TreePath) -> np.generic:
        dtype = _numpy_dtype_or_none(code)
        if dtype is None:
            raise self._corrupt(path, f"unknown numpy scalar dtype {code!r}")
        if isinstance(value, str) and code not in INT_CODES and code != "BOOL":
            if len(value) == 2 * dtype.itemsize and _is_hex(value):
                little = np.frombuffer(bytes.fromhex(value), dtype=dtype.newbyteorder("<"))
                return little.astype(dtype)[0]  # type: ignore[no-any-return]
            ok = False
        elif code == "BOOL":
            ok = type(value) is bool
        elif code in INT_CODES:
            info = np.iinfo(dtype.name)
            ok = type(value) is int and info.min <= value <= info.max
        else:
            ok = type(value) is float and code != "C64"
        if not ok:
            raise self._corrupt(path, f"malformed {code} scalar value {value!r}")
        with np.errstate(over="ignore"):
            scalar: np.generic = dtype.type(value)
        if type(value) is float and float(scalar) != value:
            # The writer writes a float scalar as the exact value it holds.
            raise self._corrupt(path, f"{code} scalar value {value!r} is not a {code} value")
        return scalar

    def _array(self, name: str, path: TreePath) -> np.ndarray:
        if self._arrays is None:
            raise self._corrupt(path, "an array reference where arrays are not allowed")
        if name in self.used:
            raise self._corrupt(path, f"tensor {name!r} is referenced a second time")
        if name not in self._arrays:
            raise self._corrupt(path, f"refers to tensor {name!r}, which the arrays file lacks")
        self.used.add(name)
        return self._arrays[name]


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _numpy_dtype_or_none(code: object) -> np.dtype[np.generic] | None:
    # numpy_dtype raises UnsupportedStateError (missing ml_dtypes) through this on purpose.
    if not isinstance(code, str):
        return None
    try:
        return numpy_dtype(code)
    except KeyError:
        return None


def unflatten_state(
    skeleton: JSONValue, arrays: Mapping[str, np.ndarray], *, source: str = "state"
) -> object:
    """Rebuild the state tree from a skeleton and its arrays; the inverse of :func:`flatten_state`.

    The arrays are placed in the tree as given (no copy), so views of a parsed file stay views.

    Args:
        skeleton: the decoded ``state.json``.
        arrays: tensor name -> array, e.g. from :func:`parse_safetensors`.
        source: how to name the checkpoint in error messages (usually its directory).

    Returns:
        The state tree, equal in types, dtypes, shapes and bits to the one flattened.

    Raises:
        CorruptCheckpointError: the skeleton is malformed, refers to a missing tensor, refers
            to one twice, or ``arrays`` holds a tensor the skeleton never refers to.
        UnsupportedStateError: a bfloat16/float8 scalar needs ``ml_dtypes``, not installed.

    Example:
        >>> import numpy as np
        >>> unflatten_state({"w": {"$array": "w"}, "pair": {"$tuple": [1, 2]}}, {"w": np.ones(1)})
        {'w': array([1.]), 'pair': (1, 2)}
    """
    decoder = _Decoder(source, "state", arrays)
    try:
        state = decoder.decode(skeleton, ())
    except RecursionError:
        raise CorruptCheckpointError(f"{source}: the saved state is nested too deeply") from None
    unused = sorted(set(arrays) - decoder.used)
    if unused:
        raise CorruptCheckpointError(
            f"{source}: the arrays file holds tensors the state never refers to: "
            f"{', '.join(map(repr, unused[:5]))}{' ...' if len(unused) > 5 else ''}; "
            "state.json and the arrays file do not belong together: load another checkpoint"
        )
    return state


def decode_json_value(data: JSONValue, *, what: str) -> object:
    """Decode what :func:`encode_json_value` produced.

    Args:
        data: the parsed JSON.
        what: how to name the value in error messages.

    Returns:
        The original value, exactly.

    Raises:
        CorruptCheckpointError: ``data`` is not a valid encoding (or refers to an array).

    Example:
        >>> decode_json_value({"pair": {"$tuple": [1, 2]}}, what="metadata")
        {'pair': (1, 2)}
    """
    try:
        return _Decoder(what, what, None).decode(data, ())
    except RecursionError:
        raise CorruptCheckpointError(f"{what}: nested too deeply to decode") from None
