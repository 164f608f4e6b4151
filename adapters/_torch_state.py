"""TorchState and the torch-level conversions: modules, optimizers, schedulers, scalers and RNG.

The conversion of values is in ``_torch_convert``, the checks that a saved state fits its
object in ``_torch_fit``; this module decides what each object's state is, checks the whole
checkpoint before touching any object, restores all or none, and restores the random
generators.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckptkit._errors import ConfigMismatchError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from ._torch_convert import ToTree
from ._torch_convert_read import FromTree
from ._torch_data import ResumableSampler
from ._torch_fit import fit, kind_of, restore
from ._torch_loader import LoaderState, is_plain_loader
from ._torch_rng import capture_rng, restore_rng
from ._torch_sharded import (
    DISTRIBUTED_LAYOUT,
    LAYOUT_KEY,
    Captured,
    capture,
    distributed_parts,
    restore_distributed,
)

_TYPES_KEY = "$types"


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
        return self._tree({name: _own_state(obj) for name, obj in self._parts.items()})

    def _sharded_state(self) -> tuple[dict[str, Any], Captured]:
        """The tree rank 0 saves in a sharded save, and this rank's tensors for DCP.

        Modules and optimizers are in the distributed layout (``_torch_sharded``), with None
        where their tensors are.
        """
        captured = capture(self)
        parts = {
            name: captured.parts[name] if name in captured.parts else _own_state(obj)
            for name, obj in self._parts.items()
        }
        return self._tree(parts, layout=DISTRIBUTED_LAYOUT), captured

    def _tree(self, parts: dict[str, Any], *, layout: str | None = None) -> dict[str, Any]:
        if self.rng:
            parts["rng"] = capture_rng()
        # Each part's class, so a state is never loaded into another kind of object (an Adam
        # state into SGD loads without complaint and fails, or drifts, much later). No keyword
        # argument can start with "$", so this key never collides with a part's name.
        parts[_TYPES_KEY] = {name: kind_of(obj) for name, obj in self._parts.items()}
        if layout is not None:
            parts[LAYOUT_KEY] = layout
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
        self._apply(self._from_tree(tree, map_location, where), where)

    def _from_tree(self, tree: Any, map_location: torch.device | None, where: str) -> Any:
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
        if not isinstance(state, dict):
            raise ConfigMismatchError(f"{where}a TorchState loads a dict of parts")
        return state

    def _apply(self, state: dict[str, Any], where: str) -> None:
        """Check the converted parts against the objects, then restore every object."""
        names = set(self.objects) | ({"rng"} if self.rng else set())
        layout = state.pop(LAYOUT_KEY, None)
        types = state.pop(_TYPES_KEY, {})
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise ConfigMismatchError(
                f"{where}the saved parts do not match this TorchState: missing {missing}, "
                f"unexpected {unexpected}; pass the same names (and rng=...) as when it was saved"
            )
        for name, obj in self._parts.items():
            saved_type = types.get(name) if isinstance(types, Mapping) else None
            if saved_type is not None and saved_type != kind_of(obj):
                raise ConfigMismatchError(
                    f"{where}part {name!r} was saved from a {saved_type}, and this TorchState "
                    f"has a {kind_of(obj)} there; pass the same kind of object"
                )
        if layout not in (None, DISTRIBUTED_LAYOUT):
            raise ConfigMismatchError(
                f"{where}the saved parts have layout {layout!r}, which this ckptkit does not "
                "read; upgrade ckptkit-ml"
            )
        others = dict(self._parts)
        if layout == DISTRIBUTED_LAYOUT:
            # Saved by a sharded save: modules and optimizers by parameter name. The other parts
            # are restored first (all or none), then these through torch's loaders.
            for name in distributed_parts(self._parts):
                del others[name]
        ready = {n: fit(obj, state[n], f"{where}part {n!r}") for n, obj in others.items()}
        _restore_all(others, ready, state["rng"] if self.rng else None, where)
        if layout == DISTRIBUTED_LAYOUT:
            restore_distributed(self._parts, state, where)
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
