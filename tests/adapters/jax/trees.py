"""Helpers of the JAX tests: bitwise pytree equality and a tiny regression problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _bits(leaf: Any) -> tuple[str, str, tuple[int, ...], bytes | Any]:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(leaf))
        return ("key", str(leaf.dtype), leaf.shape, data.tobytes())
    if isinstance(leaf, jax.Array):
        return (
            f"jax weak={leaf.weak_type}",
            str(leaf.dtype),
            leaf.shape,
            np.asarray(leaf).tobytes(),
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        return (type(leaf).__name__, str(leaf.dtype), np.shape(leaf), np.asarray(leaf).tobytes())
    return (type(leaf).__name__, "", (), leaf)


def assert_trees_identical(a: Any, b: Any) -> None:
    """Same structure (classes included), leaf kinds, dtypes, shapes, weak types and bytes."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_leaves(b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        assert _bits(x) == _bits(y), jax.tree_util.keystr(path)


def problem() -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """Initial params of a two-layer MLP and a seeded regression data set."""
    k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
    x = jax.random.normal(k1, (64, 5))
    y = jnp.tanh(x @ jax.random.normal(k2, (5, 1)))
    w1, w2 = jax.random.split(k3)
    params = {
        "w1": jax.random.normal(w1, (5, 8)) * 0.3,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(w2, (8, 1)) * 0.3,
        "b2": jnp.zeros(1),
    }
    return params, x, y


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)
