"""Large states: durable saves, cold and warm loads, partial reads, memory, async saves.

Order for one size: build the state; time the saves round by round (the last round's files are
kept as the load fixtures), with ckptkit's save also timed into one store with ``keep_last=1``;
measure each save's memory in a fresh process; time the loads, cold then warm, round by round;
measure each load's memory; time the async saves against a copy into reused buffers and against
the sync ckptkit save. Everything written lives under ``work`` and is deleted before returning.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ckptkit import CheckpointStore
from ckptkit.bench import _memprobe
from ckptkit.bench._asyncsave import run_async
from ckptkit.bench._machine import evict, remove
from ckptkit.bench._methods import (
    KEY_LOADS,
    LOAD_SOURCE,
    LOADS,
    SAVES,
    Method,
    Size,
    build_state,
    key_names,
    nested,
    touch,
)
from ckptkit.bench._report import Row, set_ratios
from ckptkit.bench._timing import Case, Progress, alternate, rounds_text, timed

#: A memory probe that takes longer than this is reported as timed out.
PROBE_TIMEOUT = 600.0
#: ckptkit's save into one store with ``keep_last=1``, reused across the rounds.
KEEP_LAST = "ckptkit save keep_last=1"
#: The rows of a save group, in this order.
SAVE_ORDER = [SAVES[0].name, SAVES[1].name, KEEP_LAST, *(m.name for m in SAVES[2:])]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _unavailable_row(group: str, section: str, size: Size, method: Method, why: str) -> Row:
    return Row(group=group, section=section, size=size.label, method=method.name, status=why)


def run_large(size: Size, work: Path, rounds: int, progress: Progress) -> list[Row]:
    progress(f"{size.label}: building the state, {size.describe()}")
    state = build_state(size)
    fixtures: dict[str, Path] = {}
    try:
        rows = _saves(size, state, work, rounds, progress, fixtures)
        raw, sync = (
            next((r.median for r in rows if r.method == name), None)
            for name in ("raw write+fsync", "ckptkit save")
        )
        rows += _loads(size, state, work, rounds, progress, fixtures)
    finally:
        for path in fixtures.values():
            remove(path)
    rows += run_async(size, state, work, rounds, progress, raw=raw, sync=sync)
    return rows


def _saves(
    size: Size,
    state: dict[str, np.ndarray],
    work: Path,
    rounds: int,
    progress: Progress,
    fixtures: dict[str, Path],
) -> list[Row]:
    group = f"save, {size.describe()}, durable (fsync), {rounds_text(rounds)}"
    rows: list[Row] = []
    cases: dict[str, Case] = {}

    def case(method: Method) -> Case:
        def run(r: int) -> float:
            path = work / f"save-{_slug(method.name)}-{r}"
            seconds = timed(lambda: method.run(state, path))
            if r == rounds - 1:
                fixtures[method.name] = path
            else:
                remove(path)
            return seconds

        return run

    for method in SAVES:
        why = method.unavailable()
        if why is not None:
            rows.append(_unavailable_row(group, "save", size, method, why))
        else:
            cases[method.name] = case(method)
    # Each timed save into this store deletes the step the round before saved: the first,
    # untimed save leaves one there for the first round too.
    root = work / "save-keep-last-1"
    store = CheckpointStore(root, keep_last=1)
    try:
        tree = nested(state)
        store.save(0, tree)

        def keep_last(r: int) -> float:
            seconds = timed(lambda: store.save(r + 1, tree))
            # The deletion of the step before runs on after save returns (the loop goes on
            # meanwhile); it is waited for here, untimed, so it does not slow the next method.
            store.wait()
            return seconds

        cases[KEEP_LAST] = keep_last
        cases = {name: cases[name] for name in SAVE_ORDER if name in cases}
        results = alternate(cases, rounds, progress, f"{size.label} save")
    finally:
        store.close()
        remove(root)
    for name, samples in results.items():
        rows.append(Row(group=group, section="save", size=size.label, method=name, samples=samples))
    for row in rows:
        row.nbytes = size.nbytes
        # The memory probe runs one save in a fresh process, which cannot hold a step saved
        # before to delete: keep_last=1 has no memory figure (its save is ckptkit save's).
        if row.status == "ok" and row.method != KEEP_LAST:
            progress(f"{size.label} save: memory of {row.method} in a fresh process")
            path = work / f"probe-{_slug(row.method)}"
            memory = _memprobe.measure("save", row.method, size, path, PROBE_TIMEOUT)
            remove(path)
            row.extra_bytes, row.note = memory.extra_bytes, memory.note
    set_ratios(rows, "raw write+fsync", "raw")
    rows.sort(key=lambda r: SAVE_ORDER.index(r.method))
    return rows


def _loads(
    size: Size,
    state: dict[str, np.ndarray],
    work: Path,
    rounds: int,
    progress: Progress,
    fixtures: dict[str, Path],
) -> list[Row]:
    warm_group = f"load warm (file in the page cache), {size.describe()}, {rounds_text(rounds)}"
    keys = len(key_names(size))
    keys_warm = f"read {keys} of {size.count} tensors, warm, {size.describe()}"
    warm: dict[str, list[float]] = {}
    cached: dict[str, list[float | None]] = {}
    cases: dict[str, Case] = {}
    unavailable: list[tuple[Method, str]] = []

    # A method that read back the wrong bytes must not look fast: check one value per page.
    expected = {
        "all": touch(list(state.values())),
        "keys": touch([state[name] for name in key_names(size)]),
    }

    def case(method: Method, path: Path) -> Case:
        def run(r: int) -> float:
            cached.setdefault(method.name, []).append(evict(path))
            got: list[float] = []
            cold = timed(lambda: got.append(touch(method.run(path, size))))
            want = expected["all" if method in LOADS else "keys"]
            if not math.isclose(got[0], want, rel_tol=1e-9):
                raise RuntimeError(f"{method.name} read back other values ({got[0]} != {want})")
            warm.setdefault(method.name, []).append(timed(lambda: touch(method.run(path, size))))
            return cold

        return run

    for method in [*LOADS, *KEY_LOADS]:
        why = method.unavailable()
        source = fixtures.get(LOAD_SOURCE[method.name])
        if why is None and source is not None:
            cases[method.name] = case(method, source)
        else:
            unavailable.append((method, why or f"no file: {LOAD_SOURCE[method.name]} did not run"))
    cold = alternate(cases, rounds, progress, f"{size.label} load (cold, then warm)")
    evicted = _eviction_text([f for fs in cached.values() for f in fs])
    cold_group = f"load cold ({evicted}), {size.describe()}, {rounds_text(rounds)}"
    keys_cold = f"read {keys} of {size.count} tensors, cold ({evicted}), {size.describe()}"

    full = {m.name for m in LOADS}
    rows: list[Row] = []
    for method in [*LOADS, *KEY_LOADS]:
        is_full = method.name in full
        nbytes = size.nbytes if is_full else keys * size.tensor_bytes
        for group, section, samples in (
            (cold_group if is_full else keys_cold, "load cold" if is_full else "keys cold", cold),
            (warm_group if is_full else keys_warm, "load warm" if is_full else "keys warm", warm),
        ):
            row = Row(group=group, section=section, size=size.label, method=method.name)
            row.nbytes = nbytes
            why = next((w for m, w in unavailable if m is method), None)
            if why is not None:
                row.status = why
            else:
                row.samples = samples[method.name]
            rows.append(row)
    order = ["load cold", "load warm", "keys cold", "keys warm"]
    rows.sort(key=lambda r: order.index(r.section))  # stable: method order kept in a group
    for row in rows:
        if row.section.endswith("cold") and row.status == "ok":
            row.note = _eviction_note(cached[row.method])
            row.cached_after_evict = _worst(cached[row.method])
            progress(f"{size.label} load: memory of {row.method} in a fresh process")
            path = fixtures[LOAD_SOURCE[row.method]]
            memory = _memprobe.measure("load", row.method, size, path, PROBE_TIMEOUT)
            row.extra_bytes = memory.extra_bytes
            if memory.extra_bytes is not None and row.nbytes:
                row.copies = memory.extra_bytes / row.nbytes
            if memory.note:
                row.note = f"{row.note}; {memory.note}" if row.note else memory.note
    raw_cold, raw_warm = (
        next((r.median for r in rows if r.section == s and r.method == "raw read"), None)
        for s in ("load cold", "load warm")
    )
    if raw_cold and raw_warm and raw_cold < 1.2 * raw_warm:
        for row in rows:
            if row.section == "load cold" and row.method == "raw read":
                hint = (
                    f"cold raw reads took only {raw_cold / raw_warm:.2f}x the warm ones: the "
                    "disk is fast or cached below this machine (e.g. by a VM host), so cold "
                    "loads here are mostly the read path's CPU cost"
                )
                row.note = f"{row.note}; {hint}" if row.note else hint
    for section, reference, label in (
        ("load", "safetensors load_file", "st"),
        ("keys", "safetensors safe_open", "st"),
    ):
        for suffix in (" cold", " warm"):
            members = [r for r in rows if r.section == section + suffix]
            has_ref = any(r.method == reference and r.median for r in members)
            set_ratios(
                members,
                reference if has_ref else "raw read",
                label if has_ref else "raw",
            )
    return rows


def _worst(fractions: list[float | None]) -> float | None:
    """The largest fraction of a file still cached after eviction; None if any is unknown."""
    if any(f is None for f in fractions):
        return None
    return max((f for f in fractions if f is not None), default=0.0)


def _eviction_text(fractions: list[float | None]) -> str:
    worst = _worst(fractions)
    if worst is None:
        return "page cache evicted with fadvise, not checked"
    return f"page cache evicted, at most {worst:.1%} left by mincore"


def _eviction_note(fractions: list[float | None]) -> str | None:
    worst = _worst(fractions)
    if worst is None:
        return "eviction not checked (no mincore here); cold figures may be warm"
    if worst > 0.02:
        return f"eviction incomplete: up to {worst:.0%} of the file stayed cached"
    return None
