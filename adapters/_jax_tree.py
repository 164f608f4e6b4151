"""One pytree to and from the core's tree: leaves by key path, the structure from a template.

A pytree is saved as two flat dicts keyed by the same key strings (``jax.tree_util.keystr``,
e.g. ``['opt_state'][0].mu['w']``): ``leaves``, the values (numpy arrays, numpy scalars and
JSON scalars), and ``kinds``, what each value was (``{"kind": "jax"}``, ``{"kind": "numpy"}``,
``{"kind": "python"}``, ``{"kind": "key", "impl": "threefry2x32"}``, with ``"weak": true`` for
a weakly typed jax array). Nothing records the pytree's classes: the structure comes back from
the template the state is loaded into (the pytree the user's container holds now), so no class
is ever looked up by name and loading never runs code. The saved paths, shapes and dtypes must
match the template's, or nothing is restored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ckptkit._errors import ConfigMismatchError, CorruptCheckpointError, UnsupportedStateError

_PYTHON_TYPES = (bool, int, float, str)
#: How many differing paths an error lists before it says how many more there are.
_SHOWN = 8


@dataclass(frozen=True)
class Leaf:
    """What a template leaf needs to be replaced: its path, signature and sharding."""

    path: str
    signature: str
    sharding: Any  # a jax Sharding, or None: the default device


def _is_key(value: Any) -> bool:
    return isinstance(value, jax.Array) and jax.numpy.issubdtype(value.dtype, jax.dtypes.prng_key)


def _signature(shape: tuple[int, ...], dtype: str) -> str:
    return f"{dtype}{list(shape)}"


def _key_impl(key: Any) -> str:
    return str(jax.random.key_impl(key))


def signature_of(value: Any) -> str | None:
    """``float32[2, 3]``, ``key<fry>[]``, ``int``...: what a leaf must match; None if unknown."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        if jax.numpy.issubdtype(value.dtype, jax.dtypes.prng_key):  # typed keys, abstract too
            return _signature(tuple(value.shape), str(value.dtype))
        return _signature(tuple(value.shape), str(np.dtype(value.dtype)))
    if type(value) in _PYTHON_TYPES:
        return type(value).__name__
    return None


def _unsupported(where: str, value: Any) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a JaxState "
        "cannot save: leaves must be jax arrays (typed keys included), numpy arrays and "
        "scalars, or Python bool/int/float/str; register its class as a pytree node "
        "(jax.tree_util.register_dataclass) or keep it outside the state"
    )


def to_part(tree: Any, where: str) -> dict[str, Any]:
    """Convert a pytree to ``{"leaves": {path: value}, "kinds": {path: kind}}``.

    Raises:
        UnsupportedStateError: a leaf is not an array or scalar, or an array spans processes
            (the message names its key path).
    """
    leaves: dict[str, Any] = {}
    kinds: dict[str, Any] = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = jax.tree_util.keystr(key_path)
        here = f"{where}{path}"
        if isinstance(value, jax.Array):
            if not value.is_fully_addressable:
                raise UnsupportedStateError(
                    f"{here} is spread over several processes, which a JaxState does not "
                    "save (each process would hold part of it); gather it to one process first "
                    "(jax.experimental.multihost_utils.process_allgather)"
                )
            if _is_key(value):
                kinds[path] = {"kind": "key", "impl": _key_impl(value)}
                value = jax.random.key_data(value)
            else:
                kinds[path] = {"kind": "jax", **({"weak": True} if value.weak_type else {})}
            leaves[path] = np.asarray(value)
        elif isinstance(value, (np.ndarray, np.generic)):
            kinds[path] = {"kind": "numpy"}
            leaves[path] = value
        elif type(value) in _PYTHON_TYPES:
            kinds[path] = {"kind": "python"}
            leaves[path] = value
        else:
            raise _unsupported(here, value)
    return {"leaves": leaves, "kinds": kinds}


def _saved_signature(value: Any, kind: Mapping[str, Any]) -> str:
    if kind.get("kind") == "key":
        shape = np.shape(value)
        example = jax.random.key(0, impl=str(kind["impl"]))
        # key_data has the impl's key shape as trailing dimensions.
        trailing = np.ndim(jax.random.key_data(example))
        return _signature(tuple(shape[: len(shape) - trailing]), str(example.dtype))
    if kind.get("kind") == "python":
        return type(value).__name__
    return _signature(tuple(np.shape(value)), str(np.asarray(value).dtype))


