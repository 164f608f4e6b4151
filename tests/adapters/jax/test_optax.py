"""Optax optimizers of every family resume bit for bit through a checkpoint."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from ckptkit import CheckpointStore  # noqa: E402
from ckptkit.adapters.jax import JaxState, load_state, save_state  # noqa: E402

from .trees import assert_trees_identical, loss_fn, problem  # noqa: E402


def _optimizers_with_learning_rate() -> dict[str, Callable[[], Any]]:
    """Every top-level optax function taking ``learning_rate`` that builds a transformation."""
    found: dict[str, Callable[[], Any]] = {}
    for name in sorted(dir(optax)):
        fn = getattr(optax, name)
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        params = inspect.signature(fn).parameters
        if "learning_rate" not in params or name == "scale_by_learning_rate":
            continue
        kwargs: dict[str, Any] = {"learning_rate": 1e-2}
        if "key" in params:  # noisy_sgd: its noise key
            kwargs["key"] = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                fn(**kwargs)
        # More arguments needed than a learning rate, or deprecated (its successor is here).
        except (TypeError, DeprecationWarning):
            continue
        found[name] = lambda fn=fn, kwargs=kwargs: fn(**kwargs)
    return found


COMPOSED: dict[str, Callable[[], Any]] = {
    "sgd_momentum_nesterov": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "inject_hyperparams_adam": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "multi_steps_adam": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "masked_adamw": lambda: optax.masked(
        optax.adamw(1e-2), {"w1": True, "b1": False, "w2": True, "b2": False}
    ),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-2), "s": optax.sgd(1e-2)},
        {"w1": "a", "b1": "s", "w2": "a", "b2": "s"},
    ),
    "apply_if_finite_lion": lambda: optax.apply_if_finite(optax.lion(1e-3), 3),
    "schedule_adam": lambda: optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
    "adafactor_factored": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}
OPTIMIZERS = {**_optimizers_with_learning_rate(), **COMPOSED}


def test_the_enumeration_finds_the_optimizer_families() -> None:
    """The introspection finds the well-known optimizers, so the matrix below covers them."""
    assert {"adam", "adamw", "sgd", "lion", "adafactor", "lamb", "lbfgs", "rmsprop"} <= set(
        OPTIMIZERS
    )
    assert len(OPTIMIZERS) >= 30


def _trainer(tx: Any, x: Any, y: Any) -> Callable[[dict[str, Any], int], None]:
    """A function running ``steps`` jitted steps on a box (one compilation per optimizer)."""
    extra = isinstance(tx, optax.GradientTransformationExtraArgs)

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(loss_fn)(params, x, y)
        kwargs = (
            {"value": value, "grad": grads, "value_fn": lambda p: loss_fn(p, x, y)} if extra else {}
        )
        updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), opt_state

    def train(box: dict[str, Any], steps: int) -> None:
        for _ in range(steps):
            box["params"], box["opt_state"] = step(box["params"], box["opt_state"])
            box["step"] += 1

    return train


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_round_trips_and_training_continues_bit_exactly(
    name: str, tmp_path: Path
) -> None:
    """After 3 steps, save, load into a fresh box: same state bits; 2 more steps match 5 straight."""
    tx = OPTIMIZERS[name]()
    params, x, y = problem()

    def fresh() -> dict[str, Any]:
        return {"params": params, "opt_state": tx.init(params), "step": 0}

    train = _trainer(tx, x, y)
    straight = fresh()
    train(straight, 5)

    first = fresh()
    train(first, 3)
    store = CheckpointStore(tmp_path)
    save_state(store, 3, JaxState(train=first, rng=False))

    resumed = fresh()
    load_state(store, JaxState(train=resumed, rng=False))
    assert_trees_identical(resumed, first)
    train(resumed, 2)
    assert_trees_identical(resumed, straight)


def test_jitted_training_resumes_bit_exactly(tmp_path: Path) -> None:
    """A jitted Adam step resumed from a checkpoint gives the uninterrupted run's params."""
    tx = optax.adamw(1e-2)
    params, x, y = problem()

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        grads = jax.grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def run(box: dict[str, Any], n: int) -> None:
        for _ in range(n):
            box["params"], box["opt_state"] = step(box["params"], box["opt_state"])

    straight = {"params": params, "opt_state": tx.init(params)}
    run(straight, 6)
    first = {"params": params, "opt_state": tx.init(params)}
    run(first, 4)
    store = CheckpointStore(tmp_path)
    save_state(store, 4, first)
    resumed = {"params": params, "opt_state": tx.init(params)}
    load_state(store, resumed)
    run(resumed, 2)
    assert_trees_identical(resumed, straight)
    assert float(jnp.abs(resumed["params"]["w1"] - params["w1"]).max()) > 0
