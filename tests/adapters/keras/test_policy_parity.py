"""StoppingPolicy against the real ``keras.callbacks.EarlyStopping``, on thousands of sequences."""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import StoppingPolicy  # noqa: E402 (after the backend is chosen)

SEQUENCES = 10_000
GRID = 8  # values are multiples of 1/8: exact in float32, so Keras's float32 compare is exact


@pytest.fixture(scope="module")
def model() -> Any:
    """A tiny real Keras model for the callback to set ``stop_training`` on."""
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])


def keras_run(model: Any, values: list[float], options: dict[str, Any]) -> dict[str, Any]:
    """Drive EarlyStopping epoch by epoch, as ``fit`` does, until it sets ``stop_training``."""
    callback = keras.callbacks.EarlyStopping(monitor="val_loss", **options)
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    stop = None
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": value})
        if model.stop_training:
            stop = epoch
            assert callback.stopped_epoch == epoch
            break
    counted = callback.best is not None
    return {
        "stop": stop,
        "best_step": callback.best_epoch if counted else None,
        "best": callback.best,
    }


def policy_run(values: list[float], options: dict[str, Any]) -> dict[str, Any]:
    """The same sequence through StoppingPolicy, ``start_from_epoch`` given as ``warmup``."""
    options = dict(options)
    options["warmup"] = options.pop("start_from_epoch")
    policy = StoppingPolicy(monitor="val_loss", **options)
    for value in values:
        if policy.observe(value).should_stop:
            break
    return {"stop": policy.stop_step, "best_step": policy.best_step, "best": policy.best}


def generate(rng: np.random.Generator) -> tuple[list[float], dict[str, Any]]:
    """One sequence on the 1/8 grid (noise or a random walk) and one set of Keras options."""
    length = int(rng.integers(1, 26))
    if rng.random() < 0.5:
        ticks = rng.integers(-16, 17, size=length)
    else:
        ticks = np.cumsum(rng.integers(-3, 4, size=length)) + int(rng.integers(-8, 9))
    values = [float(t) / GRID for t in ticks]
    options = {
        "mode": str(rng.choice(["min", "max", "auto"])),
        "patience": int(rng.integers(0, 6)),
        "min_delta": float(rng.choice([0.0, 0.0, 0.125, 0.25, 0.5])),
        "baseline": None if rng.random() < 0.5 else float(rng.integers(-16, 17)) / GRID,
        "start_from_epoch": int(rng.integers(0, 4)),
    }
    return values, options


def test_stop_and_best_epochs_match_keras(model: Any) -> None:
    """Over thousands of grid sequences, stop epoch, best epoch and best equal Keras's."""
    rng = np.random.default_rng(20240611)
    seen: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    for _ in range(SEQUENCES):
        values, options = generate(rng)
        expected = keras_run(model, values, options)
        got = policy_run(values, options)
        assert got == expected, f"values={values} options={options}"
        seen["stopped" if got["stop"] is not None else "ran out"] += 1
        seen[f"mode={options['mode']}"] += 1
        seen["baseline" if options["baseline"] is not None else "no baseline"] += 1
        seen["min_delta>0" if options["min_delta"] else "min_delta=0"] += 1
        seen["warmup" if options["start_from_epoch"] else "no warmup"] += 1
    elapsed = time.perf_counter() - started
    print(f"\n{SEQUENCES} sequences agree with keras {keras.__version__} in {elapsed:.1f}s: {seen}")
    # The sample must exercise every branch it claims to compare.
    assert min(seen.values()) >= SEQUENCES // 10
    assert len(seen) == 11


def test_float32_boundary_is_the_documented_difference(model: Any) -> None:
    """Within float32 rounding Keras sees no change where ckptkit (float64) sees an improvement."""
    values = [1.0, 1.0 - 1e-9, 2.0]
    options = {"mode": "min", "patience": 1, "min_delta": 0.0, "baseline": None}
    keras_result = keras_run(model, values, {**options, "start_from_epoch": 0})
    policy_result = policy_run(values, {**options, "start_from_epoch": 0})
    assert keras_result["stop"] == 1 and keras_result["best_step"] == 0
    assert policy_result["stop"] == 2 and policy_result["best_step"] == 1
