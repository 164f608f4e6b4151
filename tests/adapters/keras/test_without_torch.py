"""The torch adapter's message where torch is missing (the Keras environment has no torch)."""

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
