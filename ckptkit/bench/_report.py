"""Rows of results, ckptkit's performance targets, and the text table and JSON (the chart: ``_chart``)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptkit.bench._methods import MiB, human_bytes
from ckptkit.bench._timing import format_seconds


@dataclass(kw_only=True)
class Row:
    """One method in one group (e.g. "save, 1 GiB"); times in seconds."""

    group: str
    section: str
    size: str
    method: str
    status: str = "ok"
    samples: list[float] = field(default_factory=list)
    nbytes: int | None = None
    ratio: float | None = None
    ratio_of_medians: float | None = None
    ratio_to: str | None = None
    extra_bytes: int | None = None
    copies: float | None = None
    #: Cold loads: the largest fraction of the file still in the page cache after eviction.
    cached_after_evict: float | None = None
    target: str | None = None
    verdict: str | None = None
    note: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["median"] = self.median
        doc["min"] = min(self.samples) if self.samples else None
        doc["max"] = max(self.samples) if self.samples else None
        doc["mib_per_s"] = self.throughput()
        return doc

    def throughput(self) -> float | None:
        median = self.median
        if not self.nbytes or not median:
            return None
        return self.nbytes / MiB / median


def set_ratios(rows: list[Row], reference: str, label: str) -> None:
    """Set each row's ratio to the reference row of its group.

    ``ratio`` is the median of the per-round ratios when both ran in the same rounds (paired:
    a slow spell of the shared machine hits both sides of a pair); otherwise, and always in
    ``ratio_of_medians``, the ratio of the medians.
    """
    ref = next((r for r in rows if r.method == reference and r.median), None)
    if ref is None or not ref.median:
        return
    for row in rows:
        median = row.median
        if median is None:
            continue
        row.ratio_of_medians, row.ratio_to = median / ref.median, label
        row.ratio = row.ratio_of_medians
        if len(row.samples) == len(ref.samples) and all(ref.samples):
            paired = [a / b for a, b in zip(row.samples, ref.samples, strict=True)]
            row.ratio = statistics.median(paired)


# -- targets -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Target:
    """A target of one method in one section; ``limit``: the time target as a ratio to the
    reference of the row's ratio (None when the time target is not a ratio)."""

    section: str
    method: str
    text: str
    time_ok: Callable[[Row], bool]
    memory_ok: Callable[[Row], bool | None] = lambda row: None
    limit: float | None = None


def _ratio_target(
    section: str,
    method: str,
    text: str,
    limit: float,
    memory_ok: Callable[[Row], bool | None] = lambda row: None,
) -> Target:
    return Target(
        section=section,
        method=method,
        text=text,
        time_ok=lambda row: row.ratio is not None and row.ratio <= limit,
        memory_ok=memory_ok,
        limit=limit,
    )


def _save_memory(row: Row) -> bool | None:
    return None if row.extra_bytes is None else row.extra_bytes <= 32 * MiB


def _one_copy(row: Row) -> bool | None:
    return None if row.copies is None else row.copies <= 1.1


TARGETS = [
    _ratio_target("save", "ckptkit save", "<=1.05x raw, <=32 MiB", 1.05, _save_memory),
    # The same save into one store reused across the rounds, where each save also deletes the
    # step before it (the deletion runs on after the save returns; the save's time is the call).
    _ratio_target("save", "ckptkit save keep_last=1", "<=1.10x raw", 1.10),
    _ratio_target("load cold", "ckptkit load", "<=1.1x st, <=1 copy", 1.10, _one_copy),
    _ratio_target("small save", "ckptkit save", "<=2x st+commit", 2),
    _ratio_target("async", "ckptkit save_async blocked", "<=1.5x copy", 1.5),
    # From save_async to result(): a background save may cost a little more than the same save
    # made in the loop (the sync "ckptkit save" of the same size), not much more.
    _ratio_target("async", "ckptkit save_async durable", "<=1.2x save", 1.2),
    # The same while the calling thread runs Python code, as a training loop does: the
    # background save must get the GIL back after each system call.
    _ratio_target("async", "ckptkit save_async durable, loop busy", "<=1.2x save", 1.2),
    Target(
        section="observe",
        method="StoppingPolicy.observe",
        text="<20 us",
        time_ok=lambda row: row.median is not None and row.median < 20e-6,
    ),
]


def target_of(row: Row) -> Target | None:
    """The target of the row's method in its section, or None."""
    return next((t for t in TARGETS if (t.section, t.method) == (row.section, row.method)), None)


def judge(rows: list[Row]) -> None:
    """Set ``target`` and ``verdict`` (PASS, or MISS with what missed) on the rows with a target."""
    for row in rows:
        target = target_of(row)
        if target is None:
            continue
        row.target = target.text
        if row.status != "ok":
            row.verdict = row.status
            continue
        missed = [] if target.time_ok(row) else ["time"]
        if target.memory_ok(row) is False:
            missed.append("memory")
        row.verdict = "PASS" if not missed else f"MISS ({', '.join(missed)})"


