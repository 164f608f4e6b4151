"""``--sharded``: FSDP2 sharded saves and loads, ckptkit against DCP's own file system writer.

A model of ``Linear`` layers holding ``--sharded-size`` of float32 parameters is sharded with
``fully_shard`` over ``--sharded-ranks`` processes (gloo, CPU), each running
``python -m ckptkit.bench._sharded_rank``. Side by side, in an order rotated round by round:

- ``ckptkit sharded save``: ``DistributedCheckpointer(..., sharded=True).save(step)``, every rank
  writing its shards, rank 0 committing the manifest: durable and listed when it returns;
- ``dcp.save FileSystemWriter``: ``torch.distributed.checkpoint.save`` of
  ``get_model_state_dict(model)`` with ``FileSystemWriter(path, sync_files=True)``;
- ``raw write+fsync``: each rank's shard bytes in one file, fsynced: the floor.

Then the loads of the last of those saves, each after evicting the files from the page cache:
``DistributedCheckpointer.resume()``, ``dcp.load`` with ``FileSystemReader`` followed by
``set_model_state_dict``, and the raw files read back. The state is the parameters only
(``TorchState(model=model)``; no optimizer). Each method runs once untimed before the rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptkit.bench import _machine
from ckptkit.bench._methods import GiB, MiB, human_bytes, parse_size
from ckptkit.bench._report import Row, machine_lines, set_ratios, write_json
from ckptkit.bench._timing import format_seconds, rounds_text

#: The methods, in the rank module's order; the reference of each group comes second.
SAVES = ("ckptkit sharded save", "dcp.save FileSystemWriter", "raw write+fsync")
LOADS = ("ckptkit resume", "dcp.load FileSystemReader", "raw read")
HEADROOM = 256 * MiB


def shape(nbytes: int) -> tuple[int, int]:
    """Layers and width of a stack of square ``Linear`` layers holding about ``nbytes``."""
    layers = 16 if nbytes >= 64 * MiB else 4
    width = max(64, int(math.sqrt(nbytes / 4 / layers)) // 64 * 64)
    return layers, width


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(
    spec: dict[str, Any], ranks: int, work: Path, timeout: float, meanwhile: Callable[[], None]
) -> list[dict[str, Any]]:
    """Run every rank to its end; return their results by rank.

    ``meanwhile`` runs while the ranks import torch and build the model; they start measuring
    once it has returned (rank 0 waits for a line on its stdin). Rank 0's progress lines go to
    this process's stderr; the others' output goes to files that an error quotes. Every rank is
    killed on the way out if it still runs.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(ranks),
        "OMP_NUM_THREADS": "1",
    }
    procs, logs = [], []
    for rank in range(ranks):
        out, err = work / f"rank{rank}.out", work / f"rank{rank}.err"
        logs.append((out, err))
        with open(out, "wb") as o, open(err, "wb") as e:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ckptkit.bench._sharded_rank", json.dumps(spec)],
                    env={**env, "RANK": str(rank)},
                    stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                    stdout=o,
                    stderr=None if rank == 0 else e,
                )
            )
    try:
        meanwhile()
        stdin = procs[0].stdin
        assert stdin is not None
        try:
            stdin.write(b"go\n")
            stdin.close()
        except BrokenPipeError:  # rank 0 is gone already: its exit status says why, below
            pass
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"rank {rank} still ran after {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, logs, strict=True)):
        lines = out.read_text().strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = err.read_text(errors="replace").strip()[-2000:] if rank else "(above)"
            raise RuntimeError(f"rank {rank} failed (exit status {proc.returncode}): {tail}")
        results.append(json.loads(lines[-1]))
    return results


def rows_of(results: list[dict[str, Any]], nbytes: int, where: str) -> list[Row]:
    """One row per method: per round, the slowest rank's seconds; memory, the largest rank's."""
    rows = []
    for section, names, reference, label in (
        ("sharded save", SAVES, SAVES[1], "dcp"),
        ("sharded load", LOADS, LOADS[1], "dcp"),
    ):
        group = []
        for name in names:
            per_rank = [r["samples"][name] for r in results]
            group.append(
                Row(
                    group=f"{section}, {where}",
                    section=section,
                    size=human_bytes(nbytes),
                    method=name,
                    samples=[max(s) for s in zip(*per_rank, strict=True)],
                    nbytes=nbytes,
                    extra_bytes=max(r["growth"][name] for r in results),
                )
            )
        set_ratios(group, reference, label)
        rows += group
    return rows


HEADER = ["method", "median", "min - max", "GiB/s", "ratio", "peak MiB", "growth MiB"]


