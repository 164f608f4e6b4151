"""GCSStorage against a real GCS emulator (fake-gcs-server, in a subprocess on 127.0.0.1).

The contract tests are those tests/test_storage_s3.py runs on S3; the rest check resumable
uploads, generation-pinned ranged reads, the sweep's grace period and the error mapping.
Faults are injected at the HTTP transport (a requests adapter), never by mocking the client.
"""

from __future__ import annotations

import errno
import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import requests

from ckptkit._fsio import new_hasher
from ckptkit._hashing import HashingWriter
from ckptkit._manifest import CHECKPOINT_DIR
from ckptkit._storage import ManifestConflict, ManifestVersion, Storage
from ckptkit._storage_gcs import CHUNK_MULTIPLE, GCSStorage

if TYPE_CHECKING:
    from tests.helpers.gcsserver import GCSBucket


CHUNK = CHUNK_MULTIPLE  # the smallest chunk a resumable upload takes, so tests stay small


def _gcs(bucket: GCSBucket, **kwargs: Any) -> GCSStorage:
    kwargs.setdefault("chunk_size", CHUNK)
    kwargs.setdefault("max_concurrency", 4)
    return GCSStorage(bucket.url(), storage_options=bucket.options, **kwargs)


@pytest.fixture
def make_storage(gcs_bucket: GCSBucket) -> Callable[[], Storage]:
    """A factory of storage objects, each with its own client, that all see one store."""
    return lambda: _gcs(gcs_bucket)


def _write(storage: Storage, step: int, files: dict[str, bytes]) -> tuple[str, dict[str, str]]:
    """Write a checkpoint of ``files``; its name and each file's checksum."""
    writer = storage.new_checkpoint(step)
    sums = {}
    for name, data in files.items():
        out = HashingWriter(writer.create(name))
        out.write(data)
        out.commit()
        sums[name] = out.checksum
    return writer.finish(), sums


