"""TorchState and the torch-level conversions: modules, optimizers, schedulers, scalers and RNG.

The conversion of values is in ``_torch_convert``; this module decides what each object's state
is, checks that a saved state fits the objects before touching any of them, and restores the
random generators.
"""

from __future__ import annotations

import random
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckptkit._errors import ConfigMismatchError, CorruptCheckpointError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from ._torch_convert import FromTree, ToTree

_WRAPPER_PREFIX = "module."  # DataParallel / DistributedDataParallel name their child "module"


class RngStateWarning(UserWarning):
    """A saved random-generator state could not be restored here (CUDA states without CUDA)."""


class TorchState:
    """The training state of a torch run, as one object for :class:`ckptkit.Checkpointer`.

    Give it every object a resumed run must continue from, by name: modules, optimizers, LR
    schedulers, ``torch.amp.GradScaler``, ``torch.Generator`` (a DataLoader's, say) and anything
    with ``state_dict()``/``load_state_dict()``. With ``rng=True`` it also holds the global
    generators: Python's ``random``, NumPy's, torch's CPU generator and every initialised CUDA
    device's, so dropout and shuffling continue exactly.

    ``state_dict()`` returns the core's tree (tensors as numpy arrays, views of CPU tensors:
    save it before training on); ``load_state_dict()`` checks the whole tree against the
    objects first, then restores each in place through its own ``load_state_dict``, so tied
    parameters stay tied and tensors stay on their devices.

    A ``LambdaLR``/``MultiplicativeLR`` is saved without its functions (they are code, and
    torch's own state dict leaves them out): the scheduler you load into keeps the functions
    it was built with. CUDA generator states in a checkpoint loaded where CUDA is absent are
    skipped with an :class:`RngStateWarning`; everything else loads on a CPU-only machine.

    Args:
        rng: capture and restore the global random generators (the part named ``"rng"``).
        map_location: the device tensors are made on before each object's
            ``load_state_dict`` (``"cpu"``, ``"cuda:0"``, a ``torch.device``); None, the default,
            makes them on the CPU and lets each object copy them to its parameters' devices.
        **objects: the objects, by the names their parts have in the tree.

    Raises:
        TypeError: an object has neither ``state_dict``/``load_state_dict`` nor is a Generator.

    Example:
        >>> state = TorchState(model=model, optimizer=opt, scheduler=sched, loader=gen)
        >>> ckpt = Checkpointer(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"), state)
        >>> start = ckpt.resume()
    """

    def __init__(
        self, *, rng: bool = True, map_location: str | torch.device | None = None, **objects: Any
    ) -> None:
        for name, obj in objects.items():
            if not isinstance(obj, torch.Generator) and not (
                callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"TorchState({name}=...) is a {type(obj).__name__}, which has no "
                    "state_dict()/load_state_dict() and is not a torch.Generator"
                )
        if not objects and not rng:
            raise ValueError("TorchState() holds nothing: pass objects by name, or rng=True")
        self.objects = dict(objects)
        self.rng = bool(rng)
        self.map_location = None if map_location is None else torch.device(map_location)

    def __repr__(self) -> str:
        parts = [f"{n}={type(o).__name__}" for n, o in self.objects.items()]
        return f"TorchState({', '.join([*parts, f'rng={self.rng}'])})"

    def state_dict(self) -> dict[str, Any]:
        """Every object's state and (with ``rng``) the generators', as one core tree."""
        parts: dict[str, Any] = {name: _own_state(obj) for name, obj in self.objects.items()}
        if self.rng:
            parts["rng"] = capture_rng()
        tree = ToTree().convert(parts)
        assert isinstance(tree, dict)
        return tree

    def load_state_dict(self, tree: Any, /) -> None:
        """Restore every object (and the generators) from a tree made by :meth:`state_dict`.

        Raises:
            ConfigMismatchError: the tree's parts differ from this state's names, a module's
                keys differ from the saved ones (listed), or an optimizer's parameter groups
                differ. Nothing is restored then.
        """
        self._load(tree, self.map_location)

    def _load(self, tree: Any, map_location: torch.device | None, where: str = "") -> None:
        names = set(self.objects) | ({"rng"} if self.rng else set())
        if not isinstance(tree, Mapping):
            raise ConfigMismatchError(
                f"{where}a TorchState loads a dict of parts, not a {type(tree).__name__}"
            )
        missing, unexpected = sorted(names - set(tree)), sorted(set(tree) - names)
        if missing or unexpected:
            raise ConfigMismatchError(
                f"{where}the saved parts do not match this TorchState: missing {missing}, "
                f"unexpected {unexpected}; pass the same names (and rng=...) as when it was saved"
            )
        state = FromTree(map_location, where.rstrip(": ") or "TorchState").convert(dict(tree))
        ready = {n: fit(obj, state[n], f"{where}part {n!r}") for n, obj in self.objects.items()}
        for name, obj in self.objects.items():
            restore(obj, ready[name])
        if self.rng:
            restore_rng(state["rng"])


