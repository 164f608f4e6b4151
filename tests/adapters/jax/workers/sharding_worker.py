"""Save and load sharded arrays over 4 forced host devices; run by test_sharding.py.

Usage: ``python sharding_worker.py ROOT`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
Prints ``ok`` when every check passed (an assertion error otherwise).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ckptkit import CheckpointStore
from ckptkit.adapters.jax import JaxState, load_state, save_state

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
rows = NamedSharding(mesh, P("data", None))
cols = NamedSharding(mesh, P("model"))  # for the 1-d bias
both = NamedSharding(mesh, P("data", "model"))
replicated = NamedSharding(mesh, P())
store = CheckpointStore(sys.argv[1])

w = jax.device_put(jnp.arange(32.0).reshape(8, 4), both)
keys = jax.device_put(jax.random.split(jax.random.key(0), 4), NamedSharding(mesh, P("data")))
save_state(store, 0, JaxState(train={"w": w, "b": jax.device_put(jnp.ones(4), cols), "keys": keys}))


def blank() -> dict[str, jax.Array]:
    return {
        "w": jax.device_put(jnp.zeros((8, 4)), both),
        "b": jax.device_put(jnp.zeros(4), cols),
        "keys": jax.device_put(
            jax.random.split(jax.random.key(9), 4), NamedSharding(mesh, P("data"))
        ),
    }


# By default each leaf goes where the one it replaces is.
box = blank()
load_state(store, JaxState(train=box))
assert box["w"].sharding == both, box["w"].sharding
assert box["b"].sharding == cols
assert box["keys"].sharding == NamedSharding(mesh, P("data"))
assert np.array_equal(np.asarray(box["w"]), np.asarray(w))
assert np.array_equal(
    np.asarray(jax.random.key_data(box["keys"])), np.asarray(jax.random.key_data(keys))
)
# Each device holds only its shard.
assert {s.data.shape for s in box["w"].addressable_shards} == {(4, 2)}

# One sharding for every leaf.
box = blank()
load_state(store, JaxState(train=box), sharding=replicated)
assert all(leaf.sharding.is_equivalent_to(replicated, leaf.ndim) for leaf in box.values())

# A per-leaf sharding pytree (a prefix of the parts), None: where the leaf is.
box = blank()
state = JaxState(train=box, sharding={"train": {"w": rows, "b": None, "keys": jax.devices()[3]}})
load_state(store, state)
assert box["w"].sharding == rows and {s.data.shape for s in box["w"].addressable_shards} == {(4, 4)}
assert box["b"].sharding == cols
assert box["keys"].devices() == {jax.devices()[3]}
assert np.array_equal(np.asarray(box["w"]), np.asarray(w))

# A sharding that does not fit the shape fails before anything changes.
odd = {"w": jax.device_put(jnp.zeros((8, 4)), both), "b": jnp.zeros(4), "keys": blank()["keys"]}
before = dict(odd)
bad = NamedSharding(Mesh(np.array(jax.devices()[:3]), ("x",)), P("x"))
try:
    load_state(store, JaxState(train=odd, sharding={"train": {"w": None, "b": bad, "keys": None}}))
except ValueError as e:
    assert "['b']" in str(e) and "could not place" in str(e), e
else:
    raise AssertionError("a 4-element array was placed on 3 devices")
assert all(odd[k] is before[k] for k in odd)
print("ok")
