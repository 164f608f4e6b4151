"""Small checkpoints (the per-save fixed cost) and the cost of ``StoppingPolicy.observe``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from ckptkit import CheckpointStore, StoppingPolicy
from ckptkit.bench._machine import fsync_dir, remove
from ckptkit.bench._methods import Size, available, build_state, nested
from ckptkit.bench._report import Row, set_ratios
from ckptkit.bench._timing import Progress, rounds_text

REFERENCE = "safetensors save_file+fsync+commit"


class _Reference:
    """The least a crash-safe small save can cost: the file, fsynced, then one atomic manifest
    commit (temporary file, fsync, ``os.replace``, directory fsync)."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.files: list[dict[str, object]] = []

    def save(self, step: int, state: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        name = f"step_{step:012d}.safetensors"
        path = self.root / name
        save_file(state, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.files.append({"step": step, "file": name, "size": path.stat().st_size})
        data = json.dumps({"checkpoints": self.files}, sort_keys=True).encode()
        tmp = self.root / "manifest.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / "manifest.json")
        fsync_dir(self.root)


def run_small(
    size: Size, work: Path, rounds: int, saves_per_round: int, progress: Progress
) -> list[Row]:
    """Per-save seconds of ckptkit and of the reference, alternating save by save.

    Each round starts a fresh store (and a fresh reference directory) and saves
    ``saves_per_round`` steps into it, so both manifests grow the same way.
    """
    flat = build_state(size)
    tree = nested(flat)
    group = (
        f"small save, {size.describe()}, per save incl. the manifest commit, "
        f"{rounds_text(rounds)} x {saves_per_round} saves"
    )
    methods = ["ckptkit save", REFERENCE]
    rows = {m: Row(group=group, section="small save", size=size.label, method=m) for m in methods}
    missing = available("safetensors")
    if missing is not None:
        rows[REFERENCE].status = missing
        methods.remove(REFERENCE)
    for r in range(rounds):
        store = CheckpointStore(work / f"small-ckptkit-{r}")
        reference = _Reference(work / f"small-reference-{r}")
        run: dict[str, Callable[[int], object]] = {
            "ckptkit save": partial(store.save, state=tree),
            REFERENCE: partial(reference.save, state=flat),
        }
        for i in range(saves_per_round):
            order = methods if (r * saves_per_round + i) % 2 == 0 else methods[::-1]
            for method in order:
                start = time.perf_counter()
                run[method](i)
                rows[method].samples.append(time.perf_counter() - start)
        remove(Path(store.root))
        remove(reference.root)
        medians = ", ".join(
            f"{m} {1e3 * float(np.median(rows[m].samples[-saves_per_round:])):.1f} ms"
            for m in methods
        )
        progress(f"small save round {r + 1}/{rounds}: {medians}")
    result = list(rows.values())
    for row in result:
        row.nbytes = size.nbytes
    set_ratios(result, REFERENCE, "st+commit")
    return result


def run_observe(rounds: int, calls: int, progress: Progress) -> list[Row]:
    """Microseconds per ``observe`` call (an improvement every other call; never stopping)."""
    values = [1.0 / (i + 1) if i % 2 == 0 else 2.0 for i in range(calls)]
    samples = []
    for r in range(rounds):
        policy = StoppingPolicy(monitor="val_loss", patience=calls + 1)
        observe = policy.observe
        start = time.perf_counter()
        for step, value in enumerate(values):
            observe(value, step)
        samples.append((time.perf_counter() - start) / calls)
        progress(f"observe round {r + 1}/{rounds}: {samples[-1] * 1e6:.2f} us per call")
    group = f"StoppingPolicy.observe, {calls} calls per round, {rounds_text(rounds)}"
    return [
        Row(
            group=group,
            section="observe",
            size="-",
            method="StoppingPolicy.observe",
            samples=samples,
        )
    ]
