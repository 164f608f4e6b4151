"""TorchState and the torch-level conversions: modules, optimizers, schedulers, scalers and RNG.

The conversion of values is in ``_torch_convert``; this module decides what each object's state
is, checks that a saved state fits the objects before touching any of them, and restores the
random generators.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit._errors import ConfigMismatchError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from ._torch_convert import FromTree, ToTree
from ._torch_data import ResumableSampler
from ._torch_loader import LoaderState, is_plain_loader
from ._torch_rng import capture_rng, restore_rng

_TYPES_KEY = "$types"
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


class TorchState:
    """The training state of a torch run, as one object for :class:`ckptkit.Checkpointer`.

    Give it every object a resumed run must continue from, by name: modules, optimizers, LR
    schedulers, ``torch.amp.GradScaler``, ``torch.Generator``, ``DataLoader`` and anything
    with ``state_dict()``/``load_state_dict()``. With ``rng=True`` it also holds the global
    generators: Python's ``random``, NumPy's, torch's CPU generator and every initialised CUDA
    device's, so dropout and shuffling continue exactly.

    A ``DataLoader`` is saved as the state of its shuffling generator(s) and of its sampler,
    when that has one (:class:`ResumableSampler`). A save inside an epoch of a loader whose
    sampler keeps no position (``shuffle=True``) raises rather than make a checkpoint that
    would resume at the start of the epoch in another order; a ResumableSampler in a loader
    without ``generator=`` is refused with ``rng=True`` (see :class:`ResumableSampler`). After a
    resume inside an epoch, a ResumableSampler raises if torch's global generator was drawn
    from before its first batch, since the run can then no longer match the uninterrupted one.

    ``state_dict()`` returns the core's tree (tensors as numpy arrays, views of CPU tensors:
    save it before training on); ``load_state_dict()`` checks the whole tree against the
    objects first, then restores each in place through its own ``load_state_dict``, so tied
    parameters stay tied and tensors stay on their devices. A module saved inside
    ``DataParallel``/``DistributedDataParallel`` or compiled with ``torch.compile``, in any
    combination, loads into the bare module or any other wrapping of it.

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
        TypeError: an object has neither ``state_dict``/``load_state_dict`` nor is a Generator
            or a DataLoader.
        ValueError: a DataLoader cannot resume exactly with this ``rng`` (the message says
            what to pass it).

    Example:
        >>> state = TorchState(model=model, optimizer=opt, scheduler=sched, loader=loader)
        >>> ckpt = Checkpointer(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"), state)
        >>> start = ckpt.resume()
    """

    def __init__(
        self, *, rng: bool = True, map_location: str | torch.device | None = None, **objects: Any
    ) -> None:
        for name, obj in objects.items():
            if (
                not isinstance(obj, torch.Generator)
                and not is_plain_loader(obj)
                and not (
                    callable(getattr(obj, "state_dict", None))
                    and callable(getattr(obj, "load_state_dict", None))
                )
            ):
                raise TypeError(
                    f"TorchState({name}=...) is a {type(obj).__name__}, which has no "
                    "state_dict()/load_state_dict() and is not a torch.Generator or a DataLoader"
                )
        if not objects and not rng:
            raise ValueError("TorchState() holds nothing: pass objects by name, or rng=True")
        self.objects = dict(objects)
        self.rng = bool(rng)
        #: What is saved for each object: the object, or the LoaderState of a DataLoader.
        self._parts: dict[str, Any] = {
            name: LoaderState(obj, name=name, rng=self.rng) if is_plain_loader(obj) else obj
            for name, obj in objects.items()
        }
        self.map_location = None if map_location is None else torch.device(map_location)

    def __repr__(self) -> str:
        parts = [f"{n}={type(o).__name__}" for n, o in self.objects.items()]
        return f"TorchState({', '.join([*parts, f'rng={self.rng}'])})"

    def state_dict(self) -> dict[str, Any]:
        """Every object's state and (with ``rng``) the generators', as one core tree."""
        parts: dict[str, Any] = {name: _own_state(obj) for name, obj in self._parts.items()}
        if self.rng:
            parts["rng"] = capture_rng()
        # Each part's class, so a state is never loaded into another kind of object (an Adam
        # state into SGD loads without complaint and fails, or drifts, much later). No keyword
        # argument can start with "$", so this key never collides with a part's name.
        parts[_TYPES_KEY] = {name: _kind(obj) for name, obj in self._parts.items()}
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
        # Modules copy what they load into their parameters; every other part keeps its tensors.
        kept = {n for n, obj in self._parts.items() if not isinstance(obj, torch.nn.Module)}
        state = FromTree(
            map_location,
            where.rstrip(": ") or "TorchState",
            own=lambda path: bool(path) and path[0] in kept,
        ).convert(dict(tree))
        types = state.pop(_TYPES_KEY, {})
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise ConfigMismatchError(
                f"{where}the saved parts do not match this TorchState: missing {missing}, "
                f"unexpected {unexpected}; pass the same names (and rng=...) as when it was saved"
            )
        for name, obj in self._parts.items():
            saved_type = types.get(name) if isinstance(types, Mapping) else None
            if saved_type is not None and saved_type != _kind(obj):
                raise ConfigMismatchError(
                    f"{where}part {name!r} was saved from a {saved_type}, and this TorchState "
                    f"has a {_kind(obj)} there; pass the same kind of object"
                )
        ready = {n: fit(obj, state[n], f"{where}part {n!r}") for n, obj in self._parts.items()}
        _restore_all(self._parts, ready, state["rng"] if self.rng else None, where)
        if self.rng:
            # The uninterrupted run drew nothing from the global generator between this point
            # and the next batch of the epoch in progress; a sampler resumed there checks that.
            restored = torch.get_rng_state()
            for obj in self._parts.values():
                keeper = obj.position_keeper if isinstance(obj, LoaderState) else obj
                if isinstance(keeper, ResumableSampler):
                    keeper._expect_global_rng(restored)


def _restore_all(
    objects: Mapping[str, Any], ready: Mapping[str, Any], rng: Any, where: str
) -> None:
    """Restore every object, or none: a failure puts back what was already restored.

    Objects other than modules are restored first, each after taking its current state (by
    reference: their ``load_state_dict`` replaces state rather than writing into it), so a
    failure can put them back. Modules come last: ``fit`` has checked their keys, shapes and
    dtypes, and they copy into their parameters in place, which could not be undone without
    a copy of the whole model.
    """
    order = sorted(objects, key=lambda n: isinstance(objects[n], torch.nn.Module))
    done: list[tuple[str, Any]] = []
    rng_before = capture_rng() if rng is not None else None
    name = "rng"
    try:
        for name in order:
            obj = objects[name]
            before = None if isinstance(obj, torch.nn.Module) else _current_state(obj)
            restore(obj, ready[name])
            done.append((name, before))
        name = "rng"
        if rng is not None:
            restore_rng(rng)
    except Exception as e:
        changed = []
        for done_name, before in reversed(done):
            if before is None:
                changed.append(done_name)
            else:
                restore(objects[done_name], before)
        if rng_before is not None:
            restore_rng(rng_before)
        outcome = (
            f"modules {sorted(changed)} were already loaded, everything else was put back"
            if changed
            else "nothing was changed"
        )
        raise ConfigMismatchError(
            f"{where}part {name!r} could not be loaded ({type(e).__name__}: {e}); {outcome}"
        ) from e


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


def _kind(obj: Any) -> str:
    """The class that decides what a state means: a wrapped module's, not its wrapper's."""
    if isinstance(obj, LoaderState):
        return "DataLoader"
    return type(_unwrap(obj)[0]).__qualname__


def _own_state(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _current_state(obj: Any) -> Any:
    """The state to put back after a failed load (a loader's, even inside an epoch)."""
    return obj.current() if isinstance(obj, LoaderState) else _own_state(obj)


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
    were numpy arrays when saved; tensors saved once for several keys (tied weights) come back
    as one tensor. Any part of a loaded tree converts on its own (``store.load()["model"]``),
    as long as it holds every key of each tied tensor it holds.

    CPU tensors share the memory of the loaded arrays (nothing is copied), which suits
    ``model.load_state_dict``: it copies them into the parameters. An object that keeps the
    tensors it loads (an optimizer) then keeps views into the checkpoint's file buffer, at
    arbitrary alignment; :func:`load_state` and :class:`TorchState` give such objects fresh
    copies instead, as a bit-exact resume needs.

    Args:
        tree: the tree, e.g. from :meth:`ckptkit.CheckpointStore.load`, or a part of it.
        map_location: the device to make tensors on (None: the CPU).

    Raises:
        CorruptCheckpointError: a ``{"$torch": ...}`` marker is malformed.
        TiedTensorError: a tensor of ``tree`` is tied to one whose bytes were saved under a key
            outside ``tree``: convert the whole tree, or a part that holds both keys.

    Example:
        >>> model.load_state_dict(tree_to_state(store.load()["model"]))
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
        kept = not isinstance(state, torch.nn.Module)  # a module copies into its parameters
        converted = FromTree(device, where, own=lambda path: kept).convert(loaded.state)
        restore(state, fit(state, converted, where))
    return loaded.record


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
    kind = _kind(module)
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
