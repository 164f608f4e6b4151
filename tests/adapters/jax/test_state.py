"""JaxState round trips: keys, dtypes, scalars, None, Flax; mismatches change nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from ckptkit import (  # noqa: E402
    Checkpointer,
    CheckpointStore,
    ConfigMismatchError,
    CorruptCheckpointError,
    StoppingPolicy,
    UnsupportedStateError,
)
from ckptkit.adapters.jax import (  # noqa: E402
    JaxState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

from .trees import assert_trees_identical  # noqa: E402


def _round_trip(box: dict[str, Any], fresh: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, JaxState(box=box, rng=False))
    load_state(store, JaxState(box=fresh, rng=False))
    return fresh


def test_typed_and_raw_keys_round_trip_with_their_implementations(tmp_path: Path) -> None:
    """Typed keys of each implementation come back with it, raw uint32 keys as uint32 arrays."""
    box = {
        "fry": jax.random.key(1),
        "rbg": jax.random.split(jax.random.key(2, impl="rbg"), 3),
        "urbg": jax.random.key(3, impl="unsafe_rbg"),
        "raw": jax.random.PRNGKey(4),
    }
    fresh = {
        "fry": jax.random.key(0),
        "rbg": jax.random.split(jax.random.key(0, impl="rbg"), 3),
        "urbg": jax.random.key(0, impl="unsafe_rbg"),
        "raw": jax.random.PRNGKey(0),
    }
    restored = _round_trip(box, fresh, tmp_path)
    assert_trees_identical(restored, box)
    assert str(jax.random.key_impl(restored["rbg"])) == "rbg"
    # The next draws are the saved run's.
    assert jnp.array_equal(
        jax.random.normal(restored["fry"], (3,)), jax.random.normal(box["fry"], (3,))
    )
    kinds = CheckpointStore(tmp_path / "store").load(0)["box"]["kinds"]
    assert kinds["['urbg']"] == {"kind": "key", "impl": "unsafe_rbg"}
    assert kinds["['raw']"] == {"kind": "jax"}


def test_a_key_of_another_implementation_is_a_mismatch(tmp_path: Path) -> None:
    """Loading a threefry key where an rbg key is now raises, naming the path and both types."""
    store = CheckpointStore(tmp_path)
    save_state(store, 0, {"key": jax.random.key(1)})
    box = {"key": jax.random.key(1, impl="rbg")}
    with pytest.raises(ConfigMismatchError, match=r"\['key'\]: saved key<fry>\[\], here key<rbg>"):
        load_state(store, box)


def test_low_precision_dtypes_round_trip_bit_exactly(tmp_path: Path) -> None:
    """bfloat16, float16 and float8 arrays keep dtype and bits, NaN payloads included."""
    bits = np.array([0x7FC1, 0x3F80, 0x8000, 0x0001], np.uint16)
    box = {
        "bf16": jnp.asarray(bits.view(ml_dtypes.bfloat16)),
        "f16": jnp.arange(4, dtype=jnp.float16) / 3,
        "f8": jnp.asarray(np.arange(4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)),
        "np_bf16": np.ones(2, ml_dtypes.bfloat16),
    }
    fresh = jax.tree.map(lambda a: a * 0, box)
    assert_trees_identical(_round_trip(box, fresh, tmp_path), box)


def test_python_scalars_numpy_values_and_none_keep_their_types(tmp_path: Path) -> None:
    """Python ints/floats/bools/strs stay Python, numpy stays numpy, None stays in place."""
    box = {
        "step": 12,
        "big": 2**70,
        "lr": 0.1,
        "nan": float("nan"),
        "flag": True,
        "name": "run-1",
        "np": np.arange(3, dtype=np.int64),
        "np_scalar": np.float32(2.5),
        "nested": [None, (None, jnp.ones(2)), {"none": None}],
    }
    fresh = {
        "step": 0,
        "big": 0,
        "lr": 0.0,
        "nan": 0.0,
        "flag": False,
        "name": "",
        "np": np.zeros(3, np.int64),
        "np_scalar": np.float32(0),
        "nested": [None, (None, jnp.zeros(2)), {"none": None}],
    }
    restored = _round_trip(box, fresh, tmp_path)
    assert_trees_identical(
        {k: v for k, v in restored.items() if k != "nan"},
        {k: v for k, v in box.items() if k != "nan"},
    )
    assert type(restored["step"]) is int and type(restored["flag"]) is bool
    assert np.isnan(restored["nan"])
    assert isinstance(restored["np"], np.ndarray) and restored["np"].flags.writeable


def test_weak_types_are_kept(tmp_path: Path) -> None:
    """A weakly typed array (jnp.asarray(0.1)) comes back weak, so type promotion is unchanged."""
    box = {"lr": jnp.asarray(0.1), "w": jnp.ones(2, jnp.bfloat16)}
    restored = _round_trip(box, {"lr": jnp.asarray(0.0), "w": jnp.zeros(2, jnp.bfloat16)}, tmp_path)
    assert restored["lr"].weak_type
    assert (restored["lr"] * restored["w"]).dtype == jnp.bfloat16


def test_namedtuples_and_custom_nodes_keep_their_classes(tmp_path: Path) -> None:
    """The restored pytree has the template's classes: NamedTuples, registered dataclasses."""
    import dataclasses
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: Any
        b: Any

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Node:
        x: Any
        y: Any

    box = {"t": Pair(jnp.ones(2), Node(jnp.arange(3), [1, 2.0]))}
    fresh = {"t": Pair(jnp.zeros(2), Node(jnp.zeros(3, jnp.int32), [0, 0.0]))}
    restored = _round_trip(box, fresh, tmp_path)
    assert isinstance(restored["t"], Pair) and isinstance(restored["t"].b, Node)
    assert_trees_identical(restored, box)