def table(rows: list[Row], results: list[dict[str, Any]]) -> str:
    """The groups as text: peak and growth of resident memory listed rank by rank."""

    def per_rank(field: str, name: str) -> str:
        return " / ".join(f"{r[field][name] / MiB:.0f}" for r in results)

    body = []
    for row in rows:
        lo, hi, median = min(row.samples), max(row.samples), row.median or 0.0
        body.append(
            [
                row.method,
                format_seconds(median),
                f"{format_seconds(lo)} - {format_seconds(hi)}",
                f"{(row.nbytes or 0) / GiB / median:.2f}" if median else "",
                f"{row.ratio:.2f}x {row.ratio_to}" if row.ratio is not None else "",
                per_rank("peak", row.method),
                per_rank("growth", row.method),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    lines: list[str] = []
    group = None
    for row, cells in zip(rows, body, strict=True):
        if row.group != group:
            group = row.group
            head = "  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)).rstrip()
            lines += ["", f"== {group}", head]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    maxrss = ", ".join(f"rank {r['rank']} {r['maxrss'] / MiB:.0f} MiB" for r in results)
    local = ", ".join(
        f"rank {r['rank']} {human_bytes(r['local_bytes'])} ({r['model_rss'] / MiB:.0f} MiB "
        "resident once built)"
        for r in results
    )
    return "\n".join(
        [
            *lines,
            "",
            f"shard bytes per rank: {local}",
            f"peak resident memory of each rank process over the whole run (ru_maxrss): {maxrss}",
            "",
            "columns: median and min - max of the seconds per operation over the rounds, each",
            "round's figure being the slowest rank's (barrier to barrier); GiB/s: model bytes /",
            "median; ratio: median of the per-round ratios to DCP's (FileSystemWriter or",
            "FileSystemReader); peak MiB: each rank's resident memory at its highest during the",
            "operation (rank 0 / rank 1 / ...); growth MiB: that peak above the rank's resident",
            "memory just before the operation: what the operation itself allocated.",
        ]
    )


def run_sharded(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The ``--sharded`` run: check the options, launch the ranks, print and write the table."""
    try:
        size = parse_size(args.sharded_size)
    except ValueError as e:
        print(f"error: --sharded-size: {e}", file=sys.stderr)
        return 2
    ranks, directory = int(args.sharded_ranks), Path(args.dir)
    rounds = int(args.rounds if args.rounds is not None else 1 if args.quick else 5)
    if size.small or ranks < 2 or rounds < 1:
        print(
            "error: --sharded needs a --sharded-size like 1g or 4m, --sharded-ranks of 2 or "
            "more, and --rounds of 1 or more",
            file=sys.stderr,
        )
        return 2
    layers, width = shape(size.nbytes)
    nbytes = layers * (width * width + width) * 4
    if not directory.is_dir():
        print(f"error: --dir {directory} is not an existing directory", file=sys.stderr)
        return 2
    # Two saves of each method sit on disk at once: the last round's and the one before.
    need, free = 6 * nbytes + HEADROOM, shutil.disk_usage(directory).free
    if free < need:
        print(
            f"error: --dir {directory} has {human_bytes(free)} free, but --sharded needs about "
            f"{human_bytes(need)}; pass --dir on a larger disk or a smaller --sharded-size",
            file=sys.stderr,
        )
        return 2
    machine: dict[str, Any] = {}

    def measure_machine() -> None:
        machine.update(_machine.machine_facts(directory))
        print(machine_lines(machine), flush=True)

    where = (
        f"{human_bytes(nbytes)} ({layers} x Linear({width}, {width}) float32 parameters), "
        f"FSDP2 on {ranks} ranks (gloo, CPU), {rounds_text(rounds)}"
    )
    work = Path(tempfile.mkdtemp(prefix="ckptkit-bench-sharded-", dir=directory))
    try:
        (work / "data").mkdir()
        spec = {"dir": str(work / "data"), "layers": layers, "width": width, "rounds": rounds}
        timeout = 300 + 600 * rounds * nbytes / GiB
        results = launch(spec, ranks, work, timeout, measure_machine)
    finally:
        _machine.remove(work)
    rows = rows_of(results, nbytes, where)
    text = table(rows, results)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.txt").write_text(machine_lines(machine) + "\n" + text + "\n")
    config: dict[str, Any] = {
        "sharded": {"size": size.label, "ranks": ranks, "layers": layers, "width": width},
        "rounds": rounds,
        "torch_threads": 1,
        "argv": sys.argv[1:] if argv is None else argv,
        "ranks": [
            {k: r[k] for k in ("rank", "local_bytes", "model_rss", "growth", "peak", "maxrss")}
            for r in results
        ],
    }
    write_json(out / "results.json", rows, machine, config)
    print(f"results: {out / 'results.txt'}, {out / 'results.json'}", flush=True)
    return 0
