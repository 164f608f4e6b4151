"""One rank of an FSDP2 run (or a plain process) saving and loading sharded checkpoints.

Run by tests/adapters/torch/test_sharded.py with RANK/WORLD_SIZE/MASTER_* set (WORLD_SIZE=1:
no process group, a plain model). Commands:

- ``train ROOT OUT --steps A B``: train steps A..B-1 (resuming from ROOT first), saving a
  sharded checkpoint every step; then write the full model and optimizer state to OUT.
- ``load ROOT OUT [--step S]``: load the latest checkpoint (or step S) into a fresh model and
  optimizer sharded over this world size, and write their full state to OUT.

OUT (written by rank 0) is an ``.npz`` of every tensor by key plus ``__json__``, the JSON of the
non-tensor values, so the test compares states bit for bit across world sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
from ckptkit.adapters._torch_dist import DistributedCheckpointer
from ckptkit.adapters.torch import TorchState


def build(distributed: bool, device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # Odd sizes: 30 rows over 4 ranks is 8+8+8+6, 5 rows is 2+2+1+0.
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5), torch.nn.LayerNorm(5)
    )
    model.register_buffer("seen", torch.zeros(3, dtype=torch.int64))
    model.to(device)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return model, optimizer


def batch(step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g).to(device), torch.randn(16, 5, generator=g).to(device)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> Any:
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_state_dict(model, optimizer, options=options)


def dump(
    path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: bool
) -> None:
    msd, osd = full_state(model, optimizer, distributed)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            arrays[key] = value.detach().cpu().numpy()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")
        else:
            plain[key] = value

    walk(msd, "model")
    walk(osd, "optimizer")
    np.savez(path, __json__=np.array(json.dumps(plain, sort_keys=True)), **arrays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train", "load"])
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, nargs=2, default=(0, 0))
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--cuda", action="store_true", help="NCCL and FSDP2 on the GPU")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1 or args.cuda
    device = "cpu"
    if args.cuda:
        device = f"cuda:{int(os.environ.get('RANK', '0')) % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if args.cuda else "gloo")
    try:
        model, optimizer = build(distributed, device)
        state = TorchState(model=model, optimizer=optimizer)
        store = CheckpointStore(args.root, keep_last=3)
        policy = StoppingPolicy(monitor="loss", patience=100)
        ckpt: Any
        if distributed:
            ckpt = DistributedCheckpointer(store, policy, state, sharded=True)
        else:
            ckpt = Checkpointer(store, policy, state)
        if args.command == "load":
            if args.step is None:
                ckpt.resume()
            else:
                tree = store.load(args.step)
                state.load_state_dict(tree)
        else:
            start = ckpt.resume()
            assert start == args.steps[0], (start, args.steps)
            for step in range(*args.steps):
                x, y = batch(step, device)
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ckpt.step(step, {"loss": loss.item()})
        dump(args.out, model, optimizer, distributed)
        print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "ok": True}))
        sys.stdout.flush()
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
