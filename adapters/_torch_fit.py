"""Whether a saved state fits the object it is loaded into, and the form it loads in.

A checkpoint's part is checked against its object before anything is restored: a module's keys
(whatever DataParallel, DDP or torch.compile wrappers either side has), the shapes and dtypes of
its tensors, an optimizer's parameter groups. ``fit`` returns the state as the object names it;
``restore`` puts it in through the object's own API.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit._errors import ConfigMismatchError

from ._torch_loader import LoaderState

_WRAPPERS = ("DataParallel", "DistributedDataParallel")
_WRAPPER_PREFIX = "module."  # DataParallel / DistributedDataParallel name their child "module"
_COMPILED_PREFIX = "_orig_mod."  # torch.compile's OptimizedModule names its child "_orig_mod"
#: The key prefixes a saved module's wrappers may have added, up to three wrappers deep
#: (DDP of a compiled model: "module._orig_mod."), the bare module's "" first.
_SAVED_PREFIXES = [""] + [
    "".join(chain)
    for depth in (1, 2, 3)
    for chain in itertools.product((_WRAPPER_PREFIX, _COMPILED_PREFIX), repeat=depth)
]


def _unwrap(obj: Any) -> tuple[Any, str]:
    """The module inside DataParallel/DDP and torch.compile wrappers, and their key prefix."""
    prefix = ""
    while isinstance(obj, torch.nn.Module):
        inner = getattr(obj, "module", None) if type(obj).__name__ in _WRAPPERS else None
        if isinstance(inner, torch.nn.Module):
            obj, prefix = inner, prefix + _WRAPPER_PREFIX
            continue
        inner = getattr(obj, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        obj, prefix = inner, prefix + _COMPILED_PREFIX
    return obj, prefix


def kind_of(obj: Any) -> str:
    """The class that decides what a state means: a wrapped module's, not its wrapper's."""
    if isinstance(obj, LoaderState):
        return "DataLoader"
    cls = type(_unwrap(obj)[0])
    if cls.__name__.startswith("FSDP") and hasattr(torch.distributed, "fsdp"):
        # fully_shard gives each module a class of its own, FSDP<name>(FSDPModule, <class>).
        from torch.distributed.fsdp import FSDPModule

        if issubclass(cls, FSDPModule):
            cls = next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    return cls.__qualname__


def fit(obj: Any, saved: Any, where: str) -> Any:
    """Check that ``saved`` fits ``obj`` (mapping wrapper prefixes); return what to load.

    Raises:
        ConfigMismatchError: keys or parameter groups differ; the message lists them.
    """
    if isinstance(obj, torch.Generator):
        if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8:
            raise ConfigMismatchError(f"{where}: the saved state is not a generator's state")
        return saved.cpu()
    if isinstance(obj, torch.nn.Module) and isinstance(saved, Mapping):
        return _fit_module(obj, saved, where)
    if isinstance(obj, torch.optim.Optimizer) and isinstance(saved, Mapping):
        groups = saved.get("param_groups")
        have = [len(g["params"]) for g in obj.param_groups]
        got = None
        if isinstance(groups, list) and all(isinstance(g, Mapping) for g in groups):
            got = [len(g.get("params", ())) for g in groups]
        if got != have:
            raise ConfigMismatchError(
                f"{where}: the saved optimizer has parameter groups of sizes {got}, this one "
                f"{have}; build the optimizer over the same parameters as when it was saved"
            )
        return _own_param_names(obj, saved)
    return saved


def _strip_wrappers(name: str) -> str:
    while name.startswith((_WRAPPER_PREFIX, _COMPILED_PREFIX)):
        name = name.partition(".")[2]
    return name


def _own_param_names(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> Any:
    """``saved`` with the optimizer's own ``param_names`` where they differ only by wrappers.

    An optimizer built from ``model.named_parameters()`` saves each group's parameter names,
    and torch's ``load_state_dict`` puts the saved names in place of its own. Names saved from
    a compiled or DataParallel model (``_orig_mod.fc.weight``) would then stay on an optimizer
    of the bare model (``fc.weight``) and be saved again; this keeps the optimizer's names.
    """
    groups = []
    for own, group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        names, saved_names = own.get("param_names"), group.get("param_names")
        if (
            isinstance(names, list)
            and isinstance(saved_names, list)
            and names != saved_names
            and all(isinstance(n, str) for n in saved_names)
            and [_strip_wrappers(n) for n in names] == [_strip_wrappers(n) for n in saved_names]
        ):
            group = {**group, "param_names": list(names)}
        groups.append(group)
    return {**saved, "param_groups": groups}


def _fit_module(module: torch.nn.Module, saved: Mapping[str, Any], where: str) -> Any:
    """The saved state with its keys as ``module`` names them, wrappers or not.

    A model saved inside ``DataParallel``/``DistributedDataParallel`` (keys ``module.*``) or
    compiled with ``torch.compile`` (keys ``_orig_mod.*``), in any combination, loads into the
    bare model and into any other wrapping of it, and the other way round: the saved keys'
    wrapper prefix is replaced by this module's. The saved keys as they are come first, then
    the saved state read as a bare model's, then as wrapped ever deeper.
    """
    own = module.state_dict()
    expected = set(own)
    kind = kind_of(module)
    prefix = _unwrap(module)[1]
    readings = [saved] + [
        r
        for old in _SAVED_PREFIXES
        if old != prefix and (r := _replace_prefix(saved, old, prefix)) is not None
    ]
    for candidate in readings:
        if set(candidate) == expected:
            _check_tensors(own, candidate, kind, where)
            return candidate
    # The message lists the keys of the reading closest to the module's, wrappers mapped.
    closest = max(readings, key=lambda r: len(expected & set(r)))
    missing, unexpected = sorted(expected - set(closest)), sorted(set(closest) - expected)
    raise ConfigMismatchError(
        f"{where}: the saved state does not fit {kind}: missing keys "
        f"{_show(missing)}, unexpected keys {_show(unexpected)}; load it into the model it was "
        "saved from (the same architecture and names)"
    )


def _check_tensors(own: Mapping[str, Any], saved: Mapping[str, Any], kind: str, where: str) -> None:
    """Refuse before loading anything if a tensor's shape or dtype differs from the module's."""
    wrong = [
        f"{key}: saved {tuple(value.shape)} {value.dtype}, here {tuple(own[key].shape)} {own[key].dtype}"
        for key, value in saved.items()
        if isinstance(value, torch.Tensor)
        and isinstance(own[key], torch.Tensor)
        and (value.shape != own[key].shape or value.dtype != own[key].dtype)
    ]
    if wrong:
        raise ConfigMismatchError(
            f"{where}: the saved state does not fit {kind}: {_show(wrong)}; load it into a model "
            "built with the same sizes and dtypes as when it was saved"
        )


def _show(keys: list[str]) -> str:
    return str(keys) if len(keys) <= 10 else f"{keys[:10]} and {len(keys) - 10} more"


def _replace_prefix(saved: Mapping[str, Any], old: str, new: str) -> OrderedDict[str, Any] | None:
    """``saved`` with each key's ``old`` prefix made ``new``; None if a key lacks ``old``."""
    if not all(key.startswith(old) for key in saved):
        return None
    out = OrderedDict((new + key[len(old) :], value) for key, value in saved.items())
    metadata = getattr(saved, "_metadata", None)
    if isinstance(metadata, Mapping):
        # Keyed by module path without the trailing dot ("" is the root): as a key prefix,
        # "fc" is "fc." and the root is "".
        kept: OrderedDict[str, Any] = OrderedDict()
        for path, info in metadata.items():
            prefix = path + "." if path else ""
            if prefix.startswith(old):
                kept[(new + prefix[len(old) :]).removesuffix(".")] = info
        out._metadata = kept  # type: ignore[attr-defined]  # read by Module.load_state_dict
    return out


def restore(obj: Any, saved: Any) -> None:
    """Put a state checked by :func:`fit` into ``obj`` through its own API."""
    if isinstance(obj, torch.Generator):
        obj.set_state(saved)
    elif isinstance(obj, torch.nn.Module):
        obj.load_state_dict(saved, strict=True)
    else:
        obj.load_state_dict(saved)
