"""Converting ckptkit's state tree back to torch values: the inverse of ``_torch_convert.ToTree``.

The markers are those ``_torch_convert`` describes. Every marker is checked: a malformed one
raises :class:`CorruptCheckpointError` with its key path, and an alias whose tensor is not in
the tree being converted raises :class:`TiedTensorError`, saying what to convert instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ckptkit._errors import CkptkitError, CorruptCheckpointError

from ._torch_convert import DICT_TYPES, MARKER, TreePath, array_to_tensor, render


class TiedTensorError(CkptkitError, ValueError):
    """A tied tensor's other key is not in the tree being converted back to torch values.

    Tied weights are saved once: converting a part of a checkpoint that holds one key of a
    tied tensor but not the key its bytes were saved under cannot give that tensor back.
    Convert the whole tree, or a part that holds both keys.
    """


def _candidates(path: TreePath, saved: TreePath) -> list[TreePath]:
    """Where an alias at ``path`` with only a root path ``saved`` may find its tensor, in order."""
    nested = [path[:k] + saved for k in range(len(path) - 1, 0, -1)]
    tails = [saved[j:] for j in range(1, len(saved))]
    return [saved, *nested, *tails]


class FromTree:
    """One conversion of a tree back to torch values; resolves aliases to the same tensor.

    Tensors share the memory of the arrays they come from where they can (a checkpoint's
    file buffer, read once), unless ``own(path)`` says the tensor at ``path`` is kept by the
    object it is loaded into (an optimizer's moments, say): such a tensor is a fresh copy in
    torch's own allocation, as the tensors of the run that saved it were. Views into a file
    buffer sit at any offset, and torch's vectorised CPU kernels may round differently on
    memory aligned differently (LBFGS's dot products do), so a resumed run that kept such views
    would drift from the uninterrupted one; kept views would also hold the whole buffer alive.
    """

    def __init__(
        self,
        device: torch.device | None,
        source: str = "the tree",
        *,
        own: Callable[[TreePath], bool] | None = None,
    ) -> None:
        self._device = device
        self._source = source
        self._own = own
        self._tensors: dict[TreePath, torch.Tensor] = {}

    def _corrupt(self, path: TreePath, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self._source}: {render(path)}: {problem}; the torch state was damaged or written "
            "by something other than the torch adapter"
        )

    def convert(self, value: Any, path: TreePath = ()) -> Any:
        """Return the torch value for the tree ``value`` found at ``path``."""
        if isinstance(value, np.ndarray):
            tensor = array_to_tensor(value, path)
            if self._device is not None:
                tensor = tensor.to(self._device)
            if self._own is not None and self._own(path) and tensor.device.type == "cpu":
                tensor = tensor.clone()
            self._tensors[path] = tensor
            return tensor
        if isinstance(value, list):
            return [self.convert(item, (*path, i)) for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self.convert(item, (*path, i)) for i, item in enumerate(value))
        if not isinstance(value, dict):
            return value
        if MARKER in value:
            return self._marker(value, path)
        out = {}
        for key, item in value.items():
            if key.startswith("$") and not key.startswith("$$"):
                raise self._corrupt(path, f"key {key!r} is neither a marker nor escaped")
            out[key[1:] if key.startswith("$") else key] = self.convert(item, (*path, key))
        return out

    def _marker(self, value: dict[str, Any], path: TreePath) -> Any:
        head = value[MARKER]
        kind = head.get("kind") if isinstance(head, dict) else None
        rest = {k: v for k, v in value.items() if k != MARKER}
        if kind == "ndarray" and set(rest) == {"array"} and isinstance(rest["array"], np.ndarray):
            return rest["array"]
        if kind == "alias" and not rest and isinstance(head.get("path"), list):
            return self._alias(head, path)
        if (
            kind == "dtype"
            and not rest
            and isinstance(getattr(torch, str(head.get("name")), None), torch.dtype)
        ):
            return getattr(torch, head["name"])
        if kind == "device" and not rest and isinstance(head.get("name"), str):
            return torch.device(head["name"])
        if kind == "dict" and head.get("type") in DICT_TYPES:
            return self._dict(head, rest, path)
        raise self._corrupt(path, f"malformed marker {head!r}")

    def _alias(self, head: dict[str, Any], path: TreePath) -> torch.Tensor:
        saved = tuple(head["path"])
        up, down = head.get("up"), head.get("down")
        if up is None and down is None:  # written before aliases were relative
            for candidate in _candidates(path, saved):
                if candidate in self._tensors:
                    return self._tensors[candidate]
            raise TiedTensorError(
                f"{self._source}: {render(path)} is tied to the tensor saved at "
                f"{render(saved)} of the tree it was saved from, which is not in the part "
                "being converted; convert the whole tree, or a part that holds both"
            )
        if type(up) is not int or up < 0 or not isinstance(down, list):
            raise self._corrupt(path, f"malformed alias marker {head!r}")
        if up > len(path):
            raise TiedTensorError(
                f"{self._source}: {render(path)} is tied to the tensor saved at "
                f"{render(saved)} of the tree it was saved from, which lies outside the part "
                "being converted; convert the whole tree, or a part that holds both"
            )
        target = path[: len(path) - up] + tuple(down)
        tensor = self._tensors.get(target)
        if tensor is None:
            raise TiedTensorError(
                f"{self._source}: {render(path)} is tied to {render(target)}, which holds no "
                "tensor in the tree being converted; convert the tree as it was loaded, "
                "with that entry in it"
            )
        return tensor

    def _dict(self, head: dict[str, Any], rest: dict[str, Any], path: TreePath) -> Any:
        out = DICT_TYPES[head["type"]]()
        keys = head.get("keys")
        if keys == "pairs" and set(rest) == {"pairs"} and isinstance(rest["pairs"], list):
            for i, pair in enumerate(rest["pairs"]):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise self._corrupt((*path, "pairs", i), "not a [key, value] pair")
                where = (*path, "pairs", i)
                out[self.convert(pair[0], (*where, 0))] = self.convert(pair[1], (*where, 1))
        elif keys == "int" and all(k.lstrip("-").isdigit() for k in rest):
            for k, v in rest.items():
                out[int(k)] = self.convert(v, (*path, k))
        elif keys == "str":
            for k, v in self.convert(rest, path).items():
                out[k] = v
        else:
            raise self._corrupt(path, f"malformed dict marker {head!r}")
        if "metadata" in head:
            out._metadata = self.convert(head["metadata"], (*path, MARKER, "metadata"))  # type: ignore[attr-defined]  # torch's module state dicts carry this attribute
        return out
