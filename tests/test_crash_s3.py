"""Crash and concurrency tests on S3: real writer processes against moto's server on 127.0.0.1.

A writer is SIGKILLed at each instant of one save in turn (just before each S3 request of the
save is sent and just after its answer came back: inside the multipart upload, around its
completion, around the manifest's conditional PutObject, around retention's deletions), and at
random instants. Then every checkpoint the manifest lists must load with the exact bytes saved,
the last save the writer saw return must be listed, and the next writer must leave no unlisted
object and no unfinished upload behind. Concurrent writer processes must lose no commit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit._manifest import CHECKPOINT_DIR, MANIFEST_NAME
from tests.helpers.s3_crash_writer import expected_state, open_store
from tests.helpers.s3server import S3Bucket

WRITER = str(Path(__file__).parent / "helpers" / "s3_crash_writer.py")
REPO = str(Path(__file__).parent.parent)
#: Random-instant kill trials; CKPTKIT_S3_CRASH_TRIALS=200 runs a long campaign.
TRIALS = int(os.environ.get("CKPTKIT_S3_CRASH_TRIALS", "6"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def writer(bucket: S3Bucket, prefix: str, first: int, count: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        WRITER,
        bucket.endpoint,
        bucket.url(prefix),
        str(first),
        str(count),
        *extra,
    ]


def run(args: list[str]) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def committed(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("committed")]


def objects(bucket: S3Bucket, prefix: str) -> list[str]:
    keys = []
    for page in bucket.client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket.name, Prefix=f"{prefix}/"
    ):
        keys += [item["Key"].removeprefix(f"{prefix}/") for item in page.get("Contents", [])]
    return keys


def open_uploads(bucket: S3Bucket, prefix: str) -> list[str]:
    answer = bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix=f"{prefix}/")
    return [u["Key"] for u in answer.get("Uploads", [])]


def check_store(bucket: S3Bucket, prefix: str, lines: list[str]) -> None:
    """Every listed checkpoint is whole; the last save that returned is listed; then no leftovers."""
    store = open_store(bucket.endpoint, bucket.url(prefix), keep_last=2, grace=0.0)
    records = store.records()
    for record in records:
        got = store.load(record.step)
        want = expected_state(record.step)
        assert got["step"] == record.step
        assert got["large"].tobytes() == want["large"].tobytes(), record.step
        assert got["small"].tobytes() == want["small"].tobytes(), record.step
        store.verify(record.step)
    done = committed(lines)
    if done:
        assert done[-1] in store, (done, [r.step for r in records])
    # The next writer's first change sweeps what the killed one left (grace 0: nothing is live).
    store.save(99, expected_state(99))
    store.wait()  # retention's deletion runs on after save returns
    listed = {r.directory for r in store.records()}
    names = {key.split("/")[0] for key in objects(bucket, prefix)}
    assert names <= listed | {MANIFEST_NAME}, sorted(names - listed)
    assert all(CHECKPOINT_DIR.fullmatch(n) for n in names - {MANIFEST_NAME})
    assert open_uploads(bucket, prefix) == []


def test_a_kill_at_each_instant_of_a_save_costs_no_committed_checkpoint(
    s3_bucket: S3Bucket,
) -> None:
    code, lines = run(
        writer(s3_bucket, "count", 0, 4, "--keep-last", "2", "--kill-at", "0", "--arm-step", "3")
    )
    assert code == 0
    instants = int(next(line for line in lines if line.startswith("instants")).split()[1])
    # Reading the manifest; the arrays file as a multipart upload (create, 3 parts, complete);
    # state.json; the manifest's commit; retention's deletion: 8 requests at the least.
    assert instants >= 16, lines
    outcomes = {"before the commit": 0, "after the commit": 0}
    for n in range(1, instants + 1):
        prefix = f"kill-{n}"
        code, lines = run(
            writer(
                s3_bucket, prefix, 0, 4, "--keep-last", "2", "--kill-at", str(n), "--arm-step", "3"
            )
        )
        assert code == -signal.SIGKILL, (n, lines)
        assert committed(lines) == [0, 1, 2], (n, lines)
        store = open_store(s3_bucket.endpoint, s3_bucket.url(prefix), keep_last=2, grace=0.0)
        outcomes["after the commit" if 3 in store else "before the commit"] += 1
        check_store(s3_bucket, prefix, lines)
    print(f"{instants} instants of one save killed: {outcomes}")
    # The kills fell on both sides of the commit point.
    assert outcomes["before the commit"] > 0 and outcomes["after the commit"] > 0, outcomes


def test_kills_at_random_instants_cost_no_committed_checkpoint(s3_bucket: S3Bucket) -> None:
    rng = random.Random(int(os.environ.get("CKPTKIT_CRASH_SEED", "0")))
    env = {**os.environ, "PYTHONPATH": REPO}
    for trial in range(TRIALS):
        prefix = f"random-{trial}"
        proc = subprocess.Popen(
            writer(s3_bucket, prefix, 0, 1000, "--keep-last", "2"),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        # Wait for a random number of commits (the writer's own progress, not a clock), then
        # kill it at whatever instant of the next save it has reached.
        for _ in range(rng.randint(1, 4)):
            lines.append(proc.stdout.readline().strip())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        lines += rest.splitlines()
        check_store(s3_bucket, prefix, lines)


#: Writers started together wait for "go"; moto reports every unfinished upload as begun in
#: 2010, so one writer's sweep would take another's upload that has no part yet for abandoned:
#: a grace of 30 years keeps the sweep out of these tests (on S3 the start time is real).
TOGETHER = ("--wait-go", "--grace", "1e9")


def run_together(commands: list[list[str]]) -> list[str]:
    """Start the writers, let them all go at once, and return each one's stdout."""
    env = {**os.environ, "PYTHONPATH": REPO}
    procs = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in commands
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writer_processes_lose_no_commit(s3_bucket: S3Bucket, writers: int) -> None:
    prefix = f"concurrent-{uuid.uuid4().hex[:8]}"
    outputs = run_together(
        [writer(s3_bucket, prefix, 100 * i, 3, *TOGETHER) for i in range(writers)]
    )
    reported = [step for out in outputs for step in committed(out.splitlines())]
    expected = sorted(100 * i + k for i in range(writers) for k in range(3))
    assert sorted(reported) == expected
    store = open_store(s3_bucket.endpoint, s3_bucket.url(prefix), keep_last=None, grace=0.0)
    assert [r.step for r in store.records()] == expected
    for step in expected:
        assert store.load(step)["large"].tobytes() == expected_state(step)["large"].tobytes()


def test_two_processes_saving_one_step_commit_it_once(s3_bucket: S3Bucket) -> None:
    prefix = f"same-step-{uuid.uuid4().hex[:8]}"
    outputs = run_together(
        [writer(s3_bucket, prefix, 7, 1, *TOGETHER, "--value", str(value)) for value in (1, 2)]
    )
    outcomes = {value: out.split()[0] for value, out in zip((1, 2), outputs, strict=True)}
    assert sorted(outcomes.values()) == ["committed", "exists"], outcomes
    winner = next(v for v, outcome in outcomes.items() if outcome == "committed")
    store = open_store(s3_bucket.endpoint, s3_bucket.url(prefix), keep_last=None, grace=0.0)
    got: Any = store.load(7)
    assert got["value"] == winner
    assert np.array_equal(got["large"], expected_state(7, winner)["large"])
    # The loser's files were removed with its refusal: one checkpoint's objects remain.
    assert len({key.split("/")[0] for key in objects(s3_bucket, prefix)} - {MANIFEST_NAME}) == 1