def _random(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class _Transport(requests.adapters.HTTPAdapter):
    """The client's real HTTP transport, recording requests and failing chosen ones."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        # (method, fragment of the URL or body, status, send it first?): the next match, once.
        self.faults: list[tuple[str, str, int, bool]] = []

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((request.method, request.url))
        for fault in self.faults:
            method, fragment, status, send_first = fault
            body = request.body if isinstance(request.body, bytes) else b""
            if request.method == method and (fragment in request.url or fragment.encode() in body):
                self.faults.remove(fault)
                if send_first:
                    super().send(request, *args, **kwargs)  # it lands; the answer is lost
                response = requests.Response()
                response.status_code = status
                response.request = request
                response.url = request.url
                response._content = b'{"error": {"code": %d, "message": "injected"}}' % status
                response.headers["Content-Type"] = "application/json"
                return response
        return super().send(request, *args, **kwargs)


def _with_transport(storage: GCSStorage) -> _Transport:
    transport = _Transport()
    storage.client._http.mount("http://", transport)
    return transport


# -- the contract -----------------------------------------------------------------------------


def test_manifest_is_created_once_then_replaced_only_against_the_version_read(make_storage):
    """A first commit needs no manifest to exist; each later one needs the generation it read."""
    storage = make_storage()
    assert storage.read_manifest(1 << 20) == ManifestVersion(None, None)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"again", expected=ManifestVersion(None))
    first = storage.read_manifest(1 << 20)
    assert first.data == b"one" and isinstance(first.token, int)
    storage.commit_manifest(b"two", expected=first)
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"three", expected=first)
    assert make_storage().read_manifest(1 << 20).data == b"two"


@pytest.mark.parametrize("first", [True, False], ids=["create-only", "compare-and-swap"])
def test_two_writers_racing_on_one_version_commit_exactly_once(make_storage, first):
    """Of writers that read the same manifest and commit at once, one wins, the rest conflict."""
    if not first:
        make_storage().commit_manifest(b"base", expected=ManifestVersion(None))
    writers = [make_storage() for _ in range(4)]
    versions = [w.read_manifest(1 << 20) for w in writers]
    names = [_write(w, 7, {"state.json": b"{}"})[0] for w in writers]
    barrier = threading.Barrier(len(writers))
    outcome: dict[int, str] = {}

    def commit(i: int) -> None:
        barrier.wait()
        try:
            writers[i].commit_manifest(
                f"by {i}".encode(), expected=versions[i], new_checkpoint=names[i]
            )
            outcome[i] = "committed"
        except ManifestConflict:
            outcome[i] = "conflict"

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, result in outcome.items() if result == "committed"]
    assert len(winners) == 1 and len(outcome) == len(writers)
    assert make_storage().read_manifest(1 << 20).data == f"by {winners[0]}".encode()
    for name in names:  # the losers' checkpoints stay for their retries
        with make_storage().open_checkpoint(name) as files:
            assert files.checksum("state.json", "sha256")[0] == 2


def test_manifest_over_the_cap_is_refused(make_storage):
    """read_manifest raises ValueError for a manifest larger than the cap."""
    storage = make_storage()
    storage.commit_manifest(b"x" * 100, expected=ManifestVersion(None))
    with pytest.raises(ValueError, match="over the 99-byte cap"):
        storage.read_manifest(99)
    assert storage.read_manifest(100).data == b"x" * 100


def test_files_round_trip_with_their_checksums(make_storage):
    """What a writer commits reads back bit-exactly through read, map, open and checksum."""
    files = {"arrays.safetensors": _random(100_000), "state.json": b'{"a": 1}', "empty": b""}
    name, sums = _write(make_storage(), 3, files)
    with make_storage().open_checkpoint(name) as reader:
        for file, data in files.items():
            got = reader.read(file, size=len(data), checksum=sums[file])
            assert bytes(got) == data and not got.readonly
            mapped = reader.map(file, size=len(data), checksum=sums[file])
            assert bytes(mapped) == data and mapped.readonly
            assert reader.checksum(file, "xxh3_128") == (len(data), sums[file])
        with reader.open("arrays.safetensors") as ranged:
            assert ranged.size == 100_000
            assert ranged.read_at(10, 99_990) == files["arrays.safetensors"][99_990:]
            with pytest.raises(ValueError, match="ends"):
                ranged.read_at(11, 99_990)


def test_size_and_checksum_mismatches_raise_valueerror(make_storage):
    """A size other than the manifest's fails before allocating; a wrong checksum after reading."""
    name, _ = _write(make_storage(), 1, {"state.json": b"0123456789"})
    with make_storage().open_checkpoint(name) as reader:
        # 1 TiB could not be allocated here: ValueError, not MemoryError, shows the order.
        with pytest.raises(ValueError, match="size is 10 bytes, the manifest says 1099511627776"):
            reader.read("state.json", size=1 << 40, checksum=None)
        with pytest.raises(ValueError, match="size is 10 bytes"):
            reader.map("state.json", size=9, checksum=None)
        wrong = "xxh3_128:" + "0" * 32
        with pytest.raises(ValueError, match="checksum does not match"):
            reader.read("state.json", size=10, checksum=wrong)


def test_missing_file_or_checkpoint_is_filenotfounderror(make_storage):
    """A missing checkpoint or file raises FileNotFoundError on every way of reading it."""
    storage = make_storage()
    with pytest.raises(FileNotFoundError):
        storage.open_checkpoint("step_000000000001.123")
    name, _ = _write(storage, 1, {"state.json": b"{}"})
    with storage.open_checkpoint(name) as reader:
        with pytest.raises(FileNotFoundError):
            reader.read("arrays.safetensors", size=2, checksum=None)
        with pytest.raises(FileNotFoundError):
            reader.open("arrays.safetensors")
        with pytest.raises(FileNotFoundError):
            reader.checksum("arrays.safetensors", "sha256")


def test_new_checkpoint_names_are_fresh_and_match_the_directory_pattern(make_storage):
    """Two checkpoints of one step get different names, each a valid checkpoint directory."""
    storage = make_storage()
    a, _ = _write(storage, 12, {"state.json": b"a"})
    b, _ = _write(storage, 12, {"state.json": b"b"})
    assert a != b
    for name in (a, b):
        match = CHECKPOINT_DIR.fullmatch(name)
        assert match is not None and int(match.group(1)) == 12


def test_aborted_writer_leaves_nothing(gcs_bucket):
    """abort() deletes the files a writer committed; the upload it was sending makes no object."""
    storage = _gcs(gcs_bucket)
    writer = storage.new_checkpoint(4)
    done = HashingWriter(writer.create("state.json"))
    done.write(b"{}")
    done.commit()
    storage.open_checkpoint(writer.name).close()
    HashingWriter(writer.create("arrays.safetensors")).write(_random(3 * CHUNK))
    writer.abort()
    gc.collect()  # a resumable writer dropped unclosed would finish its upload here
    assert gcs_bucket.keys() == []


# -- GCS only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [12_345, 0], ids=["ragged", "whole-chunks"])
def test_large_file_goes_up_in_chunks_and_reads_back_in_parallel_ranges(gcs_bucket, extra):
    """A file over the chunk size is a resumable upload of several chunks and round-trips."""
    storage = _gcs(gcs_bucket)
    transport = _with_transport(storage)
    data = _random(3 * CHUNK + extra, seed=1)
    name, sums = _write(storage, 2, {"arrays.safetensors": data, "state.json": b"{}"})
    chunks = [url for method, url in transport.seen if method == "PUT" and "upload_id=" in url]
    assert len(chunks) == 4  # three full chunks, then the rest (or nothing) with the total
    uploads = [url for method, url in transport.seen if method == "POST" and "/upload/" in url]
    assert len(uploads) == 2 and all("ifGenerationMatch=0" in url for url in uploads)
    seen: list[int] = []
    with storage.open_checkpoint(name) as reader:
        got = reader.read(
            "arrays.safetensors",
            size=len(data),
            checksum=sums["arrays.safetensors"],
            progress=seen.append,
        )
    assert bytes(got) == data
    assert seen == [CHUNK, CHUNK, CHUNK] + ([extra] if extra else [])
    h = new_hasher("xxh3_128")
    h.update(data)
    assert sums["arrays.safetensors"] == f"xxh3_128:{h.hexdigest()}"


def test_upload_memory_stays_bounded(gcs_bucket):
    """Writing 32 MiB in 1 MiB chunks never holds more than a few chunks at once."""
    storage = _gcs(gcs_bucket, chunk_size=1 << 20)
    data = np.random.default_rng(2).integers(0, 256, 32 << 20, dtype=np.uint8)
    writer = storage.new_checkpoint(1)
    tracemalloc.start()
    try:
        out = HashingWriter(writer.create("arrays.safetensors"))
        for start in range(0, data.size, 3 << 20):
            out.write(data[start : start + (3 << 20)])
        out.commit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB for a 32 MiB file in 1 MiB chunks"
    with storage.open_checkpoint(writer.finish()) as reader:
        assert reader.checksum("arrays.safetensors", "xxh3_128") == (data.size, out.checksum)


def test_payload_objects_are_create_only(gcs_bucket):
    """A file whose object exists already is refused (412), not overwritten."""
    storage = _gcs(gcs_bucket)
    writer = storage.new_checkpoint(5)
    key = f"store/{writer.name}/state.json"
    gcs_bucket.client.bucket(gcs_bucket.name).blob(key).upload_from_string(b"someone else's")
    out = HashingWriter(writer.create("state.json"))
    out.write(b"{}")
    with pytest.raises(FileExistsError, match="412"):
        out.commit()
    assert gcs_bucket.client.bucket(gcs_bucket.name).blob(key).download_as_bytes() == (
        b"someone else's"
    )


def test_object_replaced_during_a_read_is_valueerror(gcs_bucket):
    """Ranged reads are pinned to the generation opened: a replaced object is not mixed in."""
    storage = _gcs(gcs_bucket)
    name, _ = _write(storage, 1, {"arrays.safetensors": _random(1000)})
    with storage.open_checkpoint(name) as reader, reader.open("arrays.safetensors") as ranged:
        assert len(ranged.read_at(10, 0)) == 10
        blob = gcs_bucket.client.bucket(gcs_bucket.name).blob(f"store/{name}/arrays.safetensors")
        blob.upload_from_string(_random(1000, seed=9))
        with pytest.raises(ValueError, match="changed while it was being read"):
            ranged.read_at(10, 0)


def test_manifest_deleted_since_it_was_read_is_a_conflict(gcs_bucket):
    """A generation precondition on a manifest that no longer exists raises ManifestConflict."""
    storage = _gcs(gcs_bucket)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    version = storage.read_manifest(100)
    gcs_bucket.client.bucket(gcs_bucket.name).blob("store/manifest.json").delete()
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"two", expected=version)


