"""Optional progress bars: shown for large saves and loads, never for small ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ckptkit import CheckpointStore
from ckptkit._progress import MIN_BYTES


def test_a_large_save_and_load_show_a_bar_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state of MIN_BYTES or more draws a bar for its save and its load; values are exact."""
    store = CheckpointStore(tmp_path, progress=True)
    big = np.arange(MIN_BYTES // 8 + 1, dtype=np.float64)
    store.save(0, {"w": big})
    saved = capsys.readouterr().err
    assert "saving step 0" in saved and "64.0M" in saved
    loaded = store.load(0)
    assert "loading step 0" in capsys.readouterr().err
    np.testing.assert_array_equal(loaded["w"], big)


def test_small_states_and_mmap_loads_draw_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Below MIN_BYTES, and for a memory-mapped load (nothing is read), no bar appears."""
    store = CheckpointStore(tmp_path, progress=True)
    store.save(0, {"w": np.zeros(1000)})
    store.load(0)
    store.save(1, {"w": np.zeros(MIN_BYTES // 8 + 1)})
    capsys.readouterr()
    store.load(1, mmap=True)
    assert capsys.readouterr().err == ""


def test_progress_without_tqdm_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """progress=True without tqdm fails at once with the pip command, before touching the disk."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"pip install 'ckptkit-ml\[progress\]'"):
        CheckpointStore(tmp_path / "store", progress=True)
    assert not (tmp_path / "store").exists()
