"""Adapter import errors in the Keras environment (which has no torch)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_torch_adapter_without_torch_says_how_to_install() -> None:
    """Importing ckptkit.adapters.torch without torch raises ImportError naming the extra."""
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed in this environment")
    out = subprocess.run(
        [sys.executable, "-c", "import ckptkit.adapters.torch"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "pip install 'ckptkit-ml[torch]'" in out.stderr
    assert "ImportError" in out.stderr


def test_keras_adapter_on_another_backend_fails_with_a_clear_message() -> None:
    """On a Keras backend other than TensorFlow, importing the adapter says what to set."""
    code = "import keras\nkeras.backend.backend = lambda: 'torch'\nimport ckptkit.adapters.keras\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "supports Keras on the TensorFlow backend only" in out.stderr
    assert "runs on 'torch': set KERAS_BACKEND=tensorflow" in out.stderr
