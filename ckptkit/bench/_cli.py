"""``python -m ckptkit.bench``: measure ckptkit against the disk, torch.save and safetensors.

Prints the machine facts, then progress lines on stderr, then the table; writes
``results.txt``, ``results.json`` and, with matplotlib, one chart per group of rows
(``results-<section>-<size>.png``, e.g. ``results-save-100m.png``) into ``--out``.
Everything written under ``--dir`` is deleted at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ckptkit.bench import _machine
from ckptkit.bench._chart import charts
from ckptkit.bench._large import run_large
from ckptkit.bench._methods import MiB, Size, human_bytes, parse_size
from ckptkit.bench._report import (
    Row,
    explain,
    judge,
    machine_lines,
    table,
    write_json,
)
from ckptkit.bench._s3 import run_s3
from ckptkit.bench._sharded import run_sharded
from ckptkit.bench._small import run_observe, run_small
from ckptkit.bench._timing import Progress

#: Copies of a state that sit in --dir at once: the four load fixtures and, while they are
#: saved, the keep_last=1 store's two (its last step and the next, until the save deletes the
#: last); the memory probe's save comes after that store is gone. The async rows run after the
#: fixtures are gone: ckptkit's store keeps one copy per round plus the first, DCP's save one
#: more while it runs.
COPIES_ON_DISK = 6
HEADROOM = 256 * MiB


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ckptkit.bench",
        description=(
            "Time durable saves and cold/warm loads of ckptkit against raw write+fsync, "
            "torch.save and safetensors, side by side and alternating round by round; "
            "peak extra memory per method (fresh process each); small-checkpoint cost; async "
            "save blocking and durability, against DCP's async_save; StoppingPolicy.observe "
            "cost. Writes results.txt, results.json and one chart per group, "
            "results-<section>-<size>.png, into --out."
        ),
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated states: 1g, 100m, small, or any NUMBER[k|m|g] "
        "(default 1g,100m,small; with --quick 4m,small)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per size (default: 5 for states of 512 MiB and up, 7 below; 1 with --quick)",
    )
    p.add_argument(
        "--dir",
        default=tempfile.gettempdir(),
        help="directory on the disk to measure; a scratch folder is made in it and deleted "
        "at the end (default: the system temp directory)",
    )
    p.add_argument(
        "--out", default="bench-results", help="where the results go (default %(default)s)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 round: checks that everything runs"
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="also save and load each large state to moto's S3 server, started on 127.0.0.1, "
        "against boto3's upload_file and download_file (needs the s3 extra and moto[server])",
    )
    p.add_argument(
        "--sharded",
        action="store_true",
        help="instead: FSDP2 sharded saves and loads on CPU ranks (gloo), ckptkit's "
        "DistributedCheckpointer(sharded=True) against torch.distributed.checkpoint's "
        "FileSystemWriter/Reader and raw write+fsync (needs torch)",
    )
    p.add_argument(
        "--sharded-size",
        default="1g",
        help="float32 parameters of the --sharded model (default %(default)s)",
    )
    p.add_argument(
        "--sharded-ranks",
        type=int,
        default=2,
        help="processes the --sharded model is sharded over (default %(default)s)",
    )
    return p


def _rounds(size: Size, args: argparse.Namespace) -> int:
    if args.rounds is not None:
        return int(args.rounds)
    if args.quick:
        return 1
    return 5 if size.nbytes >= 512 * MiB else 7


def _space_needed(sizes: list[Size], args: argparse.Namespace) -> int:
    return max(max(COPIES_ON_DISK, _rounds(s, args) + 2) * s.nbytes for s in sizes) + HEADROOM


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.sharded:
        return run_sharded(args, argv)
    spec = args.sizes or ("4m,small" if args.quick else "1g,100m,small")
    try:
        sizes = [parse_size(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        print(f"error: --sizes: {e}", file=sys.stderr)
        return 2
    if not sizes:
        print("error: --sizes names no state", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"error: --dir {directory} is not an existing directory", file=sys.stderr)
        return 2
    need, free = _space_needed(sizes, args), shutil.disk_usage(directory).free
    if free < need:
        print(
            f"error: --dir {directory} has {human_bytes(free)} free, but sizes {spec} need "
            f"about {human_bytes(need)} (up to max({COPIES_ON_DISK}, rounds + 2) copies of a "
            f"state at once, plus {human_bytes(HEADROOM)}); free some space, pass --dir on a larger disk, or "
            "choose smaller --sizes",
            file=sys.stderr,
        )
        return 2

    try:
        import torch

        torch.set_num_threads(1)  # 2 threads caused random ~200 ms stalls on 2-core machines
    except ImportError:
        pass
    machine = _machine.machine_facts(directory)
    print(machine_lines(machine), flush=True)
    warnings = []
    if machine["dir_fstype"] in ("tmpfs", "ramfs"):
        warnings.append(
            f"--dir is on {machine['dir_fstype']}: fsync costs nothing and nothing can be "
            "evicted, so these figures measure memory, not a disk"
        )
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    progress = Progress()
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="ckptkit-bench-", dir=directory))
    try:
        for size in sizes:
            rounds = _rounds(size, args)
            if size.small:
                rows += run_small(size, work, rounds, 3 if args.quick else 20, progress)
            else:
                rows += run_large(size, work, rounds, progress)
                if args.s3:
                    rows += run_s3(size, work, rounds, progress)
        rows += run_observe(
            max(_rounds(sizes[-1], args), 5), 2000 if args.quick else 20000, progress
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    judge(rows)
    explain(rows, machine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "sizes": [s.label for s in sizes],
        "rounds": {s.label: _rounds(s, args) for s in sizes},
        "quick": bool(args.quick),
        "torch_threads": 1,
        "argv": sys.argv[1:] if argv is None else argv,
        "warnings": warnings,
    }
    drawn, said = charts(out, rows)
    text = table(rows, machine) + "\n" + "\n".join([*(f"warning: {w}" for w in warnings), said])
    (out / "results.txt").write_text(text + "\n")
    write_json(out / "results.json", rows, machine, config, charts=drawn)
    # The machine facts were printed at the top already; print the rest.
    print(text.split("\n", len(machine_lines(machine).splitlines()))[-1])
    print(f"results: {out / 'results.txt'}, {out / 'results.json'}", flush=True)
    return 0