def test_retried_commit_that_already_landed_is_not_a_conflict(gcs_bucket):
    """A 412 on a manifest that already holds exactly this writer's bytes means it committed."""
    storage = _gcs(gcs_bucket)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    version = storage.read_manifest(100)
    storage.commit_manifest(b"two", expected=version)
    storage.commit_manifest(b"two", expected=version)  # as a retry after a lost response
    assert storage.read_manifest(100).data == b"two"


def test_commit_whose_answer_was_lost_is_found_by_reading_back(gcs_bucket):
    """The commit lands but its answer is a 503: the client retries, and the read-back tells."""
    storage = _gcs(gcs_bucket)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    version = storage.read_manifest(100)
    transport = _with_transport(storage)
    transport.faults.append(("POST", "store/manifest.json", 503, True))
    storage.commit_manifest(b"two", expected=version)
    assert not transport.faults  # the fault fired
    assert storage.read_manifest(100).data == b"two"


def test_refused_commit_deletes_the_new_checkpoint_and_keeps_the_manifest(gcs_bucket):
    """A commit GCS refuses raises EACCES naming the URL and status; the new files are deleted."""
    _gcs(gcs_bucket).commit_manifest(b"old", expected=ManifestVersion(None))
    storage = _gcs(gcs_bucket)
    name, _ = _write(storage, 5, {"arrays.safetensors": _random(CHUNK + 1), "state.json": b"{}"})
    assert len(gcs_bucket.keys(f"store/{name}/")) == 2
    _with_transport(storage).faults.append(("POST", "store/manifest.json", 403, False))
    with pytest.raises(PermissionError) as caught:
        storage.commit_manifest(b"new", expected=storage.read_manifest(100), new_checkpoint=name)
    assert caught.value.errno == errno.EACCES
    assert f"gs://{gcs_bucket.name}/store/manifest.json" in str(caught.value)
    assert "GCS 403" in str(caught.value)
    assert gcs_bucket.keys(f"store/{name}/") == []
    assert storage.read_manifest(100).data == b"old"


