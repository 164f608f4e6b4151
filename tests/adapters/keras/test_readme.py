"""The README's Keras example runs here (tests/test_docs.py, in the torch environment, skips it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from tests.test_docs import REPO, SKIP_MARKER  # noqa: E402

README = REPO / "README.md"


def keras_blocks(text: str) -> list[str]:
    """The python blocks right after a skip marker that import keras: the README's Keras ones."""
    blocks = []
    for part in text.split(SKIP_MARKER)[1:]:
        body = part.split("```python\n", 1)[1].split("\n```", 1)[0]
        if "import keras" in body:
            blocks.append(body + "\n")
    return blocks


def test_the_readme_keras_example_trains_resumes_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Keras block runs; run again in the same folder, it resumes instead of restarting."""
    blocks = keras_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "expected one Keras example in the README"
    monkeypatch.chdir(tmp_path)
    first: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(blocks[0], str(README), "exec"), first)
    assert first["callback"].policy.should_stop, "the example's run should stop early"
    records = first["callback"].store.records()
    assert records, "the example saved nothing"
    again: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(blocks[0], str(README), "exec"), again)
    assert again["callback"].initial_epoch == records[-1].step + 1
    assert [r.step for r in again["callback"].store.records()] == [r.step for r in records]
