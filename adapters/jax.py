"""JAX adapter: pytrees of jax arrays (Optax states, Flax params, NNX objects, keys) as one state.

Every pytree converts to ckptkit's framework-free tree (numpy arrays and JSON values, leaves
keyed by their key paths), so checkpoints are safetensors + JSON, loading never runs code, and
the files read without JAX. A load fills the saved leaves into the structure the state holds
now, on the shardings it holds them on.

Example:
    >>> from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
    >>> from ckptkit.adapters.jax import JaxState
    >>> train = {"params": params, "opt_state": tx.init(params), "key": jax.random.key(0)}
    >>> ckpt = Checkpointer(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"),
    ...                     JaxState(train=train))
    >>> start = ckpt.resume()
"""

from __future__ import annotations

try:
    import jax as _jax  # noqa: F401  (imported for the clear error below)
except ImportError as e:  # pragma: no cover - exercised in the core test environment
    raise ImportError(
        "ckptkit.adapters.jax needs JAX, which is not installed: pip install 'ckptkit-ml[jax]'"
    ) from e

from ._jax_state import JaxState, load_state, save_state, state_to_tree, tree_to_state

__all__ = ["JaxState", "load_state", "save_state", "state_to_tree", "tree_to_state"]
