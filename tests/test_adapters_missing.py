"""An adapter whose framework is missing says how to install it (this environment has no Keras)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_keras_adapter_without_keras_says_how_to_install() -> None:
    """Importing ckptkit.adapters.keras without Keras raises ImportError naming the extra."""
    if importlib.util.find_spec("keras") is not None:
        pytest.skip("keras is installed in this environment")
    out = subprocess.run(
        [sys.executable, "-c", "import ckptkit.adapters.keras"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "pip install 'ckptkit-ml[keras]'" in out.stderr
    assert "ImportError" in out.stderr


def test_jax_adapter_without_jax_says_how_to_install() -> None:
    """Importing ckptkit.adapters.jax without JAX raises ImportError naming the extra."""
    if importlib.util.find_spec("jax") is not None:
        pytest.skip("jax is installed in this environment")
    out = subprocess.run(
        [sys.executable, "-c", "import ckptkit.adapters.jax"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "pip install 'ckptkit-ml[jax]'" in out.stderr
    assert "ImportError" in out.stderr
