"""Faster thread switching while a save runs; the interpreter's interval comes back after."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import CheckpointStore
from ckptkit._switching import SWITCH_INTERVAL, fast_switching


@pytest.fixture(autouse=True)
def _default_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def test_a_save_runs_with_the_short_interval_and_puts_the_old_one_back(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """While a store writes, the switch interval is the short one; afterwards it is 5 ms again."""
    from ckptkit import _store_save

    seen: list[float] = []
    real = _store_save.write_files

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return real(*args, **kwargs)

    monkeypatch.setattr(_store_save, "write_files", spy)
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(10)})
    store.save_async(1, {"w": np.zeros(10)}).result()
    assert seen == [pytest.approx(SWITCH_INTERVAL)] * 2
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_overlapping_saves_share_one_lowering() -> None:
    """Two saves in flight at once: the interval comes back only when the last one ends."""
    first, second = fast_switching(), fast_switching()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_an_interval_chosen_during_a_save_is_kept() -> None:
    """If the program sets its own interval while a save runs, the save does not undo it."""
    with fast_switching():
        sys.setswitchinterval(0.01)
    assert sys.getswitchinterval() == pytest.approx(0.01)


def test_a_shorter_interval_than_ours_is_left_alone() -> None:
    """A program that already switches faster keeps its own interval during and after saves."""
    sys.setswitchinterval(0.0001)
    with fast_switching():
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    assert sys.getswitchinterval() == pytest.approx(0.0001)
