"""Async saves: how long ``save_async`` blocks the training loop, and when the save is durable.

The reference for blocking is the least a snapshot can block: one ``np.copyto`` of every array
into buffers allocated once and reused, as ``save_async`` is specified to do. The reference for
"durable" (``save_async`` until ``result()`` returns) is a sync ``ckptkit save`` of the same
state, timed in the same rounds (``SYNC``), so both meet the disk in the same state. PyTorch DCP's ``async_save`` of the same tensors runs beside them, as
a reference (``_dcpasync``). The first call of each is untimed: it allocates what it reuses, or
sets up its staging and executor. When the store has no ``save_async`` yet, or torch is missing,
those rows say why and the others are still measured.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit import CheckpointStore
from ckptkit.bench._dcpasync import DcpAsyncSave, unavailable
from ckptkit.bench._machine import remove
from ckptkit.bench._methods import Size, nested, store_supports
from ckptkit.bench._report import Row, set_ratios
from ckptkit.bench._timing import Case, Progress, alternate, format_seconds, rounds_text

COPY = "copy into reused buffers"
BLOCKED = "ckptkit save_async blocked"
DURABLE = "ckptkit save_async durable"
SYNC = "ckptkit save (sync, same rounds)"
BUSY = "ckptkit save_async durable, loop busy"
DCP_BLOCKED = "DCP async_save blocked"
DCP_DURABLE = "DCP async_save durable"


def run_async(
    size: Size,
    state: dict[str, np.ndarray],
    work: Path,
    rounds: int,
    progress: Progress,
    *,
    raw: float | None,
    sync: float | None,
) -> list[Row]:
    """Time the async rows; ``raw`` and ``sync``: the medians of raw write+fsync and of the
    sync ckptkit save of this size in the save group (None if they did not run); ``sync`` is
    the reference only when this group could not time its own sync save."""
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

    names = [COPY, BLOCKED, SYNC, DURABLE, BUSY, DCP_BLOCKED, DCP_DURABLE]
    rows = {m: Row(group=group, section="async", size=size.label, method=m) for m in names}
    cases: dict[str, Case] = {COPY: copy}
    durable: dict[str, list[float]] = {DURABLE: [], DCP_DURABLE: []}
    spins: list[int] = []
    dcp: DcpAsyncSave | None = None
    dcp_files: list[str] = []
    with contextlib.ExitStack() as stack:
        if store_supports("save_async"):
            root = work / "async"
            stack.callback(remove, root)
            # Typed Any: save_async is looked up only once store_supports has found it. No
            # retention, so "durable" is the save alone, as in the save table's ckptkit save.
            store: Any = CheckpointStore(root)
            stack.callback(store.close)
            tree = nested(state)

            def save(r: int) -> float:
                start = time.perf_counter()
                pending = store.save_async(r + 1, tree)
                blocked = time.perf_counter() - start
                pending.result()
                durable[DURABLE].append(time.perf_counter() - start)
                return blocked

            sync_store = CheckpointStore(work / "async-sync")
            stack.callback(remove, work / "async-sync")

            sync_store.save(0, tree)

            def sync_save(r: int) -> float:
                start = time.perf_counter()
                sync_store.save(r + 1, tree)
                return time.perf_counter() - start

            def busy(r: int) -> float:
                # A training loop's Python work goes on while the save runs in the background.
                start = time.perf_counter()
                pending = store.save_async(rounds + r + 1, tree)
                spins.append(_spin_until(pending.done))
                pending.result()
                return time.perf_counter() - start

            start = time.perf_counter()
            first = store.save_async(0, tree)
            first_blocked = time.perf_counter() - start
            first.result()
            first_text = format_seconds(first_blocked)
            progress(f"{size.label} async: first save_async (allocates) {first_text}")
            rows[
                BLOCKED
            ].note = f"the first call, which allocates the buffers, blocked {first_text}"
            cases[BLOCKED] = save
            cases[SYNC] = sync_save
            cases[BUSY] = busy
        else:
            for name in (BLOCKED, DURABLE, BUSY, SYNC):
                rows[name].status = "not available"
        why = unavailable()
        if why is None:
            dcp = stack.enter_context(DcpAsyncSave(state, work / "dcp-async"))

            def dcp_save(r: int, dcp: DcpAsyncSave = dcp) -> float:
                blocked, seconds, _ = dcp.save()
                durable[DCP_DURABLE].append(seconds)
                return blocked

            blocked, seconds, dcp_files = dcp.save()
            progress(f"{size.label} async: first DCP async_save {format_seconds(blocked)}")
            rows[DCP_BLOCKED].note = (
                f"the first call, which sets up its staging and executor, blocked "
                f"{format_seconds(blocked)} (durable after {format_seconds(seconds)})"
            )
            cases[DCP_BLOCKED] = dcp_save
        else:
            rows[DCP_BLOCKED].status = rows[DCP_DURABLE].status = why
        results = alternate(cases, rounds, progress, f"{size.label} async")
    for name in (COPY, BLOCKED, DCP_BLOCKED, BUSY, SYNC):
        rows[name].samples = results.get(name, [])
    if spins:
        rows[BUSY].note = (
            "the calling thread ran a pure-Python loop until the save was done "
            f"({int(np.median(spins))} iterations of 1000 additions, median)"
        )
    for name in (DURABLE, DCP_DURABLE):
        rows[name].samples = durable[name]
    for row in rows.values():
        row.nbytes = size.nbytes
    set_ratios([rows[COPY], rows[BLOCKED], rows[DCP_BLOCKED]], COPY, "copy")
    # The sync save of the same rounds is the reference; the save group's median if it is missing.
    sync = rows[SYNC].median or sync
    for name in (DURABLE, BUSY, DCP_DURABLE, SYNC):
        _durable_ratios(rows[name], raw=raw, sync=sync)
    if dcp is not None and rows[DCP_DURABLE].samples:
        fsync = format_seconds(float(np.median(dcp.dir_fsyncs[1:] or dcp.dir_fsyncs)))
        fact = (
            f"writes {' and '.join(dcp_files)}, fsyncs each file (sync_files=True) but not the "
            "directory after renaming .metadata into place: fsyncing the checkpoint's directory "
            f"and its parent afterwards took {fsync} (median), not counted here"
        )
        row = rows[DCP_DURABLE]
        row.note = f"{row.note}; {fact}" if row.note else fact
    return [rows[m] for m in names]


def _spin_until(done: Any) -> int:
    """Run Python code (the GIL held, as a training step's Python work) until ``done()``."""
    spins = 0
    while not done():
        total = 0
        for i in range(1000):
            total += i
        spins += 1
    return spins


def _durable_ratios(row: Row, *, raw: float | None, sync: float | None) -> None:
    """Set the row's ratio to the sync save's median; say its ratio to raw's in the note."""
    median = row.median
    if median is None:
        return
    if sync:
        row.ratio = row.ratio_of_medians = median / sync
        row.ratio_to = "save"
    if raw:
        text = f"{median / raw:.2f}x raw"
        if not sync:
            row.ratio = row.ratio_of_medians = median / raw
            row.ratio_to = "raw"
        else:
            text = f"{text} (raw write+fsync of the same bytes)"
            row.note = f"{row.note}; {text}" if row.note else text
