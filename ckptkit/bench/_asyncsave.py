"""Async saves: how long ``save_async`` blocks the training loop, and when the save is durable.

The reference is the least a snapshot can block: one ``np.copyto`` of every array into buffers
allocated once and reused, as ``save_async`` is specified to do. When the store has no
``save_async`` yet, its rows say "not available" and the copy is still measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit import CheckpointStore
from ckptkit.bench._machine import remove
from ckptkit.bench._methods import Size, nested, store_supports
from ckptkit.bench._report import Row, set_ratios
from ckptkit.bench._timing import Case, Progress, alternate, format_seconds, rounds_text


def run_async(
    size: Size,
    state: dict[str, np.ndarray],
    work: Path,
    rounds: int,
    progress: Progress,
    raw: float | None,
) -> list[Row]:
    group = (
        f"async save, {size.describe()}: time the training loop is blocked, {rounds_text(rounds)}"
    )
    arrays = list(state.values())
    buffers = [np.empty_like(a) for a in arrays]
    for b in buffers:
        b.fill(0)  # fault the pages in once, as reused buffers are

    def copy(r: int) -> float:
        start = time.perf_counter()
        for b, a in zip(buffers, arrays, strict=True):
            np.copyto(b, a)
        return time.perf_counter() - start

    cases: dict[str, Case] = {"copy into reused buffers": copy}
    rows = [
        Row(group=group, section="async", size=size.label, method="copy into reused buffers"),
        Row(group=group, section="async", size=size.label, method="ckptkit save_async blocked"),
        Row(group=group, section="async", size=size.label, method="ckptkit save_async durable"),
    ]
    if not store_supports("save_async"):
        rows[1].status = rows[2].status = "not available"
        rows[0].samples = alternate(cases, rounds, progress, f"{size.label} async")[rows[0].method]
        set_ratios(rows, "copy into reused buffers", "copy")
        return rows
    root = work / "async"
    # Typed Any: save_async is looked up only once store_supports has found it. No retention,
    # so "durable" is the save alone, as in the save table (no deletion of an older step).
    store: Any = CheckpointStore(root)
    tree = nested(state)
    durable: list[float] = []

    def save(r: int) -> float:
        start = time.perf_counter()
        pending = store.save_async(r + 1, tree)
        blocked = time.perf_counter() - start
        pending.result()
        durable.append(time.perf_counter() - start)
        return blocked

    try:
        start = time.perf_counter()
        first = store.save_async(0, tree)
        first_blocked = time.perf_counter() - start
        first.result()
        progress(
            f"{size.label} async: first save_async (allocates) {format_seconds(first_blocked)}"
        )
        cases["ckptkit save_async blocked"] = save
        results = alternate(cases, rounds, progress, f"{size.label} async")
    finally:
        store.close()
        remove(root)
    rows[0].samples = results["copy into reused buffers"]
    rows[1].samples = results["ckptkit save_async blocked"]
    first_text = format_seconds(first_blocked)
    rows[1].note = f"the first call, which allocates the buffers, blocked {first_text}"
    rows[2].samples = durable
    for row in rows:
        row.nbytes = size.nbytes
    set_ratios(rows[:2], "copy into reused buffers", "copy")
    if raw:
        rows[2].ratio = rows[2].ratio_of_medians = (rows[2].median or 0.0) / raw
        rows[2].ratio_to = "raw"
    return rows
