"""One rank of a DDP training run on gloo, checkpointed by DistributedCheckpointer.

Run by ``tests/adapters/torch/test_distributed.py`` once per rank, with ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE`` in the environment. It prints one JSON line with
what this rank saw (start epoch, stop epoch, saves made, a digest of the weights), or the error
it raised, and exits 0 on success, 3 on an error.

Arguments: ``ROOT [--epochs N] [--no-restore] [--fail-save-at STEP] [--final-save STEP]``. ``ROOT`` may contain
``{rank}``, to give each rank its own store (as on machines without a shared filesystem).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckptkit import CheckpointStore, StoppingPolicy
from ckptkit.adapters._torch_dist import DistributedCheckpointer
from ckptkit.adapters.torch import TorchState


def digest(model: torch.nn.Module) -> str:
    """A SHA-256 of every parameter's bytes, to compare weights across ranks and runs."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().numpy().tobytes())
    return h.hexdigest()


def run(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """Train until the policy stops or ``args.epochs``; return what this rank saw."""
    torch.manual_seed(0)  # the same initial weights and dropout stream on every rank
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(8, 1, generator=data)
    x = torch.randn(64, 8, generator=data)
    y = x @ w_true + torch.randn(64, 1, generator=data)  # noisy: it overfits soon
    x_val = torch.randn(256, 8, generator=data)
    y_val = x_val @ w_true
    x_mine, y_mine = x[rank::world], y[rank::world]  # each rank trains on its shard

    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    shuffle = torch.Generator().manual_seed(2)

    store = CheckpointStore(
        args.root.format(rank=rank), keep_last=2, keep_best=1, monitor="val_loss"
    )
    saves: list[int] = []
    save = store.save

    def counting_save(step: int, *a: Any, **kw: Any) -> Any:
        if args.fail_save_at is not None and step == args.fail_save_at:
            raise OSError(28, "No space left on device (simulated)")
        saves.append(step)
        return save(step, *a, **kw)

    store.save = counting_save  # type: ignore[method-assign]
    ckpt = DistributedCheckpointer(
        store,
        StoppingPolicy(monitor="val_loss", patience=4),
        TorchState(model=model, optimizer=optimizer, shuffle=shuffle),
    )
    start = ckpt.resume()
    stopped_at = None
    for epoch in range(start, args.epochs):
        for batch in torch.randperm(len(x_mine), generator=shuffle).reshape(4, -1):
            loss = torch.nn.functional.mse_loss(model(x_mine[batch]), y_mine[batch])
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients here: a rank that left would hang us
            optimizer.step()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(net(x_val), y_val).item()
        # Only rank 0's metrics count; the other ranks pass a loss that always improves, which
        # would never stop them on their own.
        metrics = {"val_loss": val_loss if rank == 0 else -float(epoch)}
        decision = ckpt.step(epoch, metrics)
        assert decision is not None
        if decision.should_stop:
            stopped_at = epoch
            break
    restored = None if args.no_restore else ckpt.restore_best().step
    final = None
    if args.final_save is not None:  # e.g. the restored best model, saved under its own step
        record = ckpt.save(args.final_save, metadata={"note": "final"})
        final = [record.step, record.metadata["note"]]
    dist.barrier()  # a last collective: proves no rank was left behind in the loop
    return {
        "rank": rank,
        "start": start,
        "stopped_at": stopped_at,
        "should_stop": ckpt.should_stop,
        "best_step": ckpt.policy.best_step if ckpt.policy is not None else None,
        "restored": restored,
        "saves": saves,
        "final": final,
        "weights": digest(net),
    }


def main() -> int:
    """Join the process group, run, print the JSON result; exit 3 on an error."""
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--no-restore", action="store_true")
    parser.add_argument("--fail-save-at", type=int, default=None)
    parser.add_argument("--final-save", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    code = 0
    try:
        result = run(args, rank, world)
    except Exception as e:
        traceback.print_exc()
        result = {"rank": rank, "error": type(e).__name__, "message": str(e)}
        code = 3
    print(json.dumps(result), flush=True)
    if code:
        # After an error the peer may already have exited, and gloo's teardown then aborts
        # (SIGABRT) at random: leave without it, keeping the exit code the test checks.
        sys.stderr.flush()
        os._exit(code)
    # Tear the group down before the interpreter does: a gloo worker thread frees each
    # finished collective's tensors itself, and one that does so while the interpreter is
    # finalizing cannot take the GIL and aborts the process (SIGABRT) after its work is done.
    # destroy_process_group joins those threads; nothing may still hold the group then, and no
    # rank may still have a collective in flight with this one.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
