"""A checkpoint saved on one Keras backend loads on another: TensorFlow, JAX and PyTorch, each way.

Needs the three backends in one environment (the Keras TensorFlow one installs JAX and
PyTorch too): each save and each load is a process of its own, with its KERAS_BACKEND.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.multi_backend

WORKER = str(Path(__file__).parent / "workers" / "cross_worker.py")
BACKENDS = ["tensorflow", "jax", "torch"]


def _run(root: Path, backend: str, phase: str) -> list[dict[str, Any]]:
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, WORKER, str(root), phase],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_weights_and_optimizer_saved_on_each_backend_load_on_every_other(tmp_path: Path) -> None:
    """Model weights load bit for bit, the optimizer loads with rng=False, and the RNG part is refused naming the backend."""
    with ThreadPoolExecutor(2) as pool:
        saved = {
            b: r
            for b, r in zip(
                BACKENDS, pool.map(lambda b: _run(tmp_path, b, "save"), BACKENDS), strict=True
            )
        }
        loads = [
            row for rows in pool.map(lambda b: _run(tmp_path, b, "load"), BACKENDS) for row in rows
        ]
    seed_dtypes = {
        b: rows[0]["dtypes"]["model"]["0006:seed_generator/seed_generator_state"]
        for b, rows in saved.items()
    }
    assert seed_dtypes == {"tensorflow": "int64", "jax": "uint32", "torch": "int32"}
    iteration = {
        b: rows[0]["dtypes"]["optimizer"]["0000:adam/iteration"] for b, rows in saved.items()
    }
    assert iteration == {"tensorflow": "int64", "jax": "int32", "torch": "int32"}
    assert {b: rows[0]["rng"] for b, rows in saved.items()} == {
        "tensorflow": ["keras", "numpy", "python", "tf"],
        "jax": ["keras", "numpy", "python"],
        "torch": ["keras", "numpy", "python", "torch"],
    }
    assert sorted((row["from"], row["to"]) for row in loads) == sorted(
        (a, b) for a in BACKENDS for b in BACKENDS if a != b
    )
    for row in loads:
        where = f"{row['from']} -> {row['to']}"
        assert row["weights_bitwise"], where
        assert row["optimizer"] == "loaded", where
        assert row["full"].startswith("ConfigMismatchError: "), where
        assert (
            f"part 'rng': the random generators were saved on Keras' {row['from']!r} backend, "
            f"and this Keras runs on {row['to']!r}"
        ) in row["full"], where
        assert math.isfinite(row["loss"]), where
