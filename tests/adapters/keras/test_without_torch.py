"""Adapter import errors and refusals that depend on what is installed, or on the Keras backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import UnsupportedStateError  # noqa: E402


def test_torch_adapter_without_torch_says_how_to_install() -> None:
    """Importing ckptkit.adapters.torch where torch cannot be imported raises ImportError naming the extra."""
    # torch may be installed (the PyTorch backend's environment): hide it from this process.
    code = "import sys\nsys.modules['torch'] = None\nimport ckptkit.adapters.torch\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "pip install 'ckptkit-ml[torch]'" in out.stderr
    assert "ImportError" in out.stderr


REFUSAL = (
    "TFState is for TensorFlow objects (tf.Module, tf.Variable, tf.random.Generator, tf.data "
    "iterators) on Keras' TensorFlow backend, and this Keras runs on {backend!r}: use "
    "KerasState(model, optimizer) for a Keras model, its optimizer and its "
    "keras.random.SeedGenerators (it works on every backend), or set KERAS_BACKEND=tensorflow "
    "before importing keras"
)


def test_tfstate_off_tensorflow_says_to_use_keras_state() -> None:
    """On JAX or PyTorch the adapter imports, and making a TFState says what to use instead."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        # Keras' NumPy backend needs nothing installed: the refusal, seen from TensorFlow's env.
        code = (
            "from ckptkit import UnsupportedStateError\n"
            "from ckptkit.adapters.keras import TFState\n"
            "try:\n    TFState(rng=True)\nexcept UnsupportedStateError as e:\n    print(e)\n"
        )
        env = dict(os.environ, KERAS_BACKEND="numpy")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == REFUSAL.format(backend="numpy")
        return
    from ckptkit.adapters.keras import KerasState, TFState

    with pytest.raises(UnsupportedStateError) as info:
        TFState(rng=True)
    assert str(info.value) == REFUSAL.format(backend=backend)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert set(KerasState(model).state_dict()) == {"model", "rng"}
