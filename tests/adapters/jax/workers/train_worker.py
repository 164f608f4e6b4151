"""A deterministic Optax training run with early stopping, for the SIGKILL resume tests.

Usage: ``python train_worker.py ROOT``. An MLP trained with AdamW on minibatches whose order
NumPy's global generator shuffles (``rng=True`` saves it) and with noise drawn from a typed
jax key kept in the state; ``Checkpointer(store, StoppingPolicy(patience=3), JaxState(...))``
saves each epoch. Prints ``saved E LOSS`` after each epoch's step (committed), then ``stopped E``
(the epoch the policy stopped at) and ``digest HEX`` (SHA-256 of the final parameters' bytes).
With ``CKPTKIT_KILL_IN_SAVE=K`` the process SIGKILLs itself at its K-th ``os.replace``: inside
the commit of its K-th save, before the manifest lists it.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
from ckptkit.adapters.jax import JaxState

BATCH, BATCHES, EPOCHS = 16, 16, 60


def kill_at_replace(k: int) -> None:
    """Make the k-th ``os.replace`` from now (the k-th save's commit) kill the process instead."""
    calls = 0
    real = os.replace

    def replace(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args, **kwargs)

    os.replace = replace


def main(root: str) -> None:
    # The data and initial parameters come from NumPy: each eager jax op would compile.
    gen = np.random.default_rng(0)
    x = gen.normal(size=(BATCH * BATCHES + 64, 6)).astype(np.float32)
    y = np.tanh(0.5 * x @ gen.normal(size=(6, 1))).astype(np.float32)
    x_val, y_val, x, y = x[-64:], y[-64:], x[:-64], y[:-64]
    params = {
        "w1": jnp.asarray(gen.normal(size=(6, 32)).astype(np.float32) * 0.4),
        "b1": jnp.zeros(32),
        "w2": jnp.asarray(gen.normal(size=(32, 1)).astype(np.float32) * 0.2),
        "b2": jnp.zeros(1),
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-3, weight_decay=1e-3))

    def loss_fn(p: Any, xb: Any, yb: Any) -> Any:
        return jnp.mean((jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - yb) ** 2)

    evaluate = jax.jit(loss_fn)

    @jax.jit
    def step(p: Any, s: Any, key: Any, xb: Any, yb: Any) -> tuple[Any, Any, Any]:
        key, noise = jax.random.split(key)
        xb = xb + 0.05 * jax.random.normal(noise, xb.shape)
        grads = jax.grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, key

    np.random.seed(7)
    random.seed(7)  # unused, but saved with rng=True: the same in every process
    train = {"params": params, "opt_state": tx.init(params), "key": jax.random.key(1)}
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="val_loss")
    policy = StoppingPolicy(monitor="val_loss", patience=3, min_delta=2e-3)
    ckpt = Checkpointer(store, policy, JaxState(train=train))
    start = ckpt.resume()
    if "CKPTKIT_KILL_IN_SAVE" in os.environ:
        kill_at_replace(int(os.environ["CKPTKIT_KILL_IN_SAVE"]))
    print(f"resumed {start}", flush=True)
    for epoch in range(start, EPOCHS):
        if ckpt.should_stop:
            break
        order = np.random.permutation(BATCH * BATCHES)
        for b in range(BATCHES):
            idx = order[b * BATCH : (b + 1) * BATCH]
            train["params"], train["opt_state"], train["key"] = step(
                train["params"], train["opt_state"], train["key"], x[idx], y[idx]
            )
        val_loss = float(evaluate(train["params"], x_val, y_val))
        decision = ckpt.step(epoch, {"val_loss": val_loss})
        print(f"saved {epoch} {val_loss:.5f}", flush=True)
        if decision is not None and decision.should_stop:
            break
    print(f"stopped {policy.stop_step}", flush=True)
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(train["params"]):
        digest.update(np.asarray(leaf).tobytes())
    print(f"digest {digest.hexdigest()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
