"""Split a state tree into a JSON skeleton and named arrays, and put it back together exactly.

A state tree is made of dicts with str keys, lists, tuples, numpy arrays, numpy scalars and
JSON scalars (None, bool, int of any size, float of any value, str). The skeleton is plain JSON
(``json.dumps(skeleton, allow_nan=False)`` always works) and reads as the tree itself wherever
JSON can say the value exactly. Everything else is a *tag*: an object with exactly one key that
starts with a single ``$``:

- ``{"$float": "7ff8000000000001"}``: a NaN or infinite float, its 64 bits as big-endian hex;
- ``{"$int": "-0x1f"}``: an int of more than 2000 bits (JSON readers cap digit counts);
- ``{"$tuple": [...]}``: a tuple (a bare JSON array is a list);
- ``{"$array": "model.w"}``: a numpy array, stored as this tensor of the safetensors file;
- ``{"$scalar": ["F32", 1.5]}``: a numpy scalar, as its safetensors dtype code and its value:
  a JSON bool or int for bool and int dtypes, a JSON number for finite floats, otherwise the
  little-endian bytes in hex (NaN, infinities, complex).

Finite floats are plain JSON numbers: Python writes the shortest repr that reads back to the
same bits, ``-0.0`` included. A dict key that starts with ``$`` is written with one more ``$``
(``"$x"`` -> ``"$$x"``), so a one-key object whose key starts with a single ``$`` is always a
tag, never a dict.

Tensor names are the key path joined with ``.`` (list and tuple positions as numbers:
``optimizer.state.0.exp_avg``), so the arrays file reads as a torch-style state dict. When two
paths give the same name (keys may contain ``.``) the later one gets ``#1``, ``#2``, ... in
traversal order; the skeleton records the exact name, so loading never guesses.

An adapter whose state holds one array under several keys (tied weights) saves it once and
puts an :class:`ArrayAlias` at each other key: a dict, saved as any dict, that also names the
array it stands for. The arrays file's header then lists each such place as an alias of that
array's tensor (``__metadata__["ckptkit.aliases"]``), so a reader without ckptkit can re-tie.

What does not survive: dict subclasses (``OrderedDict``, ``ArrayAlias``) come back as ``dict``
with the same key order; a value reachable twice is saved twice and loads as two independent
copies;
big-endian arrays load as the native-order dtype with the same values. Anything else that
cannot come back exactly (sets, bytes, objects, str/object/structured/datetime arrays,
subclasses of int/str/tuple, non-str keys, cycles) raises :class:`UnsupportedStateError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from ckptkit._errors import UnsupportedStateError
from ckptkit._frameworks import leaf_hint
from ckptkit._safetensors import dtype_code, supported_dtype_names

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

TreePath: TypeAlias = tuple[str | int, ...]
_BIG_INT_BITS = 2000
INT_CODES = frozenset({"U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
_TOO_DEEP = "{what} is nested too deeply for Python's recursion limit; flatten its structure"
_SUPPORTED = (
    "dicts with str keys, lists, tuples, numpy arrays and scalars, None, bool, int, float, str"
)


#: The key of the arrays file's ``__metadata__`` that lists aliases: a JSON object mapping
#: each alias name to the name of the tensor it stands for.
ALIASES_KEY = "ckptkit.aliases"


class ArrayAlias(dict[str, Any]):
    """A place of a state tree that holds an array saved at another place of the same tree.

    Why: a model with tied weights has one tensor under two keys (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``). An adapter saves the array once, at its
    first key, and puts an ``ArrayAlias`` at the other: a dict of the adapter's own marker,
    which ``state.json`` holds at this place and loading gives back as a plain dict (the
    adapter resolves it), and which also names the array it stands for. The store lists the
    place's tensor name as an alias of that array's tensor in the arrays file's header, so a
    plain safetensors reader can put the tensor under both names.

    Args:
        items: what the tree holds at this place, saved and loaded as any dict.
        target: the array this place stands for: the very object saved at another place of
            the same state.

    Raises:
        TypeError: ``target`` is not a numpy array.

    Example:
        >>> w = np.zeros(2, np.float32)
        >>> state = {"a": w, "b": ArrayAlias({"tied": "a"}, target=w)}
        >>> flatten_for_store(state).header
        {'ckptkit.aliases': '{"b":"a"}'}
    """

    def __init__(self, items: Mapping[str, Any], *, target: np.ndarray) -> None:
        if not isinstance(target, np.ndarray):
            raise TypeError(f"ArrayAlias target must be a numpy array, not {type(target).__name__}")
        super().__init__(items)
        self.target = target


def render(root: str, path: TreePath) -> str:
    parts = (json.dumps(p, ensure_ascii=False) if isinstance(p, str) else str(p) for p in path)
    return root + "".join(f"[{part}]" for part in parts)


def _dtype_hint(dtype: np.dtype[np.generic]) -> str:
    if dtype.kind == "O":
        return "convert it to a numeric dtype, or to a list"
    if dtype.kind in "US":
        return "store the strings as a list of str"
    if dtype.fields is not None:
        return "save each field as its own array"
    if dtype.kind in "Mm":
        return "store it as int64 (arr.astype('int64')) and keep the unit beside it"
    return "convert it to one of " + ", ".join(supported_dtype_names())


def _type_hint(value: object) -> str:
    hint = leaf_hint(value)
    if hint is not None:
        return hint
    if isinstance(value, (set, frozenset)):
        return "convert it to a sorted list"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "store it as a numpy uint8 array (np.frombuffer(data, np.uint8))"
    if isinstance(value, np.ndarray):
        return "it is a subclass of numpy.ndarray; save np.asarray(value) and anything else apart"
    for base in (bool, int, float, str, list, tuple):
        if isinstance(value, base):
            return f"it is a subclass of {base.__name__}; convert it with {base.__name__}(value)"
    return f"convert it to one of: {_SUPPORTED}"


def _float_bits(value: float) -> str:
    return struct.pack(">d", value).hex()


class _Encoder:
    def __init__(self, root: str, arrays: dict[str, np.ndarray] | None) -> None:
        self._root = root
        self._arrays = arrays
        self._active: set[int] = set()  # containers on the current path, to catch cycles
        self._names_by_id: dict[int, str] = {}  # each array object's first tensor name
        self._alias_names: set[str] = set()
        self.aliases: list[tuple[str, np.ndarray, TreePath]] = []  # name, target, where

    def _unsupported(self, path: TreePath, problem: str) -> UnsupportedStateError:
        return UnsupportedStateError(f"{render(self._root, path)}: {problem}")

    def encode(self, value: object, path: TreePath) -> JSONValue:
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value  # type: ignore[return-value]  # narrowed by the checks above
        if kind is int:
            assert isinstance(value, int)
            return {"$int": hex(value)} if value.bit_length() > _BIG_INT_BITS else value
        if kind is float:
            assert isinstance(value, float)
            return value if math.isfinite(value) else {"$float": _float_bits(value)}
        if isinstance(value, np.generic):
            return self._scalar(value, path)
        if kind is np.ndarray or isinstance(value, np.memmap):
            assert isinstance(value, np.ndarray)
            return self._array(value, path)
        if isinstance(value, dict) or kind is list or kind is tuple:
            if id(value) in self._active:
                raise self._unsupported(
                    path, "the state contains itself (a cycle); break the cycle before saving"
                )
            self._active.add(id(value))
            try:
                return self._container(value, path)
            finally:
                self._active.discard(id(value))
        raise self._unsupported(path, f"unsupported type {kind.__name__}; {_type_hint(value)}")

    def _container(self, value: object, path: TreePath) -> JSONValue:
        if isinstance(value, ArrayAlias):
            if self._arrays is None:
                raise self._unsupported(
                    path, f"an array alias cannot be stored in {self._root}; it holds no arrays"
                )
            name = self._free_name(path)
            self._alias_names.add(name)
            self.aliases.append((name, value.target, path))
        if isinstance(value, list):
            return [self.encode(item, (*path, i)) for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(item, (*path, i)) for i, item in enumerate(value)]}
        assert isinstance(value, dict)
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise self._unsupported(
                    path,
                    f"dict key {key!r} has type {type(key).__name__}; only str keys can be "
                    "saved: convert the keys with str(key) and back after loading",
                )
            out["$" + key if key.startswith("$") else key] = self.encode(item, (*path, key))
        return out

    def _scalar(self, value: np.generic, path: TreePath) -> JSONValue:
        code = dtype_code(value.dtype)
        if code is None:
            raise self._unsupported(
                path,
                f"numpy scalar of dtype {value.dtype} cannot be saved; {_dtype_hint(value.dtype)}",
            )
        if code == "BOOL":
            return {"$scalar": [code, bool(value)]}
        if code in INT_CODES:
            return {"$scalar": [code, int(value)]}
        if code != "C64":
            number = float(value)  # every float code embeds exactly in a float64
            if math.isfinite(number):
                return {"$scalar": [code, number]}
        raw = np.asarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        return {"$scalar": [code, raw.hex()]}

    def _array(self, value: np.ndarray, path: TreePath) -> JSONValue:
        if self._arrays is None:
            raise self._unsupported(
                path, f"numpy arrays cannot be stored in {self._root}; convert with arr.tolist()"
            )
        if dtype_code(value.dtype) is None:
            raise self._unsupported(
                path,
                f"numpy array of dtype {value.dtype} cannot be saved; {_dtype_hint(value.dtype)}",
            )
        name = self._free_name(path)
        self._arrays[name] = value
        self._names_by_id.setdefault(id(value), name)
        return {"$array": name}

    def _free_name(self, path: TreePath) -> str:
        """The tensor name of ``path``: its keys joined with ``.``, with ``#n`` if already taken."""
        assert self._arrays is not None
        # Keys may hold lone surrogates, which no UTF-8 header can carry; escape them.
        parts = [str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in path]
        base = ".".join(parts) if parts else self._root
        name, n = base, 0
        while name in self._arrays or name in self._alias_names or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        return name

    def alias_names(self) -> dict[str, str]:
        """Alias name -> tensor name, for every :class:`ArrayAlias` encoded.

        Raises:
            UnsupportedStateError: an alias's target is not saved at any place of the state.
        """
        out = {}
        for name, target, path in self.aliases:
            tensor = self._names_by_id.get(id(target))
            if tensor is None:
                raise self._unsupported(
                    path,
                    "an alias of an array that the state does not hold at any other place; "
                    "put the array itself in the state",
                )
            out[name] = tensor
        return out


