"""Sharded saves under faults on real gloo ranks: a rank killed, a rank failing, pickles, S3.

Each run is two ranks of ``workers/fsdp_fault_worker.py`` (FSDP2 on CPU): a save is killed or
made to fail at a chosen point inside the worker, and the test then looks at what the store
holds from a single process. Round trips, resharding and resumes without faults are in
test_sharded.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore, CorruptCheckpointError  # noqa: E402
from ckptkit._manifest import shard_file_name  # noqa: E402
from ckptkit._safetensors_read import parse_safetensors  # noqa: E402

from .test_distributed import free_port  # noqa: E402 (after the importorskip)

WORKER = Path(__file__).parent / "workers" / "fsdp_fault_worker.py"
#: Seconds for a whole two-rank run; a rank still running then is hung (the workers' own
#: collectives time out at 60 s, and a dead peer is noticed at once).
TIMEOUT = 150.0
KILLED = -signal.SIGKILL
FAILED = 3  # the workers' exit status after an error

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


@dataclass(frozen=True)
class Rank:
    """How one rank ended: exit status, its JSON result (None if it printed none), stderr."""

    rank: int
    returncode: int
    result: dict[str, Any] | None
    stderr: str


def launch(*args: str, world: int = 2) -> list[Rank]:
    """Run ``world`` ranks of the fault worker to their end, whatever it is; every wait bounded.

    A rank may be killed on purpose, so a missing result is returned, not failed on. A rank
    still running after ``TIMEOUT`` (a hang) fails the test, and every rank is killed on the
    way out.
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
            [sys.executable, str(WORKER), *args],
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
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"rank {rank} did not finish within {TIMEOUT} s: a hang\n{err}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ranks = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        lines = out.strip().splitlines()
        result = json.loads(lines[-1]) if lines else None
        ranks.append(Rank(rank, proc.returncode, result, err))
    return ranks


def report(ranks: list[Rank]) -> str:
    """Every rank's exit status and stderr, for a failure message."""
    return "\n".join(
        f"--- rank {r.rank}: exit {r.returncode}, result {r.result}; stderr:\n{r.stderr.rstrip()}"
        for r in ranks
    )


def succeeded(ranks: list[Rank]) -> list[dict[str, Any]]:
    """Check every rank exited 0 with a result; return the results."""
    for r in ranks:
        assert r.returncode == 0 and r.result is not None and "error" not in r.result, report(ranks)
    return [r.result for r in ranks if r.result is not None]


def flatten(tree: Any, key: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A loaded state tree as fsdp_worker.py's dump: arrays and plain values by slash path."""
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, np.ndarray):
            arrays[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}/{i}")
        else:
            plain[path] = value

    walk(tree, key)
    return arrays, plain


def assert_loads_as_dumped(store: CheckpointStore, step: int | None, dump: Path) -> None:
    """``store.load(step)``'s model and optimizer equal the worker's dump bit for bit."""
    tree = store.load(step)
    arrays, plain = flatten({"model": tree["model"], "optimizer": tree["optimizer"]})
    with np.load(dump) as data:
        want = {k: data[k] for k in data.files}
    want_plain = json.loads(str(want.pop("__json__")))
    assert sorted(arrays) == sorted(want)
    for key, array in arrays.items():
        assert array.dtype == want[key].dtype and array.shape == want[key].shape, key
        assert array.tobytes() == want[key].tobytes(), f"{key} differs from the dump"
    assert plain == want_plain


def entries(root: Path) -> set[str]:
    """The names directly under a local store's root."""
    return {p.name for p in root.iterdir()}


def committed_layout(store: CheckpointStore) -> set[str]:
    """What a local store's root holds with nothing left over: lock, manifest, listed dirs."""
    return {".ckptkit.lock", "manifest.json", *(r.directory for r in store.records())}


# -- 1. a rank killed during a sharded save ----------------------------------------------------


