"""DistributedCheckpointer with two real gloo processes: one writer, one stop, one resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore, StoppingPolicy  # noqa: E402
from ckptkit.adapters._torch_dist import (  # noqa: E402 (after the importorskip)
    DistributedCheckpointer,
    DistributedCheckpointError,
)
from ckptkit.adapters.torch import TorchState  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"
CUT = 4  # the interrupted run commits epochs 0-3 and fails saving epoch 4
FINAL = 1000  # the step the whole run saves its restored best model under
TIMEOUT = 60.0  # seconds for a whole two-rank run; the workers' own collectives time out at 30

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(*args: str, world: int = 2, worker: Path = WORKER) -> list[dict[str, Any]]:
    """Run ``world`` worker ranks to the end; return each rank's JSON result, by rank.

    Every wait is bounded: a rank still running after ``TIMEOUT`` seconds (a hang at a
    collective) fails the test, and every rank is killed on the way out.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + TIMEOUT
    outputs: list[tuple[str, str]] = []
    try:
        for rank, proc in enumerate(procs):
            try:
                outputs.append(proc.communicate(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} did not finish within {TIMEOUT} s: a hang")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    report = describe(procs, outputs)
    results = []
    for rank, (out, _) in enumerate(outputs):
        lines = out.strip().splitlines()
        assert lines, f"rank {rank} printed no result\n{report}"
        result = json.loads(lines[-1])
        result["returncode"] = procs[rank].returncode
        result["report"] = report
        results.append(result)
    return results


def describe(procs: list[subprocess.Popen[str]], outputs: list[tuple[str, str]]) -> str:
    """Every rank's exit status (a signal by name) and whole stderr, for a failure message."""
    parts = []
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        code = proc.returncode
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        parts.append(f"--- rank {rank}: {status}; stderr:\n{err.rstrip() or '(empty)'}")
    return "\n".join(parts)


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every rank exited 0 without an error and return the results."""
    for r in results:
        assert r["returncode"] == 0 and "error" not in r, (
            f"rank {r['rank']} failed: {r.get('error')}: {r.get('message')}\n{r['report']}"
        )
    return results


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """An uninterrupted two-rank run to its early stop: its store and the ranks' results."""
    root = tmp_path_factory.mktemp("ddp") / "whole"
    return root, ok(launch(str(root), "--final-save", str(FINAL)))


def test_only_rank_0_writes_and_every_rank_stops_at_its_epoch(
    whole_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Rank 0 makes every save, both ranks stop at rank 0's epoch and hold the same weights."""
    root, (zero, one) = whole_run
    store = CheckpointStore(root)
    assert zero["saves"] and one["saves"] == []
    assert {r.step for r in store.records()} <= set(zero["saves"])
    # Rank 1's own metrics improve every epoch; it stops only because rank 0's policy did.
    assert zero["stopped_at"] is not None and zero["stopped_at"] == one["stopped_at"]
    assert zero["should_stop"] and one["should_stop"]
    assert zero["best_step"] == one["best_step"] == zero["restored"] == one["restored"]
    assert zero["weights"] == one["weights"]
    # save() outside the schedule: rank 0 writes, both ranks get the record.
    assert zero["final"] == one["final"] == [FINAL, "final"]
    assert zero["saves"][-2:] == [zero["stopped_at"], FINAL]
    assert [r.step for r in store.records()][-2:] == [zero["stopped_at"], FINAL]


def test_a_failed_save_stops_every_rank_and_a_restart_resumes_them(
    tmp_path: Path, whole_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Rank 0's failed save raises on both ranks (no hang); the restart ends as the whole run."""
    _, (whole, _) = whole_run
    assert whole["best_step"] >= CUT  # so the best weights compared below were trained after it
    root = tmp_path / "cut"
    zero, one = launch(str(root), "--fail-save-at", str(CUT))  # as if the disk filled up
    assert (zero["returncode"], zero["error"]) == (3, "OSError")
    assert "No space left on device" in zero["message"]
    assert (one["returncode"], one["error"]) == (3, "DistributedCheckpointError")
    assert one["message"].startswith(f"rank 0 failed at step {CUT} of the store {root}: ")
    assert "OSError: [Errno 28] No space left on device (simulated)" in one["message"]

    zero, one = ok(launch(str(root)))
    assert zero["start"] == one["start"] == CUT
    assert zero["stopped_at"] == one["stopped_at"] == whole["stopped_at"]
    assert zero["best_step"] == one["best_step"] == whole["best_step"]
    assert zero["weights"] == one["weights"] == whole["weights"]  # bit for bit
    assert zero["saves"] == [s for s in whole["saves"] if CUT <= s < FINAL]
    assert one["saves"] == []


def test_ranks_that_see_different_stores_refuse_to_resume(
    tmp_path: Path, whole_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    """With a store per rank (no shared filesystem) the resumed steps differ: both ranks raise."""
    root, _ = whole_run
    shutil.copytree(root, tmp_path / "rank0")  # rank 0 sees the checkpoints, rank 1 none
    zero, one = launch(str(tmp_path / "rank{rank}"))
    for result in (zero, one):
        assert (result["returncode"], result["error"]) == (3, "DistributedCheckpointError")
        expected = f"rank 0 resumed from step {FINAL}, rank 1 resumed from no checkpoint"
        assert expected in result["message"]
        assert "the store must be one directory that every rank reads" in result["message"]


def test_without_a_process_group_it_says_what_to_call(tmp_path: Path) -> None:
    """Made before init_process_group, it raises DistributedCheckpointError naming the fix."""
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 1)
    with pytest.raises(
        DistributedCheckpointError, match=r"call torch\.distributed\.init_process_group"
    ):
        DistributedCheckpointer(
            CheckpointStore(tmp_path / "run"),
            StoppingPolicy(monitor="val_loss"),
            TorchState(model=model),
        )


def test_a_failed_rank_is_reported_with_its_signal_and_whole_stderr() -> None:
    """The failure message names a signal by name and shows every rank's whole stderr."""
    code = "import os, sys; sys.stderr.write('line 1\\nline 2\\n'); sys.stderr.flush(); os.abort()"
    procs = [
        subprocess.Popen([sys.executable, "-c", c], stderr=subprocess.PIPE, text=True)
        for c in (code, "pass")
    ]
    outputs = [("", proc.communicate()[1]) for proc in procs]
    assert describe(procs, outputs) == (
        "--- rank 0: killed by SIGABRT; stderr:\nline 1\nline 2\n"
        "--- rank 1: exit status 0; stderr:\n(empty)"
    )