@pytest.mark.parametrize(
    ("fresh", "message"),
    [
        (
            {"w": jnp.zeros(3), "b": jnp.zeros(2), "extra": jnp.zeros(1)},
            r"missing from the checkpoint: \['extra'\]",
        ),
        ({"w": jnp.zeros(3)}, r"in the checkpoint only: \['b'\]"),
        ({"w": jnp.zeros(4), "b": jnp.zeros(2)}, r"\['w'\]: saved float32\[3\], here float32\[4\]"),
        (
            {"w": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros(2)},
            r"\['w'\]: saved float32\[3\], here bfloat16\[3\]",
        ),
        ({"w": jnp.zeros(3), "b": None}, r"in the checkpoint only: \['b'\]"),
        ({"w": jnp.zeros(3), "b": 0}, r"\['b'\]: saved float32\[2\], here int"),
    ],
    ids=["extra-leaf", "missing-leaf", "shape", "dtype", "none", "scalar"],
)
def test_a_structure_mismatch_raises_and_changes_nothing(
    fresh: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """A missing or extra leaf, another shape or dtype: a ConfigMismatchError listing the
    paths, and neither part of the state nor the global generators change."""
    store = CheckpointStore(tmp_path)
    save_state(store, 0, JaxState(box={"w": jnp.ones(3), "b": jnp.ones(2)}, other={"k": 1}))
    other = {"k": 0}
    before = dict(fresh)
    random.seed(5)
    python_state = random.getstate()
    with pytest.raises(ConfigMismatchError, match=message) as info:
        load_state(store, JaxState(box=fresh, other=other))
    assert "Nothing was changed" in str(info.value)
    assert fresh.keys() == before.keys()
    assert all(fresh[k] is before[k] for k in fresh)
    assert other == {"k": 0}
    assert random.getstate() == python_state


def test_other_part_names_are_refused(tmp_path: Path) -> None:
    """Loading parts saved under other names raises, listing missing and unexpected names."""
    store = CheckpointStore(tmp_path)
    save_state(store, 0, JaxState(train={"w": jnp.ones(1)}))
    with pytest.raises(ConfigMismatchError, match=r"missing \['model'\], unexpected \['train'\]"):
        load_state(store, JaxState(model={"w": jnp.ones(1)}))


def test_bad_inputs_say_what_where_and_what_to_do() -> None:
    """Immutable parts, unsaveable leaves and bad shardings fail naming the place and the fix."""
    with pytest.raises(
        TypeError, match=r"JaxState\(params=\.\.\.\) is a ArrayImpl.*mutable container"
    ):
        JaxState(params=jnp.ones(2))
    with pytest.raises(TypeError, match=r"is a tuple.*mutable container"):
        JaxState(train=(jnp.ones(2),))
    with pytest.raises(ValueError, match="holds nothing"):
        JaxState(rng=False)
    with pytest.raises(TypeError, match=r"sharding\['train'\] is a str"):
        JaxState(train={}, sharding={"train": "cpu"})
    state = JaxState(train={"fn": len, "ok": jnp.ones(1)})
    with pytest.raises(
        UnsupportedStateError,
        match=r"JaxState part 'train': \['fn'\] is a builtins.builtin_function_or_method",
    ):
        state.state_dict()


def test_rng_true_restores_python_and_numpy_generators(tmp_path: Path) -> None:
    """With rng=True the next Python and NumPy draws after a load are the saved run's."""
    store = CheckpointStore(tmp_path)
    random.seed(1)
    np.random.seed(2)
    save_state(store, 0, JaxState(train={"w": jnp.ones(1)}))
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(8)
    load_state(store, JaxState(train={"w": jnp.zeros(1)}))
    assert (random.random(), np.random.rand()) == expected


def test_flax_nnx_model_and_optimizer_resume_bit_exactly(tmp_path: Path) -> None:
    """An NNX model (Linear, BatchNorm, Dropout with Rngs) and its nnx.Optimizer, saved as
    objects, load into freshly built ones and train on exactly as the uninterrupted run."""
    nnx = pytest.importorskip("flax.nnx")
    optax = pytest.importorskip("optax")

    class Model(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.linear = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.3, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.out(self.drop(nnx.relu(self.bn(self.linear(x)))))

    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.sum(x, axis=1, keepdims=True)

    def build() -> tuple[Any, Any]:
        model = Model(nnx.Rngs(0, dropout=1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model: Any, optimizer: Any) -> None:
        def loss(m: Any) -> Any:
            return jnp.mean((m(x) - y) ** 2)

        optimizer.update(model, nnx.grad(loss)(model))

    straight_model, straight_opt = build()
    for _ in range(5):
        step(straight_model, straight_opt)

    model, optimizer = build()
    for _ in range(3):
        step(model, optimizer)
    store = CheckpointStore(tmp_path)
    save_state(store, 3, JaxState(model=model, optimizer=optimizer))

    model2, optimizer2 = build()
    load_state(store, JaxState(model=model2, optimizer=optimizer2))
    assert_trees_identical(nnx.state(model2), nnx.state(model))
    for _ in range(2):
        step(model2, optimizer2)
    assert_trees_identical(nnx.state(model2), nnx.state(straight_model))
    assert_trees_identical(nnx.state(optimizer2), nnx.state(straight_opt))


def test_flax_nnx_state_in_a_box_round_trips(tmp_path: Path) -> None:
    """An nnx.split state in a dict round trips and nnx.merge gives the same model."""
    nnx = pytest.importorskip("flax.nnx")
    graphdef, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(7)))
    _, blank = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    restored = _round_trip({"state": state}, {"state": blank}, tmp_path)
    assert_trees_identical(restored["state"], state)
    model = nnx.merge(graphdef, restored["state"])
    assert model(jnp.ones((1, 3))).shape == (1, 2)


def test_flax_linen_params_round_trip(tmp_path: Path) -> None:
    """A linen model's variables dict (params and batch_stats) round trips bit exactly."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            x = nn.Dense(8)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(1)(x)

    variables = Net().init(jax.random.key(3), jnp.ones((2, 4)))
    blank = jax.tree.map(jnp.zeros_like, variables)
    restored = _round_trip({"variables": variables}, {"variables": blank}, tmp_path)
    assert_trees_identical(restored["variables"], variables)


def test_tree_to_state_without_a_template_gives_leaves_by_path(tmp_path: Path) -> None:
    """tree_to_state(tree) maps each key path to its restored leaf; like= gives the structure."""
    tree = state_to_tree({"w": jnp.ones(2), "k": jax.random.key(1), "n": 3})
    flat = tree_to_state(tree)
    assert set(flat) == {"['w']", "['k']", "['n']"}
    assert flat["['n']"] == 3 and flat["['k']"].dtype == jax.random.key(0).dtype
    like = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "k": jax.random.key(0), "n": 0}
    restored = tree_to_state(tree, like=like)
    assert jnp.array_equal(restored["w"], jnp.ones(2)) and restored["n"] == 3


def test_a_malformed_part_is_a_corrupt_checkpoint() -> None:
    """A part that is not leaves + kinds, or has an unknown kind, raises CorruptCheckpointError."""
    with pytest.raises(CorruptCheckpointError, match="'leaves' and 'kinds'"):
        tree_to_state({"w": np.ones(1)})
    with pytest.raises(CorruptCheckpointError, match="unknown leaf kind"):
        tree_to_state({"leaves": {"['w']": np.ones(1)}, "kinds": {"['w']": {"kind": "pickle"}}})


def test_the_checkpointer_resumes_the_box_and_the_policy(tmp_path: Path) -> None:
    """Checkpointer(store, policy, JaxState(train=box)).resume() refills the box in place."""
    box = {"w": jnp.zeros(2), "step": 0}
    ckpt = Checkpointer(
        CheckpointStore(tmp_path), StoppingPolicy(monitor="loss"), JaxState(train=box)
    )
    assert ckpt.resume() == 0
    for epoch in range(3):
        box["w"] = box["w"] + 1
        box["step"] += 1
        ckpt.step(epoch, {"loss": 1.0 / (epoch + 1)})
    again = {"w": jnp.zeros(2), "step": 0}
    ckpt2 = Checkpointer(
        CheckpointStore(tmp_path), StoppingPolicy(monitor="loss"), JaxState(train=again)
    )
    assert ckpt2.resume() == 3
    assert again["step"] == 3 and jnp.array_equal(again["w"], jnp.full(2, 3.0))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checkpoints"]