def test_delete_checkpoint_deletes_only_the_named_objects(gcs_bucket):
    """Objects under the checkpoint's prefix that were not named survive, as do other prefixes."""
    storage = _gcs(gcs_bucket)
    keep, _ = _write(storage, 1, {"state.json": b"{}"})
    drop, _ = _write(storage, 2, {"state.json": b"{}", "arrays.safetensors": b"x"})
    gcs_bucket.client.bucket(gcs_bucket.name).blob(f"store/{drop}/notes.txt").upload_from_string(
        b""
    )
    storage.delete_checkpoint(drop, ["state.json", "arrays.safetensors", "never-written"])
    assert gcs_bucket.keys() == sorted([f"store/{drop}/notes.txt", f"store/{keep}/state.json"])


def test_sweep_removes_only_unlisted_leftovers_older_than_the_grace(gcs_bucket):
    """Unlisted checkpoints go once past the grace; listed ones, and any with listed=None, stay."""
    young = _gcs(gcs_bucket, orphan_grace=3600)
    listed, _ = _write(young, 1, {"state.json": b"{}"})
    orphan, _ = _write(young, 2, {"state.json": b"{}", "arrays.safetensors": b"x"})
    gcs_bucket.client.bucket(gcs_bucket.name).blob(f"store/{orphan}/notes.txt").upload_from_string(
        b""
    )
    young.sweep({listed})
    assert len(gcs_bucket.keys()) == 4  # the orphan may be a live writer's
    old = _gcs(gcs_bucket, orphan_grace=0)
    old.sweep(None)
    assert len(gcs_bucket.keys()) == 4  # no manifest: no checkpoint is touched
    # The server's Date header counts whole seconds: poll until its clock passes the orphan's.
    deadline = time.monotonic() + 5
    while len(gcs_bucket.keys()) > 2 and time.monotonic() < deadline:
        old.sweep({listed})
    assert gcs_bucket.keys() == [f"store/{listed}/state.json", f"store/{orphan}/notes.txt"]


