"""One rank of an FSDP2 run whose sharded save is killed or fails on purpose, or that resumes.

Run by tests/adapters/torch/test_sharded_faults.py once per rank, with RANK/WORLD_SIZE/MASTER_*
set. The model, its batches and the state dump are fsdp_worker.py's. Commands:

- ``train ROOT OUT --steps A B``: resume from ROOT, train steps A..B-1 saving a sharded
  checkpoint each step, and after each committed step write the full state to
  ``OUT/step_<S>.npz`` (rank 0; fsdp_worker.py's dump format). Faults, at one step S:

  - ``--kill RANK S POINT``: rank RANK sends itself SIGKILL during the save of step S, at
    POINT: ``shard-partial`` (its shard file half written, not fsynced), ``shard-written`` (its shard file
    written and fsynced, before DCP's final gather) or ``before-commit`` (rank 0 only: every
    file written, the manifest not yet replaced).
  - ``--fail RANK S``: rank RANK's shard write raises OSError once. Both ranks catch what
    they raise, rank 0 records the root before and after the failed save in
    ``OUT/before.json`` and ``OUT/after.json`` (manifest bytes, every path under the root),
    then both ranks save step S again and go on.

  ``--storage-options JSON`` passes storage_options to the store (an ``s3://`` ROOT).
- ``resume ROOT [ROOT ...]``: for each ROOT, a fresh model resumes with ``fallback=False``,
  then another with the default fallback; the error or the step each one resumed.

Each rank prints one JSON line (its rank, what it committed or resumed, its error) and exits 0,
or 3 after an error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_worker import batch, build, dump  # run as a script: its folder is on sys.path

import ckptkit.adapters._torch_dcp as torch_dcp
from ckptkit import CheckpointStore, StoppingPolicy
from ckptkit.adapters._torch_dist import DistributedCheckpointer
from ckptkit.adapters.torch import TorchState

#: The step being trained, for the faults to fire at the right save only.
NOW: dict[str, int] = {"step": -1}


def die() -> None:
    """SIGKILL this process: no handler, no cleanup, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)


class _HalfThenDie:
    """A shard file's sink that writes half of the first bytes it is given, then dies."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, data: Any) -> Any:
        view = memoryview(data).cast("B")
        self._out.write(view[: len(view) // 2])
        die()


def arm_kill(rank: int, step: int, point: str, store: CheckpointStore) -> None:
    """Make this rank SIGKILL itself at ``point`` of the save of ``step``."""
    if point == "shard-partial":
        original_write = torch_dcp.write_safetensors

        def write_safetensors(out: Any, arrays: Any, *a: Any) -> Any:
            if NOW["step"] == step:
                return original_write(_HalfThenDie(out), arrays, *a)
            return original_write(out, arrays, *a)

        torch_dcp.write_safetensors = write_safetensors  # type: ignore[assignment]
    elif point == "shard-written":
        original_data = torch_dcp.ShardWriter.write_data

        def write_data(self: Any, plan: Any, planner: Any) -> Any:
            done = original_data(self, plan, planner)
            if NOW["step"] == step:
                die()
            return done

        torch_dcp.ShardWriter.write_data = write_data  # type: ignore[method-assign]
    elif point == "before-commit":
        assert rank == 0, "only rank 0 commits"
        storage = store._storage
        original_commit = storage.commit_manifest

        def commit_manifest(data: bytes, **kw: Any) -> None:
            if NOW["step"] == step and kw.get("new_checkpoint") is not None:
                die()
            original_commit(data, **kw)

        storage.commit_manifest = commit_manifest  # type: ignore[method-assign]
    else:
        raise ValueError(point)


def arm_failure(step: int) -> None:
    """Make this rank's next shard write of ``step`` raise OSError, once."""
    original_data = torch_dcp.ShardWriter.write_data
    armed = [True]

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        if NOW["step"] == step and armed[0]:
            armed[0] = False
            raise OSError(5, f"Input/output error (simulated on rank {dist.get_rank()})")
        return original_data(self, plan, planner)

    torch_dcp.ShardWriter.write_data = write_data  # type: ignore[method-assign]