class FlatState(NamedTuple):
    """A state split for the store: what ``state.json`` holds, the arrays, the arrays' header."""

    #: The JSON skeleton of ``state.json``'s ``tree``.
    skeleton: JSONValue
    #: Tensor name -> array, for the arrays file.
    arrays: dict[str, np.ndarray]
    #: The arrays file's ``__metadata__``: ``{}``, or ``{ALIASES_KEY: <JSON object>}``.
    header: dict[str, str]


def flatten_for_store(state: object) -> FlatState:
    """Split ``state`` into its skeleton, its arrays and its arrays file's header metadata.

    The header lists the state's :class:`ArrayAlias` places, if any, under
    ``"ckptkit.aliases"``: a JSON object (sorted keys) mapping each alias's name (its key
    path joined with ``.``, as tensor names are) to the tensor name of the array it stands for.
    Without aliases the header is empty, and the file has no ``__metadata__``.

    Args:
        state: the state tree.

    Returns:
        ``(skeleton, arrays, header)``; see :func:`flatten_state` for the first two.

    Raises:
        UnsupportedStateError: as :func:`flatten_state`, or an alias's target array is not
            saved at any place of the state.

    Example:
        >>> w = np.ones(2, np.float32)
        >>> flat = flatten_for_store({"emb": w, "head": ArrayAlias({}, target=w)})
        >>> flat.skeleton, list(flat.arrays), flat.header
        ({'emb': {'$array': 'emb'}, 'head': {}}, ['emb'], {'ckptkit.aliases': '{"head":"emb"}'})
    """
    arrays: dict[str, np.ndarray] = {}
    encoder = _Encoder("state", arrays)
    try:
        skeleton = encoder.encode(state, ())
    except RecursionError:
        raise UnsupportedStateError(_TOO_DEEP.format(what="state")) from None
    aliases = encoder.alias_names()
    header = {}
    if aliases:
        header[ALIASES_KEY] = json.dumps(
            aliases, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
    return FlatState(skeleton, arrays, header)


def flatten_state(state: object) -> tuple[JSONValue, dict[str, np.ndarray]]:
    """Split ``state`` into a JSON skeleton and the arrays it refers to, without copying them.

    The skeleton goes to ``state.json`` and the arrays to one safetensors file; the encoding is
    described in this module's docstring. Arrays are returned as given (possibly
    non-contiguous or big-endian); :func:`write_safetensors` lays them out. The store uses
    :func:`flatten_for_store`, which also gives the arrays file's header (the aliases).

    Args:
        state: the state tree.

    Returns:
        ``(skeleton, arrays)``: ``json.dumps(skeleton, allow_nan=False)`` succeeds, and
        ``arrays`` maps each tensor name the skeleton refers to onto its array.

    Raises:
        UnsupportedStateError: a value cannot be saved exactly; the message names its key path,
            e.g. ``state["optimizer"]["param_groups"][0]["foo"]``, and what to convert it to.

    Example:
        >>> import numpy as np
        >>> skeleton, arrays = flatten_state({"w": np.zeros(2), "epoch": 3, "pair": (1, 2)})
        >>> skeleton
        {'w': {'$array': 'w'}, 'epoch': 3, 'pair': {'$tuple': [1, 2]}}
        >>> list(arrays)
        ['w']
    """
    skeleton, arrays, _ = flatten_for_store(state)
    return skeleton, arrays


def encode_json_value(value: object, *, what: str) -> JSONValue:
    """Encode a JSON-like value (no arrays) exactly as :func:`flatten_state` would.

    Used for checkpoint metadata, which lives in the manifest rather than beside the arrays.

    Args:
        value: None, bool, int, float, str, numpy scalars, and dicts/lists/tuples of them.
        what: how to name the value in error messages, e.g. ``"metadata"``.

    Returns:
        A value that ``json.dumps(..., allow_nan=False)`` accepts.

    Raises:
        UnsupportedStateError: an array or another unsupported value, named by its key path.

    Example:
        >>> encode_json_value({"lr": float("inf"), "$note": "x"}, what="metadata")
        {'lr': {'$float': '7ff0000000000000'}, '$$note': 'x'}
    """
    try:
        return _Encoder(what, None).encode(value, ())
    except RecursionError:
        raise UnsupportedStateError(_TOO_DEEP.format(what=what)) from None
