"""The ckptkit logger reports commits, retention deletions, fallbacks and swept leftovers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ckptkit import CheckpointStore, FallbackWarning


def test_saves_and_retention_deletions_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each commit logs its step, directory and size; retention and prune log the steps deleted."""
    caplog.set_level(logging.INFO, logger="ckptkit")
    store = CheckpointStore(tmp_path, keep_last=1)
    record = store.save(0, {"w": np.zeros(4)})
    store.save(1, {"w": np.ones(4)})
    messages = [r.getMessage() for r in caplog.records if r.name == "ckptkit"]
    size = sum(f.size for f in record.files)
    assert any(f"committed step 0 (step_000000000000, {size} bytes)" in m for m in messages)
    assert any(m.endswith("retention deletes steps [0]") for m in messages)

    caplog.clear()
    CheckpointStore(tmp_path, keep_last=1).save(2, {"w": np.ones(4)})
    store = CheckpointStore(tmp_path)
    store.save(3, {"w": np.ones(4)})
    caplog.clear()
    CheckpointStore(tmp_path, keep_last=1).prune()
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == ["prune deletes steps [2]"]


def test_a_fallback_is_logged_as_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Skipping a corrupt checkpoint logs a WARNING that names the step and the file."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(4)})
    record = store.save(1, {"w": np.ones(4)})
    path = tmp_path / record.directory / "arrays.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.warns(FallbackWarning):
        assert store.load(fallback=True)["w"][0] == 0.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "ckptkit"]
    assert len(warnings) == 1
    assert "skipping corrupt step 1" in warnings[0].getMessage()
    assert "arrays.safetensors" in warnings[0].getMessage()


def test_swept_leftovers_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first change to a store logs each temporary and unlisted directory it removes."""
    CheckpointStore(tmp_path).save(0, {"w": np.zeros(4)})
    (tmp_path / ".ckptkit-tmp-0123456789abcdef").mkdir()
    (tmp_path / "step_000000000005").mkdir()
    caplog.set_level(logging.INFO, logger="ckptkit")
    CheckpointStore(tmp_path).prune()
    messages = sorted(r.getMessage().split(": ", 1)[1] for r in caplog.records)
    assert messages == [
        "removing .ckptkit-tmp-0123456789abcdef, left by a save that did not finish",
        "removing step_000000000005, which the manifest does not list",
    ]


def test_nothing_is_logged_above_debug_by_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain load is silent at INFO: logging is for changes to the store, not every read."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(4)})
    caplog.set_level(logging.INFO, logger="ckptkit")
    store.load(0)
    store.verify(0)
    assert caplog.records == []
