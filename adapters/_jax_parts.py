"""What a JaxState holds: the user's containers (and NNX objects), and the global generators.

JAX values are immutable, so a state cannot be restored into them; it is restored into what
holds them: a dict or list the training loop updates (``box["params"] = new_params``), whose
entries a load replaces, or a Flax NNX object (``nnx.Module``, ``nnx.Optimizer``), which
``nnx.update`` restores in place.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

import jax
import numpy as np

from ckptkit._errors import CorruptCheckpointError

from ._jax_tree import DEFAULT


def _nnx_module() -> Any:
    """``flax.nnx`` if Flax is imported (an NNX object exists only then), else None."""
    import sys

    if "flax" not in sys.modules:
        return None
    from flax import nnx

    return nnx


def is_nnx(obj: Any) -> bool:
    """Whether ``obj`` is a Flax NNX object (a Module, an Optimizer...), restored by nnx.update."""
    nnx = _nnx_module()
    base = None if nnx is None else getattr(nnx, "Pytree", getattr(nnx, "Object", None))
    return base is not None and isinstance(obj, base)


def check_container(name: str, obj: Any) -> None:
    """Refuse what a load could not update: immutable values and unknown objects.

    Raises:
        TypeError: with what to pass instead.
    """
    if isinstance(obj, (MutableMapping, MutableSequence)) and not isinstance(obj, (str, bytes)):
        return
    if is_nnx(obj):
        return
    raise TypeError(
        f"JaxState({name}=...) is a {type(obj).__name__}, which a load cannot update: JAX "
        "values are immutable, so pass the mutable container your loop keeps them in (a dict "
        f"such as {name}={{'params': params, 'opt_state': opt_state}}, updated each step) or a "
        "Flax NNX Module/Optimizer"
    )


def template(obj: Any) -> Any:
    """The pytree an object holds now: its state to save, and the structure a load fills."""
    if is_nnx(obj):
        nnx = _nnx_module()
        return nnx.state(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    return list(obj)


def apply(obj: Any, restored: Any) -> None:
    """Put a restored pytree (of ``template(obj)``'s structure) into ``obj``."""
    if is_nnx(obj):
        nnx = _nnx_module()
        nnx.update(obj, restored)
    elif isinstance(obj, MutableMapping):
        for key, value in restored.items():
            obj[key] = value
    else:
        obj[:] = restored


def is_sharding_leaf(value: Any) -> bool:
    return value is None or isinstance(value, (jax.sharding.Sharding, jax.Device))


def check_sharding(sharding: Any) -> None:
    """Refuse a ``sharding`` option whose leaves are not Shardings, Devices or None.

    Raises:
        TypeError: naming the first bad leaf's path.
    """
    flat = jax.tree_util.tree_flatten_with_path(sharding, is_leaf=is_sharding_leaf)[0]
    for key_path, leaf in flat:
        if not is_sharding_leaf(leaf):
            raise TypeError(
                f"sharding{jax.tree_util.keystr(key_path)} is a {type(leaf).__name__}; give a "
                "jax.sharding.Sharding, a jax.Device or None (where the leaf is now) at each "
                "place of the sharding pytree"
            )


def targets(sharding: Any, tree: Any, what: str) -> list[Any]:
    """One target per leaf of ``tree``: a Sharding or Device, or DEFAULT.

    ``sharding`` is None (every leaf where the one it replaces is), a Sharding or Device
    (every leaf there), or a pytree prefix of ``tree`` with those at its leaves.

    Raises:
        ValueError: ``sharding`` is not a prefix of ``tree``.
    """
    if sharding is None:
        return [DEFAULT] * len(jax.tree_util.tree_leaves(tree))
    try:
        full = jax.tree_util.tree_map(
            lambda s, sub: jax.tree_util.tree_map(lambda _: DEFAULT if s is None else s, sub),
            sharding,
            tree,
            is_leaf=is_sharding_leaf,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"the sharding pytree does not fit {what}: it must be a Sharding, a Device, or a "
            f"pytree prefix of it (the same containers, with a Sharding, Device or None where "
            f"a whole subtree goes one way); jax says: {e}"
        ) from e
    return list(jax.tree_util.tree_leaves(full))


def capture_rng() -> dict[str, Any]:
    """The states of Python's ``random`` and NumPy's global generator (JAX has none)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(legacy=False)}


def check_rng(saved: Any) -> None:
    """Raise before anything is restored if ``saved`` is not a :func:`capture_rng` state."""
    try:
        state = random.Random()
        state.setstate(saved["python"])
        np.random.RandomState().set_state(saved["numpy"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(f"the saved random-generator state is malformed: {e!r}") from e


def restore_rng(saved: Any) -> None:
    """Set Python's and NumPy's global generators to ``saved`` (checked by :func:`check_rng`)."""
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