def test_sweep_without_a_server_clock_removes_nothing(gcs_bucket):
    """A client whose responses cannot be seen gives no server time, so nothing is judged old."""
    storage = _gcs(gcs_bucket, orphan_grace=0)
    _write(storage, 1, {"state.json": b"{}"})
    storage._clock.attached = False
    storage.client._http.hooks["response"].clear()
    storage.sweep(set())
    assert len(gcs_bucket.keys()) == 1


def test_storage_options_follow_gcsfs_and_unknown_ones_are_refused(gcs_bucket):
    """endpoint_url/token/project reach the client; an option it would ignore is a TypeError."""
    storage = _gcs(gcs_bucket)
    assert storage.exists()
    assert not GCSStorage("gs://no-such-bucket-here", storage_options=gcs_bucket.options).exists()
    with pytest.raises(TypeError, match="default_block_size"):
        GCSStorage(gcs_bucket.url(), storage_options={"default_block_size": 1})
    with pytest.raises(ValueError, match="token 42"):
        GCSStorage(gcs_bucket.url(), storage_options={**gcs_bucket.options, "token": 42})
    with pytest.raises(ValueError, match="multiple of 262144"):
        GCSStorage(gcs_bucket.url(), storage_options=gcs_bucket.options, chunk_size=100_000)
    with pytest.raises(ValueError, match="gs://bucket/prefix"):
        GCSStorage("s3://bucket/prefix", storage_options=gcs_bucket.options)
    assert (
        storage.describe("step_1", "state.json")
        == f"gs://{gcs_bucket.name}/store/step_1/state.json"
    )


def test_emulator_host_from_the_environment_is_used(gcs_bucket, monkeypatch):
    """Without storage options, STORAGE_EMULATOR_HOST names the server, anonymously."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_bucket.endpoint)
    storage = GCSStorage(gcs_bucket.url())
    storage.commit_manifest(b"m", expected=ManifestVersion(None))
    assert gcs_bucket.keys() == ["store/manifest.json"]


def test_missing_bucket_reads_as_filenotfounderror(gcs_bucket):
    """A bucket that does not exist is FileNotFoundError naming it, not an empty store."""
    storage = GCSStorage("gs://no-such-bucket-here/p", storage_options=gcs_bucket.options)
    with pytest.raises(FileNotFoundError, match=r"gs://no-such-bucket-here/p/manifest\.json"):
        storage.read_manifest(100)


def test_missing_client_names_the_extra(monkeypatch):
    """Without google-cloud-storage the ImportError says which pip command installs it."""
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    with pytest.raises(ImportError, match=r"pip install 'ckptkit-ml\[gcs\]'"):
        GCSStorage("gs://bucket/prefix")
