"""The JAX tutorial runs here, its JAX blocks included (tests/test_docs.py skips those)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

DOCS = Path(__file__).resolve().parents[3] / "docs"
GUIDES = ["tutorials/jax-loop.md"]


@pytest.mark.parametrize("name", GUIDES)
def test_jax_guide_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of the guide runs, JAX ones included, in order, in a fresh directory."""
    doc = DOCS / name
    blocks = re.findall(r"^```python\n(.*?)^```$", doc.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 5, f"python blocks in {name}: {len(blocks)}"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