@pytest.mark.parametrize(
    ("killed", "point"),
    [(1, "shard-partial"), (1, "shard-written"), (0, "before-commit")],
    ids=["rank1-shard-half-written", "rank1-shard-written", "rank0-before-manifest-commit"],
)
def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint_latest(
    tmp_path: Path, killed: int, point: str
) -> None:
    """SIGKILL of one rank mid-save: the other raises, step 1 stays latest, the next change sweeps."""
    root, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    ranks = launch(
        "train", str(root), str(out), "--steps", "0", "3", "--kill", str(killed), "2", point
    )
    dead, survivor = ranks[killed], ranks[1 - killed]
    assert dead.returncode == KILLED, report(ranks)
    # The survivor noticed the lost peer and raised (a hang would have failed in launch).
    assert survivor.returncode == FAILED and survivor.result is not None, report(ranks)
    assert survivor.result.get("error") == "DistributedCheckpointError", report(ranks)
    assert "another rank stopped answering" in survivor.result["message"], report(ranks)
    assert sorted(p.name for p in out.iterdir()) == ["step_0.npz", "step_1.npz"]

    store = CheckpointStore(root)
    assert [r.step for r in store.records()] == [0, 1]
    assert_loads_as_dumped(store, None, out / "step_1.npz")
    assert_loads_as_dumped(store, 0, out / "step_0.npz")
    assert store.verify().step == 1
    leftovers = entries(root) - committed_layout(store)
    if point == "before-commit":
        # Every file was written and the directory renamed: only the manifest does not list it.
        assert leftovers == {"step_000000000002"}
    assert all(
        name.startswith(".ckptkit-tmp-") or name == "step_000000000002" for name in leftovers
    ), leftovers

    store.pin(1)  # the first change of this open sweeps what the killed save left
    assert entries(root) == committed_layout(store)
    assert_loads_as_dumped(store, None, out / "step_1.npz")


# -- 2. a rank's shard write fails -------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_save(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Rank]]:
    """Steps 0-2 on two ranks; rank 1's shard write of step 2 raises OSError, then step 2 is
    saved again on both ranks: the store, the worker's dumps and snapshots, and the ranks."""
    tmp = tmp_path_factory.mktemp("fail")
    root, out = tmp / "run", tmp / "out"
    out.mkdir()
    ranks = launch("train", str(root), str(out), "--steps", "0", "3", "--fail", "1", "2")
    return root, out, ranks


def test_a_failed_shard_write_on_one_rank_fails_the_save_on_every_rank_and_commits_nothing(
    failed_save: tuple[Path, Path, list[Rank]],
) -> None:
    """Rank 1's OSError raises on both ranks, leaves the store as it was; the next save works."""
    root, out, ranks = failed_save
    zero, one = succeeded(ranks)  # no rank hung, and the retried save went on
    simulated = "[Errno 5] Input/output error (simulated on rank 1)"
    (own,) = one["failures"]
    assert own["error"] == "OSError" and simulated in own["message"]  # rank 1: its own error
    (carried,) = zero["failures"]  # rank 0: one that names rank 1's
    assert carried["error"] == "DistributedCheckpointError"
    assert f"rank 1: OSError: {simulated}" in carried["message"]
    for result in (zero, one):
        assert result["committed"] == [0, 1, 2]
    before = json.loads((out / "before.json").read_text())
    after = json.loads((out / "after.json").read_text())
    assert after["manifest"] == before["manifest"]  # nothing committed
    assert after["files"] == before["files"]  # and nothing of the failed save left behind
    assert not any(
        ".ckptkit-tmp-" in f or f.startswith("step_000000000002") for f in after["files"]
    )

    store = CheckpointStore(root)
    assert [r.step for r in store.records()] == [0, 1, 2]
    assert store.verify().step == 2
    assert_loads_as_dumped(store, None, out / "step_2.npz")
    assert entries(root) == committed_layout(store)


def test_a_failed_sharded_save_raises_an_exception_on_every_rank(
    failed_save: tuple[Path, Path, list[Rank]],
) -> None:
    """What each rank raises for a failed shard write is an Exception: ``except Exception`` works."""
    _, _, ranks = failed_save
    for result in succeeded(ranks):
        (failure,) = result["failures"]
        assert failure["is_exception"], (
            f"rank {result['rank']} raised {failure['error']}, a BaseException that "
            "`except Exception` misses (DCP's CheckpointException must not escape the save)"
        )


# -- 3. no pickle, written or read ---------------------------------------------------------------


