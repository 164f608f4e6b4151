"""JaxState and the pytree-level conversions: containers of pytrees, NNX objects and RNG.

The conversion of one pytree is in ``_jax_tree``, what can hold one in ``_jax_parts``; this
module checks the whole checkpoint against every part before changing any, then replaces the
parts' contents and restores the generators.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from ckptkit._errors import ConfigMismatchError
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore, StepSelector

from ._jax_parts import (
    apply,
    capture_rng,
    check_container,
    check_rng,
    check_sharding,
    is_nnx,
    restore_rng,
    targets,
    template,
)
from ._jax_tree import read_part, rebuild, to_part


class JaxState:
    """The training state of a JAX run, as one object for :class:`ckptkit.Checkpointer`.

    JAX arrays are immutable, so give it, by name, the mutable containers your loop keeps its
    pytrees in: a dict (or list) whose entries the loop replaces each step, such as
    ``train = {"params": params, "opt_state": opt_state, "key": key, "step": 0}``; or Flax
    NNX objects (``nnx.Module``, ``nnx.Optimizer``). Anything in them that is a pytree of
    ``jax.Array`` (typed keys from ``jax.random.key`` and raw ``PRNGKey`` arrays included),
    numpy arrays and scalars, and Python ``bool``/``int``/``float``/``str`` is saved: Optax
    states (NamedTuples, ``EmptyState``), Flax params, ``nnx.State``, registered pytree nodes.

    A load takes the structure from what the containers hold now (the same model and
    optimizer, built as the saved run built them) and fills in the saved leaves, matched by
    key path: nothing on disk names a class, so loading never runs code. If a saved path,
    shape or dtype differs, or a path is missing on either side, it raises listing them, and
    nothing is changed. Then it replaces each container's entries (``box["params"]`` is a new
    pytree; keep reading it from the box) and ``nnx.update``\\ s each NNX object.

    Restored jax arrays go to ``sharding`` where given, else to the sharding of the array
    they replace (the default device where that was not a jax array). Weak types are kept.
    With ``rng=True`` it also holds Python's ``random`` and NumPy's global generators (JAX has
    no global generator: its keys are state like any other).

    Args:
        rng: capture and restore Python's and NumPy's global generators (the part ``"rng"``).
        sharding: where restored jax arrays go: a ``jax.sharding.Sharding`` or ``jax.Device``
            for all of them, or a pytree prefix of the parts, ``{name: ...}``, with a
            Sharding, Device or None (where the replaced leaf is) at each of its leaves.
        **parts: the containers and NNX objects, by the names their pytrees have in the tree.

    Raises:
        TypeError: a part is not a dict, list or NNX object, or ``sharding`` has a leaf that
            is not a Sharding, Device or None.
        ValueError: nothing to hold (no parts and ``rng=False``).

    Example:
        >>> train = {"params": params, "opt_state": tx.init(params), "key": jax.random.key(0)}
        >>> ckpt = Checkpointer(store, StoppingPolicy(monitor="val_loss"), JaxState(train=train))
        >>> start = ckpt.resume()  # train["params"] etc. are the saved ones now
    """

    def __init__(self, *, rng: bool = True, sharding: Any = None, **parts: Any) -> None:
        for name, obj in parts.items():
            check_container(name, obj)
        if not parts and not rng:
            raise ValueError("JaxState() holds nothing: pass containers by name, or rng=True")
        check_sharding(sharding)
        self.parts = dict(parts)
        self.rng = bool(rng)
        self.sharding = sharding

    def __repr__(self) -> str:
        parts = [f"{n}={type(o).__name__}" for n, o in self.parts.items()]
        return f"JaxState({', '.join([*parts, f'rng={self.rng}'])})"

    def state_dict(self) -> dict[str, Any]:
        """Every part's pytree (and with ``rng`` the generators'), as one core tree."""
        tree: dict[str, Any] = {
            name: to_part(template(obj), f"JaxState part {name!r}: ")
            for name, obj in self.parts.items()
        }
        if self.rng:
            tree["rng"] = capture_rng()
        return tree

    def load_state_dict(self, tree: Any, /) -> None:
        """Restore every part (and the generators) from a tree made by :meth:`state_dict`.

        Raises:
            ConfigMismatchError: the tree's parts differ from this state's names, or a part's
                paths, shapes or dtypes differ from what it holds now (listed). Nothing is
                changed then.
            CorruptCheckpointError: the tree is malformed.
        """
        self._load(tree, self.sharding, "")

    def _load(self, tree: Any, sharding: Any, where: str) -> None:
        if not isinstance(tree, Mapping):
            raise ConfigMismatchError(
                f"{where}a JaxState loads a dict of parts, not a {type(tree).__name__}"
            )
        names = set(self.parts) | ({"rng"} if self.rng else set())
        missing, unexpected = sorted(names - set(tree)), sorted(set(tree) - names)
        if missing or unexpected:
            raise ConfigMismatchError(
                f"{where}the saved parts do not match this JaxState: missing {missing}, "
                f"unexpected {unexpected}; pass the same names (and rng=...) as when it was saved"
            )
        templates = {name: template(obj) for name, obj in self.parts.items()}
        per_part = targets(sharding, templates, "the JaxState's parts")
        restored, start = {}, 0
        for name, current in templates.items():
            count = len(jax.tree_util.tree_leaves(current))
            restored[name] = rebuild(
                tree[name], current, per_part[start : start + count], f"{where}part {name!r}: "
            )
            start += count
        if self.rng:
            check_rng(tree["rng"])
        # Everything is checked and made: from here on nothing raises on a well-formed tree.
        for name, obj in self.parts.items():
            apply(obj, restored[name])
        if self.rng:
            restore_rng(tree["rng"])


def state_to_tree(obj: Any) -> Any:
    """Convert a JaxState, an NNX object or any pytree to the core's tree.

    A pytree becomes ``{"leaves": {path: value}, "kinds": {path: kind}}``, its leaves keyed
    by ``jax.tree_util.keystr`` paths (``['opt_state'][0].mu['w']``): jax arrays as numpy
    arrays (typed keys as their ``key_data``, the implementation in ``kinds``), Python
    scalars as JSON. The file reads without JAX.

    Raises:
        UnsupportedStateError: a leaf is not an array or scalar (the message has its path).

    Example:
        >>> tree = state_to_tree({"w": jnp.zeros(2)})
        >>> tree["leaves"]["['w']"]
        array([0., 0.], dtype=float32)
    """
    if isinstance(obj, JaxState):
        return obj.state_dict()
    return to_part(template(obj) if is_nnx(obj) else obj, "")


def tree_to_state(tree: Any, *, like: Any = None, sharding: Any = None) -> Any:
    """Convert a pytree's tree made by :func:`state_to_tree` back to jax values.

    Args:
        tree: one pytree's tree, e.g. ``store.load()["train"]``.
        like: a pytree of the saved structure (the arrays it holds now, or
            ``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``): the result has its
            structure. None: a flat dict from each leaf's key path to its value.
        sharding: where jax arrays go (as :class:`JaxState`'s, a prefix of ``like``).

    Raises:
        ConfigMismatchError: the saved paths, shapes or dtypes differ from ``like``'s.
        CorruptCheckpointError: ``tree`` is not such a tree.

    Example:
        >>> params = tree_to_state(store.load()["train"], like=train)["params"]
    """
    if like is None:
        saved, kinds = read_part(tree, "tree_to_state")
        from ._jax_tree import make_leaf

        return {
            path: make_leaf(value, kinds[path], sharding, path) for path, value in saved.items()
        }
    check_sharding(sharding)
    return rebuild(tree, like, targets(sharding, like, "like"), "tree_to_state: ")


def save_state(
    store: CheckpointStore,
    step: int,
    state: Any,
    *,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Save a JaxState, an NNX object or a pytree container as ``step``.

    Example:
        >>> save_state(store, 3, JaxState(train=train), metrics={"loss": 0.1})
    """
    return store.save(step, state_to_tree(state), metrics, metadata)


def load_state(
    store: CheckpointStore,
    state: Any,
    step: StepSelector = None,
    *,
    sharding: Any = None,
) -> CheckpointRecord:
    """Load checkpoint ``step`` (None: the latest; ``"best"``) into ``state``, in place.

    ``state`` is a :class:`JaxState`, or a container or NNX object saved alone by
    :func:`save_state`.

    Args:
        sharding: overrides the JaxState's; see :class:`JaxState`.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: from the store.
        ConfigMismatchError: the checkpoint does not fit ``state`` (nothing is changed).

    Example:
        >>> record = load_state(store, JaxState(train=train), "best")
    """
    loaded = store.load_checkpoint(step)
    where = f"{store.root}, step {loaded.record.step}: "
    if isinstance(state, JaxState):
        state._load(loaded.state, sharding if sharding is not None else state.sharding, where)
    else:
        check_container("state", state)
        check_sharding(sharding)
        current = template(state)
        restored = rebuild(loaded.state, current, targets(sharding, current, "state"), where)
        apply(state, restored)
    return loaded.record