def describe(e: BaseException) -> dict[str, Any]:
    """An error as JSON: its type, message, and whether ``except Exception`` catches it."""
    return {"error": type(e).__name__, "message": str(e), "is_exception": isinstance(e, Exception)}


def snapshot(root: Path, path: Path) -> None:
    """Write the manifest's text and every path under ``root`` (sorted) to ``path`` as JSON."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    manifest = (root / "manifest.json").read_text()
    path.write_text(json.dumps({"manifest": manifest, "files": files}))


def make(root: str, options: dict[str, Any] | None) -> tuple[Any, Any, DistributedCheckpointer]:
    model, optimizer = build(True)
    store = CheckpointStore(root, keep_last=3, storage_options=options)
    policy = StoppingPolicy(monitor="loss", patience=100)
    return (
        model,
        optimizer,
        DistributedCheckpointer(
            store, policy, TorchState(model=model, optimizer=optimizer), sharded=True
        ),
    )


def train(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    out = Path(args.out)
    options = None if args.storage_options is None else json.loads(args.storage_options)
    model, optimizer, ckpt = make(args.root, options)
    if args.kill is not None and int(args.kill[0]) == rank:
        arm_kill(rank, int(args.kill[1]), args.kill[2], ckpt.store)
    fail_step = None
    if args.fail is not None:
        fail_step = int(args.fail[1])
        if int(args.fail[0]) == rank:
            arm_failure(fail_step)
    start = ckpt.resume()
    committed: list[int] = []
    failures: list[dict[str, str]] = []
    for step in range(start, args.steps[1]):
        NOW["step"] = step
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"loss": loss.item()}
        local = "://" not in args.root
        if step == fail_step:
            dist.barrier()
            if rank == 0 and local:
                snapshot(Path(args.root), out / "before.json")
            try:
                ckpt.step(step, metrics)
            except BaseException as e:  # the failure under test: recorded, then retried
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                failures.append(describe(e))
            dist.barrier()  # every rank has cleaned up after its failure
            if rank == 0 and local:
                snapshot(Path(args.root), out / "after.json")
            ckpt.save(step, metrics)
        else:
            ckpt.step(step, metrics)
        committed.append(step)
        dump(str(out / f"step_{step}.npz"), model, optimizer, True)
    return {"rank": rank, "start": start, "committed": committed, "failures": failures}


def resume(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    outcomes = []
    for root in args.roots:
        outcome: dict[str, Any] = {}
        for name, fallback in (("strict", False), ("fallback", True)):
            _, _, ckpt = make(root, None)
            try:
                ckpt.resume(fallback=fallback)
                assert ckpt.resumed_from is not None
                outcome[name] = {"step": ckpt.resumed_from.step}
            except BaseException as e:  # the refusal under test (DCP's is a BaseException)
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                outcome[name] = describe(e)
        outcomes.append(outcome)
    return {"rank": rank, "resumed": outcomes}


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--steps", type=int, nargs=2, required=True)
    p.add_argument("--kill", nargs=3, metavar=("RANK", "STEP", "POINT"))
    p.add_argument("--fail", nargs=2, metavar=("RANK", "STEP"))
    p.add_argument("--storage-options")
    p = commands.add_parser("resume")
    p.add_argument("roots", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # A short collective timeout: a rank whose peer died must fail well before the test's bound.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    code = 0
    try:
        result = train(args, rank) if args.command == "train" else resume(args, rank)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        traceback.print_exc()
        result = {"rank": rank, **describe(e)}
        code = 3
    print(json.dumps(result), flush=True)
    if code:
        # The peer may be gone: gloo's teardown could then abort at random. Leave at once.
        sys.stderr.flush()
        os._exit(code)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
