"""Object stores: ckptkit's save and load on S3 against boto3's upload_file and download_file.

The server is moto's S3 (``python -m moto.server``), started here on 127.0.0.1 with a port the
system picks and stopped at the end. On loopback there is no network to wait for, so the
figures are what each client costs on top of moving the bytes: ckptkit's hashing, safetensors
encoding, manifest read and conditional commit, against boto3's transfer manager moving one
file of the same bytes. Both use 16 MiB parts and 8 threads.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptkit import CheckpointStore
from ckptkit.bench._machine import remove
from ckptkit.bench._methods import Size, build_state, nested
from ckptkit.bench._report import Row, set_ratios
from ckptkit.bench._timing import Case, Progress, alternate, rounds_text

PART = 16 << 20
THREADS = 8
_READY = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
_START_TIMEOUT = 60.0


def missing() -> str | None:
    """What to install for the S3 group, or None when boto3 and moto's server are there."""
    for module in ("boto3", "moto.server"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return "not available: pip install '.[s3]' 'moto[server]'"
    return None


@contextmanager
def moto_server(work: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 for the length of the block; yields its URL."""
    log = work / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while (match := _READY.search(log.read_text(errors="replace"))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not start:\n{log.read_text()}")
            time.sleep(0.05)  # a bounded poll for the server's start
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_s3(size: Size, work: Path, rounds: int, progress: Progress) -> list[Row]:
    where = f"{size.describe()}, moto on 127.0.0.1, {rounds_text(rounds)}"
    save_group, load_group = f"S3 save, {where}", f"S3 load, {where}"
    rows = [
        Row(group=save_group, section="s3 save", size=size.label, method="boto3 upload_file"),
        Row(group=save_group, section="s3 save", size=size.label, method="ckptkit save"),
        Row(group=load_group, section="s3 load", size=size.label, method="boto3 download_file"),
        Row(group=load_group, section="s3 load", size=size.label, method="ckptkit load"),
    ]
    why = missing()
    if why is not None:
        for row in rows:
            row.status = why
        return rows
    boto3 = importlib.import_module("boto3")
    transfer_config = importlib.import_module("boto3.s3.transfer").TransferConfig

    progress(f"{size.label} S3: building the state, {size.describe()}")
    state = build_state(size)
    tree = nested(state)
    scratch = Path(tempfile.mkdtemp(prefix="s3-", dir=work))
    try:
        with moto_server(scratch) as endpoint:
            options: dict[str, Any] = {
                "key": "bench",
                "secret": "bench",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            )
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            config = transfer_config(
                multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS
            )
            url = f"s3://{bucket}/store"
            store = CheckpointStore(url, storage_options=options)
            # The same bytes as ckptkit's arrays file, for boto3 to move as one file.
            local = CheckpointStore(scratch / "local")
            record = local.save(0, tree)
            source = scratch / "local" / record.directory / "arrays.safetensors"
            target = scratch / "downloaded"

            def save_ckptkit(r: int) -> float:
                start = time.perf_counter()
                store.save(r, tree)
                seconds = time.perf_counter() - start
                CheckpointStore(url, storage_options=options, keep_last=1).prune()
                return seconds

            def save_boto3(r: int) -> float:
                start = time.perf_counter()
                client.upload_file(str(source), bucket, f"boto3/{r}", Config=config)
                seconds = time.perf_counter() - start
                if r:
                    client.delete_object(Bucket=bucket, Key=f"boto3/{r - 1}")
                return seconds

            saves: dict[str, Case] = {"boto3 upload_file": save_boto3, "ckptkit save": save_ckptkit}
            times = alternate(saves, rounds, progress, f"{size.label} S3 save")
            rows[0].samples, rows[1].samples = times["boto3 upload_file"], times["ckptkit save"]
            last = rounds - 1

            def load_ckptkit(r: int) -> float:
                start = time.perf_counter()
                loaded = store.load(last)
                seconds = time.perf_counter() - start
                del loaded
                return seconds

            def load_boto3(r: int) -> float:
                start = time.perf_counter()
                client.download_file(bucket, f"boto3/{last}", str(target), Config=config)
                seconds = time.perf_counter() - start
                target.unlink()
                return seconds

            loads: dict[str, Case] = {
                "boto3 download_file": load_boto3,
                "ckptkit load": load_ckptkit,
            }
            times = alternate(loads, rounds, progress, f"{size.label} S3 load")
            rows[2].samples, rows[3].samples = times["boto3 download_file"], times["ckptkit load"]
            rows[1].extra_bytes = _traced_peak(lambda: store.save(rounds, tree))
            rows[3].extra_bytes = _traced_peak(lambda: store.load(rounds))
            store.close()
    finally:
        remove(scratch)
    for row in rows:
        row.nbytes = size.nbytes
    set_ratios(rows[:2], "boto3 upload_file", "boto3")
    set_ratios(rows[2:], "boto3 download_file", "boto3")
    rows[1].note = rows[3].note = "extra MiB here: tracemalloc's peak in this process"
    if rows[3].extra_bytes is not None:
        rows[3].copies = rows[3].extra_bytes / size.nbytes
    return rows


def _traced_peak(fn: Any) -> int:
    """The peak of Python and numpy allocations while ``fn`` runs (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return int(peak)
