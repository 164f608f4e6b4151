"""The Keras how-to guides run here, their Keras blocks included (tests/test_docs.py skips those)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

DOCS = Path(__file__).resolve().parents[3] / "docs"
GUIDES = ["how-to/migrate-keras.md", "how-to/keras-weights-without-ckptkit.md"]


# Keras's HDF5 writer (model.save_weights) calls np.array on TF variables, which NumPy 2
# deprecates; the warning is Keras's, not the guide's.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
@pytest.mark.parametrize("name", GUIDES)
def test_keras_guide_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of the guide runs, Keras ones included, in order, in a fresh directory."""
    doc = DOCS / name
    blocks = re.findall(r"^```python\n(.*?)^```$", doc.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, f"no python block in {name}"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