class Planted:
    """Unpickled, creates ``marker``: a stand-in for a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def pickles(marker: Path) -> dict[str, tuple[bytes, bool]]:
    """Payloads to swap in for a shard file, and whether the manifest is made to agree."""
    tensor = io.BytesIO()
    torch.save(torch.arange(6, dtype=torch.float32), tensor)
    planted = io.BytesIO()
    torch.save({"w": Planted(marker)}, planted)
    return {
        # A stale checksum: found by verification before any parsing.
        "torch-save-tensor": (tensor.getvalue(), False),
        # The manifest's size and checksum made to match: only the parser stands in the way.
        "pickle-planted": (pickle.dumps(Planted(marker), protocol=2), True),
        "torch-save-planted": (planted.getvalue(), True),
    }


def swap_shard(root: Path, data: bytes, fix_manifest: bool) -> None:
    """Replace the latest checkpoint's ``shard_00001.safetensors`` with ``data``."""
    store = CheckpointStore(root, read_only=True)
    record = store.latest()
    assert record is not None
    name = shard_file_name(1)
    (root / record.directory / name).write_bytes(data)
    if fix_manifest:
        manifest = json.loads((root / "manifest.json").read_text())
        (entry,) = [
            f
            for r in manifest["checkpoints"]
            if r["step"] == record.step
            for f in r["files"]
            if f["name"] == name
        ]
        entry["size"] = len(data)
        entry["checksum"] = "sha256:" + hashlib.sha256(data).hexdigest()
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        assert store.verify().step == record.step  # the swap is invisible to checksums


@pytest.fixture(scope="module")
def sharded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 0 and 1 saved sharded on two ranks, with no fault."""
    tmp = tmp_path_factory.mktemp("clean")
    root, out = tmp / "run", tmp / "out"
    out.mkdir()
    succeeded(launch("train", str(root), str(out), "--steps", "0", "2"))
    return root


def test_every_file_of_a_sharded_checkpoint_is_json_or_safetensors(sharded_store: Path) -> None:
    """No file of a sharded store is a pickle: each is JSON or safetensors that parses as such."""
    try:
        from safetensors.numpy import load as reference_load
    except ImportError:  # the reference parser is optional; ckptkit's own always runs
        reference_load = None
    root = sharded_store
    store = CheckpointStore(root, read_only=True)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert {p.relative_to(root).parts[0] for p in files} == committed_layout(store)
    shards = 0
    for path in files:
        data = path.read_bytes()
        if path.name == ".ckptkit.lock":
            assert data == b""
            continue
        assert not data.startswith(b"\x80"), f"{path}: pickle's protocol marker"
        assert not data.startswith(b"PK\x03\x04"), f"{path}: a zip (torch.save's format)"
        if path.suffix == ".json":
            json.loads(data)
        else:
            assert path.suffix == ".safetensors", path
            arrays, _ = parse_safetensors(data, source=str(path))
            if reference_load is not None:
                reference = reference_load(data)
                assert sorted(reference) == sorted(arrays)
                for key, array in arrays.items():
                    assert reference[key].tobytes() == array.tobytes(), (path, key)
            shards += path.name.startswith("shard_")
    assert shards == 2 * len(store.records())


@pytest.fixture(scope="module")
def swapped(
    sharded_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    """Copies of the sharded store, each with a pickle as its latest shard_00001: the marker
    file the planted pickles would create, and the copies."""
    tmp = tmp_path_factory.mktemp("swapped")
    marker = tmp / "pickle-ran"
    roots = []
    for name, (data, fix_manifest) in pickles(marker).items():
        root = tmp / name
        shutil.copytree(sharded_store, root)
        swap_shard(root, data, fix_manifest)
        roots.append(root)
    return marker, roots


def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path: Path) -> None:
    """The payloads create their marker when unpickled, so the marker's absence means something."""
    probe = tmp_path / "probe"
    pickle.loads(pickles(probe)["pickle-planted"][0])
    assert probe.exists()
    probe.unlink()
    torch.load(io.BytesIO(pickles(probe)["torch-save-planted"][0]), weights_only=False)
    assert probe.exists()


