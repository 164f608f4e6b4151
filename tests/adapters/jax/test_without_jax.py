"""A JaxState checkpoint loads in a process where JAX cannot be imported: numpy and JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from ckptkit import CheckpointStore  # noqa: E402
from ckptkit.adapters.jax import JaxState, save_state  # noqa: E402

READER = """
import sys
sys.modules["jax"] = None  # any import of jax now fails
from ckptkit import CheckpointStore
tree = CheckpointStore(sys.argv[1], read_only=True).load(0)
train = tree["train"]
leaves, kinds = train["leaves"], train["kinds"]
print(type(leaves["['params']['w']"]).__module__, leaves["['params']['w']"].dtype)
print(leaves["['key']"].dtype, leaves["['key']"].shape, kinds["['key']"]["impl"])
print(type(leaves["['step']"]).__name__, leaves["['step']"])
print(leaves["['params']['bf']"].dtype)
print("jax" in sys.modules and sys.modules["jax"] is not None)
"""


def test_the_files_load_without_jax(tmp_path: Path) -> None:
    """The core's load in a process without JAX gives numpy arrays (key data as uint32) and JSON."""
    box = {
        "params": {"w": jnp.ones((2, 3)), "bf": jnp.ones(2, jnp.bfloat16)},
        "key": jax.random.key(0),
        "step": 5,
    }
    save_state(CheckpointStore(tmp_path), 0, JaxState(train=box))
    out = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "numpy float32",
        "uint32 (2,) threefry2x32",
        "int 5",
        str(ml_dtypes.bfloat16.dtype if hasattr(ml_dtypes.bfloat16, "dtype") else "bfloat16"),
        "False",
    ]
