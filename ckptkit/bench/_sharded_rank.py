"""One rank of ``python -m ckptkit.bench --sharded``: times sharded saves and loads of FSDP2.

Run as ``python -m ckptkit.bench._sharded_rank SPEC_JSON`` by ``_sharded`` on every rank, with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set. The model is a stack of ``Linear`` layers, made on
the meta device, sharded with ``fully_shard`` (each layer, then the root) and only then given
memory, so no rank ever holds the whole model. The state saved is the parameters only.

Every measured operation runs on all ranks between two barriers; a rank's figure is the
seconds from the first barrier to the second, so it includes waiting for the slowest rank. Just
before each operation the rank resets its peak resident memory (VmHWM) and notes its resident
size; after it, the peak again: the growth is what the operation itself allocated. The last
line printed is this rank's JSON result. Rank 0 waits for a line on its stdin before the
first measurement.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.fsdp import fully_shard

from ckptkit import CheckpointStore

# mypy checks ckptkit/ without adapters/ (which .ci/run checks on its own): ckptkit.adapters is
# that folder only once installed, so mypy does not find it from here.
from ckptkit.adapters._torch_dist import DistributedCheckpointer  # type: ignore[import-not-found]
from ckptkit.adapters.torch import TorchState  # type: ignore[import-not-found]
from ckptkit.bench._machine import evict, fsync_dir, reset_peak, status_bytes
from ckptkit.bench._timing import Progress, format_seconds

SAVES = ("ckptkit sharded save", "dcp.save FileSystemWriter", "raw write+fsync")
LOADS = ("ckptkit resume", "dcp.load FileSystemReader", "raw read")


def build(layers: int, width: int) -> torch.nn.Module:
    """The FSDP2 model: ``layers`` x Linear(width, width), non-constant values, sharded."""
    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.uniform_(-1.0, 1.0, generator=generator)
    return model


def local_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's shard of every parameter, as plain contiguous CPU tensors."""
    out = []
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        out.append(local.detach().contiguous())
    return out


def raw_write(tensors: list[torch.Tensor], path: Path) -> None:
    """The floor: this rank's bytes in one file, written from the tensors' memory and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.numpy().data.cast("B"))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def raw_read(tensors: list[torch.Tensor], path: Path) -> None:
    """Read this rank's file back into the shards' memory."""
    with open(path, "rb", buffering=0) as f:
        for t in tensors:
            view = t.numpy().data.cast("B")
            while view:
                n = f.readinto(view)
                if not n:
                    raise EOFError(f"{path} ended early")
                view = view[n:]


class Rank:
    """The state of one rank's run: the model, the stores and what was measured."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.rank = dist.get_rank()
        self.root = Path(spec["dir"])
        self.model = build(int(spec["layers"]), int(spec["width"]))
        self.store = CheckpointStore(self.root / "ckptkit")
        # The model alone: an optimizer in the TorchState, even one never stepped, would be
        # saved with its state, which get_optimizer_state_dict creates (AdamW: twice the model).
        self.ckpt = DistributedCheckpointer(
            self.store, None, TorchState(model=self.model, rng=False), sharded=True
        )
        self.shards = local_tensors(self.model)
        self.step = 0
        self.samples: dict[str, list[float]] = {name: [] for name in SAVES + LOADS}
        self.growth: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        #: The process's peak resident size over the whole run (VmHWM is reset per operation).
        self.lifetime = status_bytes("VmHWM") or 0

    # -- saves -------------------------------------------------------------------------

    def save_ckptkit(self) -> None:
        self.ckpt.save(self.step)

    def save_dcp(self) -> None:
        state = get_model_state_dict(self.model)
        writer = FileSystemWriter(str(self.root / f"dcp-{self.step}"), sync_files=True)
        dcp_save(state, storage_writer=writer)

    def save_raw(self) -> None:
        raw_write(self.shards, self.root / f"raw-{self.step}" / f"rank{self.rank}.bin")

    def drop_older(self) -> None:
        """Delete every save but the newest of each method (untimed); rank 0 for all ranks."""
        if self.rank == 0:
            CheckpointStore(self.root / "ckptkit", keep_last=1).prune()
            for kind in ("dcp", "raw"):
                for old in self.root.glob(f"{kind}-*"):
                    if old.name != f"{kind}-{self.step}":
                        shutil.rmtree(old)

    # -- loads -------------------------------------------------------------------------

    def load_ckptkit(self) -> None:
        self.ckpt.resume()

    def load_dcp(self) -> None:
        state = get_model_state_dict(self.model)
        dcp_load(state, storage_reader=FileSystemReader(str(self.root / f"dcp-{self.step}")))
        set_model_state_dict(self.model, state)

    def load_raw(self) -> None:
        raw_read(self.shards, self.root / f"raw-{self.step}" / f"rank{self.rank}.bin")

    def evict_all(self) -> None:
        """Drop every saved file from the page cache (untimed), so loads read the disk."""
        if self.rank == 0:
            for path in self.root.iterdir():
                evict(path)

    # -- measuring ---------------------------------------------------------------------

    def measure(self, name: str, action: Callable[[], None]) -> float:
        gc.collect()
        self.lifetime = max(self.lifetime, status_bytes("VmHWM") or 0)
        reset_peak()
        before = status_bytes("VmRSS") or 0
        dist.barrier()
        start = time.perf_counter()
        action()
        dist.barrier()
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM") or 0
        self.samples[name].append(seconds)
        self.growth[name] = max(self.growth.get(name, 0), peak - before)
        self.peak[name] = max(self.peak.get(name, 0), peak)
        self.lifetime = max(self.lifetime, peak)
        return seconds