def test_a_pickle_swapped_in_for_a_shard_is_refused_by_a_one_process_load(
    swapped: tuple[Path, list[Path]],
) -> None:
    """store.load() of a checkpoint whose shard is a pickle raises CorruptCheckpointError."""
    marker, roots = swapped
    for root in roots:
        with pytest.raises(CorruptCheckpointError, match=r"shard_00001\.safetensors"):
            CheckpointStore(root).load()
        older = CheckpointStore(root).load(0)  # the older step is intact
        assert older["model"]["0.weight"].shape == (30, 8)
    assert not marker.exists(), "a swapped-in pickle was unpickled"


def test_a_pickle_swapped_in_for_a_shard_is_refused_by_a_two_rank_resume(
    swapped: tuple[Path, list[Path]],
) -> None:
    """resume() on two ranks raises CorruptCheckpointError on both, or falls back to step 0."""
    marker, roots = swapped
    results = succeeded(launch("resume", *map(str, roots)))
    assert not marker.exists(), "a swapped-in pickle was unpickled"
    for result in results:
        for root, outcome in zip(roots, result["resumed"], strict=True):
            strict, fallback = outcome["strict"], outcome["fallback"]
            where = f"rank {result['rank']}, {root.name}"
            assert strict.get("error") == "CorruptCheckpointError", (
                f"{where}: resume(fallback=False) raised {strict.get('error')}, not "
                f"CorruptCheckpointError; resume() gave {fallback}: a corrupt shard read "
                "inside dcp.load must count as corrupt on every rank"
            )
            assert "shard_00001.safetensors" in strict["message"], (where, strict)
            assert fallback == {"step": 0}, (where, fallback)  # the older step, on both ranks


# -- 4. an object store ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_run(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any], Any, Path, list[Rank]]:
    """Steps 0-2 saved sharded into ``s3://bucket/prefix`` on two ranks; rank 0's shard write
    of step 1 raises once and step 1 is saved again: url, options, client, dumps, ranks."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = f"ckpt-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    url = f"s3://{bucket}/prefix"
    out = tmp_path_factory.mktemp("s3") / "out"
    out.mkdir()
    ranks = launch(
        "train", url, str(out), "--steps", "0", "3", "--fail", "0", "1",
        "--storage-options", json.dumps(options),
    )  # fmt: skip
    return url, options, client, out, ranks


def keys(client: Any, url: str) -> list[str]:
    """Every object key under the store's prefix, relative to it."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))


def test_a_sharded_save_into_s3_loads_in_one_process_and_lists_each_ranks_shard(
    s3_run: tuple[str, dict[str, Any], Any, Path, list[Rank]],
) -> None:
    """Two ranks save into s3://bucket/prefix; one process loads it bit for bit; each rank's
    shard is an object of the checkpoint."""
    url, options, client, out, ranks = s3_run
    for result in succeeded(ranks):
        assert result["committed"] == [0, 1, 2]
    store = CheckpointStore(url, storage_options=options)
    assert [r.step for r in store.records()] == [0, 1, 2]
    for step in (0, 2):
        assert_loads_as_dumped(store, step, out / f"step_{step}.npz")
    assert store.verify().step == 2
    listed = set(keys(client, url))
    for record in store.records():
        for rank in (0, 1):
            assert f"{record.directory}/{shard_file_name(rank)}" in listed
        assert {f"{record.directory}/{f.name}" for f in record.files} <= listed


def test_a_failed_sharded_save_into_s3_leaves_no_object_behind(
    s3_run: tuple[str, dict[str, Any], Any, Path, list[Rank]],
) -> None:
    """After rank 0's shard write fails, every rank deletes what it wrote: only listed objects."""
    url, options, client, _, ranks = s3_run
    succeeded(ranks)
    store = CheckpointStore(url, storage_options=options, read_only=True)
    listed = {"manifest.json"} | {
        f"{r.directory}/{f.name}" for r in store.records() for f in r.files
    }
    leftover = sorted(set(keys(client, url)) - listed)
    assert leftover == [], (
        f"objects of the failed save of step 1 remain: {leftover}; rank 1's joined writer was "
        "never aborted (DCP's CheckpointException is a BaseException, and "
        "adapters/_torch_dist_sharded.py's ShardedIO.save catches only Exception)"
    )
