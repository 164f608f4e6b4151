"""A TorchState split for a sharded save: tensors of modules and optimizers apart, the rest as JSON.

In a sharded save the modules' and optimizers' states come from
``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``get_optimizer_state_dict``), whose tensors are ``DTensor`` shards under FSDP2 or tensor
parallelism, and whose optimizer states are keyed by parameter name rather than by position,
so they load into the same model sharded another way, or not sharded at all. Their tensors go
to ``torch.distributed.checkpoint`` (every rank writes its own chunks); everything else (their
non-tensor values, the other parts, the random generators) stays in the ordinary tree, written
by rank 0, with ``None`` where each tensor was. The tree's ``"$layout"`` entry says so, which
is how a plain ``TorchState.load_state_dict`` of a sharded checkpoint (read whole by the core)
knows to load these parts with ``set_model_state_dict`` / ``set_optimizer_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ckptkit._errors import ConfigMismatchError

if TYPE_CHECKING:
    from ._torch_state import TorchState

#: The tree entry saying how module and optimizer parts are laid out.
LAYOUT_KEY = "$layout"
#: The layout of ``torch.distributed.checkpoint.state_dict``: names, not positions.
DISTRIBUTED_LAYOUT = "distributed"

Path = tuple[str | int, ...]


@dataclass
class Captured:
    """One rank's state for a sharded save.

    Attributes:
        parts: every part's state with ``None`` where each module or optimizer tensor was
            (rank 0 saves it through the ordinary tree).
        tensors: those tensors by key (their path joined with ``.``), for DCP.
        paths: each key's path in ``parts``.
    """

    parts: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    paths: dict[str, Path]


def distributed_parts(parts: Mapping[str, Any]) -> dict[str, tuple[torch.nn.Module, Any]]:
    """The parts saved in the distributed layout: each module, and each optimizer with its module.

    Raises:
        ValueError: there is no module, or an optimizer's parameters are not all in one module.
    """
    modules = {n: o for n, o in parts.items() if isinstance(o, torch.nn.Module)}
    if not modules:
        raise ValueError(
            "a sharded save needs the model in the TorchState (TorchState(model=model, "
            "optimizer=optimizer, ...))"
        )
    owned = {n: {id(p) for p in m.parameters()} for n, m in modules.items()}
    out: dict[str, tuple[torch.nn.Module, Any]] = {n: (m, None) for n, m in modules.items()}
    for name, opt in parts.items():
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        params = {id(p) for group in opt.param_groups for p in group["params"]}
        owners = [n for n, ids in owned.items() if params <= ids]
        if not owners:
            raise ValueError(
                f"optimizer {name!r}: its parameters are not all parameters of one module of "
                f"this TorchState ({sorted(modules)}); a sharded save names optimizer state by "
                "the module's parameter names, so pass the module the optimizer trains"
            )
        out[name] = (modules[owners[0]], opt)
    return out


def get_part(module: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """A module's or an optimizer's state in the distributed layout."""
    if optimizer is None:
        return dict(get_model_state_dict(module))
    return dict(get_optimizer_state_dict(module, optimizer))


def set_part(module: torch.nn.Module, optimizer: Any, state: Mapping[str, Any]) -> None:
    """Load a module's or an optimizer's state given in the distributed layout.

    Whole tensors (a sharded checkpoint read whole by the core) load into a sharded module
    too: every rank holds them all, and torch keeps each rank's part.
    """
    options = StateDictOptions(full_state_dict=_is_sharded(module) and not _has_dtensor(state))
    if optimizer is None:
        result = set_model_state_dict(module, dict(state), options=options)
        bad = [*result.missing_keys, *result.unexpected_keys]
        if bad:
            raise ConfigMismatchError(
                f"the module's keys differ from the saved ones: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
    else:
        set_optimizer_state_dict(module, optimizer, dict(state), options=options)


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def _has_dtensor(value: Any) -> bool:
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_dtensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_dtensor(v) for v in value)
    return False


def strip(value: Any, path: Path, tensors: dict[str, torch.Tensor], paths: dict[str, Path]) -> Any:
    """``value`` with each tensor replaced by None, collected into ``tensors`` by its key."""
    if isinstance(value, torch.Tensor):
        key = ".".join(map(str, path))
        if key in tensors:
            raise ValueError(
                f"two tensors of the state have the key {key!r} (paths {list(paths[key])} and "
                f"{list(path)}); rename one of the keys"
            )
        tensors[key], paths[key] = value, path
        return None
    if isinstance(value, Mapping):
        return {k: strip(v, (*path, k), tensors, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [strip(v, (*path, i), tensors, paths) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(strip(v, (*path, i), tensors, paths) for i, v in enumerate(value))
    return value


def capture(state: TorchState) -> Captured:
    """This rank's state for a sharded save (see :class:`Captured`)."""
    layout = distributed_parts(state._parts)
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, Path] = {}
    parts = {}
    for name in state._parts:
        if name in layout:
            parts[name] = strip(get_part(*layout[name]), (name,), tensors, paths)
    return Captured(parts=parts, tensors=tensors, paths=paths)


def fill(
    parts: dict[str, Any], tensors: Mapping[str, torch.Tensor], paths: Mapping[str, Path]
) -> None:
    """Put tensors back into ``parts`` at their paths (where ``strip`` left None)."""
    for key, tensor in tensors.items():
        node: Any = parts
        path = paths[key]
        for part in path[:-1]:
            node = node[part]
        if isinstance(node, tuple):
            raise ValueError(f"{key}: a tensor inside a tuple cannot be loaded in place")
        node[path[-1]] = tensor


def restore_distributed(
    objects: Mapping[str, Any], state: Mapping[str, Any], where: str
) -> list[str]:
    """Load the parts saved in the distributed layout; return their names."""
    layout = distributed_parts(objects)
    for name, (module, optimizer) in layout.items():
        try:
            set_part(module, optimizer, state[name])
        except Exception as e:
            raise ConfigMismatchError(
                f"{where}part {name!r} could not be loaded ({type(e).__name__}: {e})"
            ) from e
    return list(layout)