def explain(rows: list[Row], machine: dict[str, Any]) -> None:
    """Add to each missed target's note the measured facts that bear on why."""
    speed = machine.get("checksum_mib_s")
    for row in rows:
        if not (row.verdict or "").startswith("MISS") or row.median is None:
            continue
        peers = {r.method: r for r in rows if r.group == row.group}
        facts = []
        raw = peers.get("raw write+fsync")
        if row.section == "save" and raw is not None and raw.median and row.nbytes:
            facts.append(f"{format_seconds(row.median - raw.median)} over raw")
            if speed:
                hashing = row.nbytes / MiB / speed
                facts.append(
                    f"hashing ({machine['checksum']}) alone takes {format_seconds(hashing)}"
                )
        plain = peers.get("ckptkit save")
        if row.method == "ckptkit save keep_last=1" and plain is not None and plain.ratio:
            facts.append(f"ckptkit save (no retention): {plain.ratio:.2f}x {plain.ratio_to}")
        if row.section == "load cold":
            for name in ("ckptkit load verify=False", "ckptkit load mmap=True"):
                peer = peers.get(name)
                if peer is not None and peer.ratio is not None:
                    facts.append(f"{name}: {peer.ratio:.2f}x {peer.ratio_to}")
        if facts:
            text = "; ".join(facts)
            row.note = f"{row.note}; {text}" if row.note else text


# -- outputs -------------------------------------------------------------------------------


def _cells(row: Row) -> list[str]:
    if row.status != "ok" or not row.samples:
        return [row.method, row.status, "", "", "", "", row.target or "", row.verdict or ""]
    lo, hi = min(row.samples), max(row.samples)
    rate = row.throughput()
    memory = ""
    if row.extra_bytes is not None:
        memory = f"{row.extra_bytes / MiB:.1f}"
        if row.copies is not None:
            memory += f" ({row.copies:.2f}x)"
    return [
        row.method,
        format_seconds(row.median or 0.0),
        f"{format_seconds(lo)} - {format_seconds(hi)}",
        f"{rate:.0f}" if rate is not None else "",
        f"{row.ratio:.2f}x {row.ratio_to}" if row.ratio is not None else "",
        memory,
        row.target or "",
        row.verdict or "",
    ]


HEADER = ["method", "median", "min - max", "MiB/s", "ratio", "extra MiB", "target", "result"]


def table(rows: list[Row], machine: dict[str, Any]) -> str:
    """The whole report as text: machine facts, then one block per group, then notes."""
    lines = [machine_lines(machine), ""]
    widths = [max(len(HEADER[i]), *(len(_cells(r)[i]) for r in rows)) for i in range(len(HEADER))]
    notes: list[str] = []
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines += [
                "",
                f"== {group}",
                "  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)),
            ]
        cells = _cells(row)
        if row.note:
            where = f"{row.section}, {row.size}" if row.size != "-" else row.section
            notes.append(f"[{len(notes) + 1}] {where}, {row.method}: {row.note}")
            cells[0] += f" [{len(notes)}]"
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join([*lines, "", *LEGEND]) + "\n"


LEGEND = [
    "columns: median and min - max of the seconds per operation over the rounds; MiB/s: bytes",
    "moved / median; ratio: median of the per-round ratios to the group's reference (raw: raw",
    "write+fsync of the same bytes; st: safetensors load_file, or safe_open for partial reads;",
    "copy: np.copyto into reused buffers; save: a sync ckptkit save of the same state, timed in",
    "the same rounds, ratio of the medians; st+commit: safetensors save_file+fsync plus one",
    "atomic manifest commit); extra MiB: peak resident memory above the baseline in a fresh",
    "process (in brackets: copies of the bytes read); target and result: ckptkit's targets.",
]


def machine_lines(m: dict[str, Any]) -> str:
    speed = m.get("checksum_mib_s")
    memory = m.get("memory_total_bytes")
    return "\n".join(
        [
            f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
            f"{human_bytes(memory) if memory else '? '} RAM, {m['kernel']}",
            f"versions: python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
            f"safetensors {m['safetensors']}, ckptkit {m['ckptkit']}, "
            f"matplotlib {m['matplotlib']}",
            f"--dir {m['dir']}: {m['dir_fstype']} mounted at {m['dir_mount']}, "
            f"{human_bytes(m['dir_free_bytes'])} free",
            f"ckptkit checksum: {m['checksum']}, "
            + (f"{speed:.0f} MiB/s on one core" if speed else "speed unknown"),
        ]
    )


def write_json(
    path: Path,
    rows: list[Row],
    machine: dict[str, Any],
    config: dict[str, Any],
    charts: list[str] | None = None,
) -> None:
    """Write the results; ``charts``: the chart files' names, in the same folder."""
    doc = {
        "machine": machine,
        "config": config,
        "charts": charts or [],
        "rows": [r.to_json() for r in rows],
        "targets": [
            {
                "group": r.group,
                "method": r.method,
                "target": r.target,
                "verdict": r.verdict,
                "ratio": r.ratio,
                "extra_bytes": r.extra_bytes,
            }
            for r in rows
            if r.target is not None
        ],
    }
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