def read_part(part: Any, where: str) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """The saved leaves and kinds of a part, checked for shape.

    Raises:
        CorruptCheckpointError: the part is not a dict of ``leaves`` and ``kinds`` with the same
            keys, or a kind is unknown.
    """
    if not isinstance(part, Mapping) or set(part) != {"leaves", "kinds"}:
        raise CorruptCheckpointError(
            f"{where}: a saved pytree is a dict of 'leaves' and 'kinds', not "
            f"{type(part).__name__} {sorted(part) if isinstance(part, Mapping) else ''}"
        )
    leaves, kinds = part["leaves"], part["kinds"]
    if not (isinstance(leaves, Mapping) and isinstance(kinds, Mapping)) or list(leaves) != list(
        kinds
    ):
        raise CorruptCheckpointError(f"{where}: the saved leaves and kinds name different paths")
    for path, kind in kinds.items():
        name = kind.get("kind") if isinstance(kind, Mapping) else None
        if name not in ("jax", "numpy", "python", "key") or (
            name == "key" and kind.get("impl") not in _KEY_IMPLS
        ):
            raise CorruptCheckpointError(
                f"{where}{path}: unknown leaf kind {kind!r}; it was saved by a newer ckptkit, "
                "or the checkpoint is damaged"
            )
    return dict(leaves), dict(kinds)


#: The key implementations JAX names (jax.random.key(..., impl=name)).
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def template_leaves(tree: Any, shardings: list[Any], where: str) -> tuple[list[Leaf], Any]:
    """The leaves of the template ``tree`` (with their target shardings) and its treedef.

    ``shardings`` gives one target per leaf: a Sharding/Device, or ``DEFAULT`` for the
    template leaf's own sharding (a jax array's) or the default device.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for (key_path, value), target in zip(flat, shardings, strict=True):
        path = jax.tree_util.keystr(key_path)
        signature = signature_of(value)
        if signature is None:
            raise _unsupported(f"{where}{path} (in the state loaded into)", value)
        if target is DEFAULT:
            # An uncommitted array (made without a device) is restored uncommitted too.
            committed = not isinstance(value, jax.Array) or getattr(value, "committed", True)
            target = getattr(value, "sharding", None) if committed else None
        out.append(Leaf(path, signature, target))
    return out, treedef


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: A leaf of a sharding pytree that means: where the template leaf is (else the default device).
DEFAULT: Any = _Default()


def check(
    saved: dict[str, Any], kinds: dict[str, Mapping[str, Any]], leaves: list[Leaf], where: str
) -> None:
    """Raise if the saved paths, shapes and dtypes differ from the template's; list the paths.

    Raises:
        ConfigMismatchError: with every missing, unexpected and differing path (the first few).
    """
    current = {leaf.path: leaf.signature for leaf in leaves}
    missing = [p for p in current if p not in saved]
    unexpected = [p for p in saved if p not in current]
    differing = [
        f"{p}: saved {_saved_signature(saved[p], kinds[p])}, here {current[p]}"
        for p in current
        if p in saved and _saved_signature(saved[p], kinds[p]) != current[p]
    ]
    if not (missing or unexpected or differing):
        return
    lines = []
    for title, items in (
        ("missing from the checkpoint", missing),
        ("in the checkpoint only", unexpected),
        ("with another shape or dtype", differing),
    ):
        if items:
            more = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            lines.append(f"{title}: {', '.join(items[:_SHOWN])}{more}")
    raise ConfigMismatchError(
        f"{where}the saved pytree does not match the one it is loaded into; "
        + "; ".join(lines)
        + ". Nothing was changed: build the state as the saved run did (same model, optimizer "
        "and container keys) before loading"
    )


def make_leaf(value: Any, kind: Mapping[str, Any], sharding: Any, where: str) -> Any:
    """The restored leaf: a jax array on ``sharding`` (None: the default device), or a copy."""
    name = kind["kind"]
    if name == "python":
        return value
    if name == "numpy":
        # Fresh, writable memory: the loaded array may be a view into the file's buffer.
        return np.array(value, copy=True) if isinstance(value, np.ndarray) else value
    try:
        if name == "key":
            key = jax.random.wrap_key_data(jax.numpy.asarray(value), impl=str(kind["impl"]))
            return key if sharding is None else jax.device_put(key, sharding)
        array: Any = np.asarray(value)
        if kind.get("weak"):
            # No public API makes a weakly typed array; weak types change type promotion (a
            # weak float32 times a bfloat16 array stays bfloat16), so a resumed run needs them.
            from jax._src.lax.lax import _convert_element_type

            array = _convert_element_type(jax.numpy.asarray(array), weak_type=True)
        return jax.device_put(array, sharding)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigMismatchError(
            f"{where}: could not place the saved array on {sharding} ({type(e).__name__}: {e}); "
            "pass a sharding that fits its shape"
        ) from e


def rebuild(part: Any, tree: Any, shardings: list[Any], where: str) -> Any:
    """A pytree of ``tree``'s structure holding the leaves saved in ``part``.

    Raises:
        CorruptCheckpointError: ``part`` is malformed.
        ConfigMismatchError: its paths, shapes or dtypes differ from ``tree``'s (nothing is
            made), or an array does not fit its sharding.
    """
    saved, kinds = read_part(part, where)
    leaves, treedef = template_leaves(tree, shardings, where)
    check(saved, kinds, leaves, where)
    made = [
        make_leaf(saved[leaf.path], kinds[leaf.path], leaf.sharding, f"{where}{leaf.path}")
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, made)