def _own_state(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def state_to_tree(obj: Any) -> Any:
    """Convert an object's state, or a state dict, to the core's tree.

    Tensors become numpy arrays (views of CPU tensors, host copies of others) and everything
    else JSON values; int-keyed dicts, ``OrderedDict``/``Counter`` and tied tensors are kept
    with small ``{"$torch": ...}`` markers (see ``_torch_convert``).

    Args:
        obj: a :class:`TorchState`, a ``torch.Generator``, anything with ``state_dict()``, or
            a state dict itself.

    Returns:
        A tree :meth:`ckptkit.CheckpointStore.save` accepts; :func:`tree_to_state` inverts it.

    Raises:
        UnsupportedStateError: a value cannot be saved exactly (the message has its key path).

    Example:
        >>> tree = state_to_tree(torch.nn.Linear(2, 1))
        >>> tree["weight"].shape
        (1, 2)
    """
    if isinstance(obj, TorchState):
        return obj.state_dict()
    if isinstance(obj, torch.Generator) or (
        not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict", None))
    ):
        obj = _own_state(obj)
    return ToTree().convert(obj)


def tree_to_state(tree: Any, *, map_location: str | torch.device | None = None) -> Any:
    """Convert a tree made by :func:`state_to_tree` back to a torch state dict.

    Every array becomes a tensor of the same dtype, shape and bytes, except the arrays that
    were numpy arrays when saved; tensors saved once for several keys come back as one tensor.

    Args:
        tree: the tree, e.g. from :meth:`ckptkit.CheckpointStore.load`.
        map_location: the device to make tensors on (None: the CPU).

    Raises:
        CorruptCheckpointError: a ``{"$torch": ...}`` marker is malformed.

    Example:
        >>> model.load_state_dict(tree_to_state(store.load()))
    """
    device = None if map_location is None else torch.device(map_location)
    return FromTree(device).convert(tree)


def save_state(
    store: CheckpointStore,
    step: int,
    state: Any,
    *,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Save a torch object's state (a TorchState, a module, an optimizer...) as ``step``.

    Example:
        >>> save_state(store, 3, TorchState(model=model, optimizer=opt), metrics={"loss": 0.1})
    """
    return store.save(step, state_to_tree(state), metrics, metadata)


def load_state(
    store: CheckpointStore,
    state: Any,
    step: StepSelector = None,
    *,
    map_location: str | torch.device | None = None,
) -> CheckpointRecord:
    """Load checkpoint ``step`` (None: the latest; ``"best"``) into ``state``, in place.

    Args:
        map_location: overrides the TorchState's; see :class:`TorchState`.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: from the store.
        ConfigMismatchError: the checkpoint does not fit ``state`` (nothing is changed).

    Example:
        >>> record = load_state(store, TorchState(model=model, optimizer=opt))
    """
    device = None if map_location is None else torch.device(map_location)
    loaded = store.load_checkpoint(step)
    where = f"{store.root}, step {loaded.record.step}"
    if isinstance(state, TorchState):
        device = device if device is not None else state.map_location
        state._load(loaded.state, device, f"{where}: ")
    else:
        restore(state, fit(state, FromTree(device, where).convert(loaded.state), where))
    return loaded.record


def fit(obj: Any, saved: Any, where: str) -> Any:
    """Check that ``saved`` fits ``obj`` (adding or stripping ``module.``); return what to load.

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
    return saved


def _fit_module(module: torch.nn.Module, saved: Mapping[str, Any], where: str) -> Any:
    expected = set(module.state_dict())
    if set(saved) == expected:
        return saved
    for old, new in ((_WRAPPER_PREFIX, ""), ("", _WRAPPER_PREFIX)):
        renamed = _replace_prefix(saved, old, new)
        if renamed is not None and set(renamed) == expected:
            return renamed
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    raise ConfigMismatchError(
        f"{where}: the saved state does not fit {type(module).__name__}: missing keys "
        f"{_show(missing)}, unexpected keys {_show(unexpected)}; load it into the model it was "
        "saved from (the same architecture and names)"
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


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and each initialised CUDA generator."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # untyped in torch
        cuda = torch.cuda.get_rng_state_all()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(saved: Any) -> None:
    """Set the global generators to ``saved`` (from :func:`capture_rng`).

    CUDA states are set for the devices both sides have; where CUDA is absent they are skipped
    with an :class:`RngStateWarning` (the CPU generators are still restored).

    Raises:
        CorruptCheckpointError: ``saved`` is not such a state.
    """
    try:
        python, numpy_state = saved["python"], saved["numpy"]
        torch_state, cuda = saved["torch"].cpu(), list(saved["cuda"])
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CorruptCheckpointError(f"the saved random-generator state is malformed: {e!r}") from e
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and len(cuda) != count:
        here = f"this machine has {count}" if count else "CUDA is not available here"
        warnings.warn(
            RngStateWarning(
                f"the checkpoint holds the random states of {len(cuda)} CUDA device(s) and "
                f"{here}: restored the first {min(count, len(cuda))} (and the CPU generators)"
            ),
            stacklevel=3,
        )
    for index, state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(state.cpu(), index)
