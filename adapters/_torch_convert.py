"""Convert torch state dicts to ckptkit's state tree, exactly, copying no CPU tensor.

A torch state dict holds more than the core's tree can say: tensors, dicts keyed by ints (an
optimizer's ``state``), dict subclasses whose type matters (``Counter``, the ``OrderedDict`` of
a module's state dict with its ``_metadata``), and one tensor under several keys (tied weights).
The conversion maps each onto the core's vocabulary:

- a tensor becomes a numpy array of the same dtype, shape and bytes: a view of the tensor when
  it is on the CPU (no copy), a host copy otherwise. bfloat16 and the float8 kinds become
  ``ml_dtypes`` arrays. Every array of the tree is a tensor again after loading;
- a genuine numpy array (NumPy's RNG state, say) is kept as ``{"$torch": {"kind": "ndarray"},
  "array": arr}``, so it loads as a numpy array, not a tensor;
- a second key for a tensor already converted (same storage, offset, shape, strides, dtype)
  becomes ``{"$torch": {"kind": "alias", "up": n, "down": [...], "path": [...]}}``: the bytes
  are saved once and both keys load as the same tensor. The first key's place is found from
  the alias's own place: ``n`` steps up the tree, then down the keys ``down``, so any part of
  the tree that holds both converts on its own (``tree_to_state(store.load()["model"])``).
  ``path`` is the first key's path from the root of the tree converted, which is all that
  aliases written before ``up``/``down`` have; such an alias is resolved by trying that path,
  then the path below each ancestor of the alias, nearest first (the tree was saved nested
  in a larger one), then ever shorter tails of it (a part of the tree is converted). The
  marker is an :class:`ckptkit._tree.ArrayAlias` of the first key's array, so the arrays file's
  header names the alias for readers without ckptkit;
- a dict that is not a plain ``dict`` with ``str`` keys becomes ``{"$torch": {"kind": "dict",
  "type": "dict" | "OrderedDict" | "Counter", "keys": "str" | "int" | "pairs", "metadata": ...},
  **entries}``: int keys are written as decimal strings (so arrays keep names such as
  ``optimizer.state.0.exp_avg``), other keys as ``"pairs": [[key, value], ...]``; ``metadata`` is
  the ``_metadata`` attribute of a module's state dict (module versions);
- ``torch.dtype`` and ``torch.device`` values become ``{"$torch": {"kind": "dtype" | "device",
  "name": ...}}``.

A dict key that starts with ``$`` gets one more ``$`` (as the core does), so a dict with the key
``"$torch"`` is always one of these markers. Not kept: ``requires_grad``, tensor subclasses
(a ``Parameter`` loads as a plain tensor), the strides of a non-contiguous tensor (it loads
contiguous, with the same values), and sharing between tensors that overlap only in part.
``_torch_convert_read`` converts such a tree back.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, TypeAlias

import numpy as np
import torch

from ckptkit._errors import UnsupportedStateError
from ckptkit._tree import ArrayAlias

MARKER = "$torch"
TreePath: TypeAlias = tuple[str | int, ...]

_DIRECT = ["float64", "float32", "float16", "complex64", "int64", "int32", "int16", "int8"]
_DIRECT += ["uint64", "uint32", "uint16", "uint8", "bool"]
# Narrow floats numpy lacks: stored through an int view of the same width, viewed as ml_dtypes.
_VIEWED = {"bfloat16": torch.int16, "float8_e4m3fn": torch.uint8, "float8_e5m2": torch.uint8}
_VIEWED |= {"float8_e4m3fnuz": torch.uint8, "float8_e5m2fnuz": torch.uint8}
_VIEWED |= {"float8_e8m0fnu": torch.uint8}
#: torch dtype -> (torch int dtype to view through or None, numpy dtype name); only the dtypes
#: this torch has (uint16/32/64 and some float8 kinds are recent).
DTYPES: dict[torch.dtype, tuple[torch.dtype | None, str]] = {
    getattr(torch, name): (None, name) for name in _DIRECT if hasattr(torch, name)
} | {getattr(torch, name): (via, name) for name, via in _VIEWED.items() if hasattr(torch, name)}
_BY_NUMPY_NAME = {name: (torch_dtype, via) for torch_dtype, (via, name) in DTYPES.items()}
DICT_TYPES: dict[str, type[dict[Any, Any]]] = {
    "dict": dict,
    "OrderedDict": OrderedDict,
    "Counter": Counter,
}


def render(path: TreePath) -> str:
    """``("model", "w")`` -> ``state["model"]["w"]``, as the core names key paths."""
    return "state" + "".join(f'["{p}"]' if isinstance(p, str) else f"[{p}]" for p in path)


def _ml_dtype(name: str) -> np.dtype[Any]:
    try:
        import ml_dtypes
    except ImportError as e:
        raise UnsupportedStateError(
            f"{name} tensors need the ml_dtypes package to become numpy arrays; "
            "pip install 'ckptkit-ml[dtypes]'"
        ) from e
    dtype: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
    return dtype


def tensor_to_array(tensor: torch.Tensor, path: TreePath = ()) -> np.ndarray:
    """The tensor's values as a numpy array: a view for a CPU tensor, a host copy otherwise.

    Raises:
        UnsupportedStateError: a sparse, quantized or meta tensor, or a dtype that safetensors
            cannot hold; the message names the key path.
    """
    t = tensor.detach()
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise UnsupportedStateError(
            f"{render(path)}: a {t.layout} {'quantized ' if t.is_quantized else ''}tensor on "
            f"{t.device} cannot be saved; save a dense tensor (tensor.to_dense(), "
            "tensor.dequantize()) with real data"
        )
    spec = DTYPES.get(t.dtype)
    if spec is None:
        names = ", ".join(sorted(str(d) for d in DTYPES))
        raise UnsupportedStateError(
            f"{render(path)}: a tensor of dtype {t.dtype} cannot be saved; convert it to one "
            f"of {names}"
        )
    via, name = spec
    t = t.cpu().resolve_conj().resolve_neg()  # no-ops for an ordinary CPU tensor
    if via is None:
        return t.numpy()
    return t.view(via).numpy().view(_ml_dtype(name))


def array_to_tensor(array: np.ndarray, path: TreePath = ()) -> torch.Tensor:
    """A CPU tensor with the array's dtype, shape and bytes (sharing memory where it can).

    Raises:
        UnsupportedStateError: a dtype torch has no tensor for.
    """
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    spec = _BY_NUMPY_NAME.get(array.dtype.name)
    if spec is None:
        raise UnsupportedStateError(
            f"{render(path)}: a numpy array of dtype {array.dtype} has no torch dtype; "
            "wrap genuine numpy arrays with the torch adapter's state_to_tree before saving"
        )
    if not (array.flags.c_contiguous and array.flags.writeable and array.flags.aligned):
        array = np.array(array, order="C")  # torch wants writable, aligned, positive strides
    torch_dtype, via = spec
    if via is None:
        return torch.from_numpy(array)
    int_dtype = np.int16 if via is torch.int16 else np.uint8
    return torch.from_numpy(array.view(int_dtype)).view(torch_dtype)


def _escape(key: str) -> str:
    return "$" + key if key.startswith("$") else key


class ToTree:
    """One conversion of a torch state to a tree; remembers tensors seen, to save each once."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], tuple[TreePath, np.ndarray]] = {}
        self._active: set[int] = set()

    def convert(self, value: Any, path: TreePath = ()) -> Any:
        """Return the tree for ``value`` found at ``path`` of the tree."""
        if value is None or type(value) in (bool, int, float, str) or isinstance(value, np.generic):
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return {MARKER: {"kind": "ndarray"}, "array": value}
        if isinstance(value, torch.dtype):
            return {MARKER: {"kind": "dtype", "name": str(value).removeprefix("torch.")}}
        if isinstance(value, torch.device):
            return {MARKER: {"kind": "device", "name": str(value)}}
        if not isinstance(value, (dict, list, tuple)):
            raise UnsupportedStateError(
                f"{render(path)}: a {type(value).__name__} cannot be saved; give the state dict "
                "only tensors, numpy arrays, dicts, lists, tuples and JSON scalars"
            )
        if id(value) in self._active:
            raise UnsupportedStateError(f"{render(path)}: the state contains itself (a cycle)")
        self._active.add(id(value))
        try:
            if isinstance(value, dict):
                return self._dict(value, path)
            if type(value) not in (list, tuple):
                raise UnsupportedStateError(
                    f"{render(path)}: a {type(value).__name__} cannot be saved; convert it to "
                    "a plain list or tuple"
                )
            items = [self.convert(item, (*path, i)) for i, item in enumerate(value)]
            return items if type(value) is list else tuple(items)
        finally:
            self._active.discard(id(value))

    def _tensor(self, tensor: torch.Tensor, path: TreePath) -> Any:
        storage = tensor.untyped_storage() if tensor.layout == torch.strided else None
        key = None
        if storage is not None and storage.data_ptr() != 0 and tensor.numel() > 0:
            key = (
                storage.data_ptr(),
                str(tensor.device),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            first = self._seen.get(key)
            if first is not None:
                return _alias(path, *first)
        array = tensor_to_array(tensor, path)
        if key is not None:
            self._seen[key] = (path, array)
        return array

    def _dict(self, value: dict[Any, Any], path: TreePath) -> Any:
        type_name = next((n for n, t in DICT_TYPES.items() if type(value) is t), None)
        if type_name is None:
            raise UnsupportedStateError(
                f"{render(path)}: a {type(value).__name__} cannot be saved (its type is not "
                "dict, OrderedDict or Counter); convert it to a dict"
            )
        metadata = getattr(value, "_metadata", None)
        if all(type(k) is str for k in value):
            keys = "str"
        elif all(type(k) is int for k in value):
            keys = "int"
        else:
            keys = "pairs"
        if type_name == "dict" and keys == "str" and metadata is None:
            return {_escape(k): self.convert(v, (*path, _escape(k))) for k, v in value.items()}
        head: dict[str, Any] = {"kind": "dict", "type": type_name, "keys": keys}
        if metadata is not None:
            head["metadata"] = self.convert(metadata, (*path, MARKER, "metadata"))
        out: dict[str, Any] = {MARKER: head}
        if keys == "pairs":
            pairs = []
            for i, (k, v) in enumerate(value.items()):
                where = (*path, "pairs", i)
                pairs.append([self.convert(k, (*where, 0)), self.convert(v, (*where, 1))])
            out["pairs"] = pairs
            return out
        for k, v in value.items():
            name = _escape(k) if keys == "str" else str(k)
            out[name] = self.convert(v, (*path, name))
        return out


def _alias(path: TreePath, first: TreePath, array: np.ndarray) -> ArrayAlias:
    """The marker at ``path`` for the tensor saved at ``first`` as ``array``."""
    common = 0
    while common < min(len(path), len(first)) and path[common] == first[common]:
        common += 1
    head = {
        "kind": "alias",
        "up": len(path) - common,
        "down": list(first[common:]),
        "path": list(first),  # what readers from before "up"/"down" resolve
    }
    return ArrayAlias({MARKER: head}, target=array)