def warm_up(actions: dict[str, Callable[[], None]]) -> None:
    for action in actions.values():
        action()
        dist.barrier()


def rotate(names: tuple[str, ...], r: int) -> list[str]:
    shift = r % len(names)
    return list(names[shift:] + names[:shift])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    me = Rank(spec)
    if me.rank == 0:
        # The launcher measures the machine while the ranks start; it says when it is done, so
        # that nothing of its own runs beside the timed operations.
        sys.stdin.readline()
    dist.barrier()
    progress = Progress(quiet=me.rank != 0)
    saves = {SAVES[0]: me.save_ckptkit, SAVES[1]: me.save_dcp, SAVES[2]: me.save_raw}
    loads = {LOADS[0]: me.load_ckptkit, LOADS[1]: me.load_dcp, LOADS[2]: me.load_raw}
    rounds = int(spec["rounds"])
    model_rss = status_bytes("VmRSS") or 0
    # One untimed call of each method first: first calls import and set up what later calls
    # reuse, a cost that would otherwise land on whichever method the first round runs first.
    warm_up(saves)
    for r in range(rounds):
        me.step = r + 1
        for name in rotate(SAVES, r):
            seconds = me.measure(name, saves[name])
            progress(f"sharded save round {r + 1}/{rounds}: {name}: {format_seconds(seconds)}")
        me.drop_older()
        dist.barrier()
    warm_up(loads)
    for r in range(rounds):
        for name in rotate(LOADS, r):
            me.evict_all()
            seconds = me.measure(name, loads[name])
            progress(f"sharded load round {r + 1}/{rounds}: {name}: {format_seconds(seconds)}")
    local = sum(t.numel() * t.element_size() for t in me.shards)
    return {
        "rank": me.rank,
        "local_bytes": local,
        "model_rss": model_rss,
        "samples": me.samples,
        "growth": me.growth,
        "peak": me.peak,
        # The whole process's peak, model and imports included. ru_maxrss (KiB on Linux) follows
        # VmHWM, which each measurement resets, hence the maximum with what was seen before.
        "maxrss": max(
            me.lifetime,
            status_bytes("VmHWM") or 0,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        result = run(spec)
        print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
