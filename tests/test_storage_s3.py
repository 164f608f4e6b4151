"""The object-store backends against a real S3 server (moto, in a subprocess) and in memory.

The contract tests run on both S3Storage and MemoryStorage; the S3-only ones check multipart
uploads, ranged reads, the sweep's grace period and the error mapping.
"""

from __future__ import annotations

import errno
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from ckptkit._fsio import new_hasher
from ckptkit._hashing import HashingWriter
from ckptkit._storage import ManifestConflict, ManifestVersion, Storage
from ckptkit._storage_memory import MemoryStorage
from ckptkit._storage_s3 import MIN_PART_SIZE, S3Storage
from tests.helpers.s3server import S3Bucket

PART = MIN_PART_SIZE  # the smallest part S3 (and moto) accepts, so multipart tests stay small


def _s3(bucket: S3Bucket, **kwargs: Any) -> S3Storage:
    kwargs.setdefault("part_size", PART)
    kwargs.setdefault("max_concurrency", 4)
    return S3Storage(bucket.url(), storage_options=bucket.options, **kwargs)


@pytest.fixture(params=["s3", "memory"])
def make_storage(request: pytest.FixtureRequest) -> Iterator[Callable[[], Storage]]:
    """A factory of storage objects that all see one store (one S3 prefix, one memory name)."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        yield lambda: _s3(bucket)
    else:
        url = f"memory://test-{uuid.uuid4().hex}"
        yield lambda: MemoryStorage(url)
        MemoryStorage(url).discard()


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


def _keys(bucket: S3Bucket, prefix: str = "") -> list[str]:
    response = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return sorted(obj["Key"] for obj in response.get("Contents", []))


# -- the contract, on both backends -----------------------------------------------------------


def test_manifest_is_created_once_then_replaced_only_against_the_version_read(make_storage):
    """A first commit needs no manifest to exist; each later one needs the version it read."""
    storage = make_storage()
    assert storage.read_manifest(1 << 20) == ManifestVersion(None, None)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"again", expected=ManifestVersion(None))
    first = storage.read_manifest(1 << 20)
    assert first.data == b"one"
    storage.commit_manifest(b"two", expected=first)
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"three", expected=first)
    assert make_storage().read_manifest(1 << 20).data == b"two"


def test_two_writers_racing_on_one_version_commit_exactly_once(make_storage):
    """Of writers that read the same manifest and commit at once, one wins, the rest conflict."""
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
    with pytest.raises(ValueError, match="100 bytes, over the 99-byte cap"):
        storage.read_manifest(99)


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
    from ckptkit._manifest import CHECKPOINT_DIR

    storage = make_storage()
    a, _ = _write(storage, 12, {"state.json": b"a"})
    b, _ = _write(storage, 12, {"state.json": b"b"})
    assert a != b
    for name in (a, b):
        match = CHECKPOINT_DIR.fullmatch(name)
        assert match is not None and int(match.group(1)) == 12


def test_aborted_writer_leaves_nothing(make_storage):
    """abort() removes the files a writer committed and drops the one it was writing."""
    storage = make_storage()
    writer = storage.new_checkpoint(4)
    done = HashingWriter(writer.create("state.json"))
    done.write(b"{}")
    done.commit()
    storage.open_checkpoint(writer.name).close()
    HashingWriter(writer.create("arrays.safetensors")).write(_random(3 * PART))
    writer.abort()
    with pytest.raises(FileNotFoundError):
        storage.open_checkpoint(writer.name)


# -- S3 only ----------------------------------------------------------------------------------


def test_large_file_goes_up_in_parts_and_reads_back_in_parallel_ranges(s3_bucket):
    """A file over the part size is a multipart upload and round-trips bit-exactly."""
    storage = _s3(s3_bucket)
    data = _random(2 * PART + 12_345, seed=1)
    name, sums = _write(storage, 2, {"arrays.safetensors": data, "state.json": b"{}"})
    key = f"store/{name}/arrays.safetensors"
    assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=key)["ETag"].endswith('-3"')
    small = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"store/{name}/state.json")
    assert "-" not in small["ETag"]  # one PutObject
    seen: list[int] = []
    with storage.open_checkpoint(name) as reader:
        got = reader.read(
            "arrays.safetensors",
            size=len(data),
            checksum=sums["arrays.safetensors"],
            progress=seen.append,
        )
    assert bytes(got) == data
    assert seen == [PART, PART, 12_345]
    h = new_hasher("xxh3_128")
    h.update(data)
    assert sums["arrays.safetensors"] == f"xxh3_128:{h.hexdigest()}"


def test_upload_memory_stays_bounded(s3_bucket):
    """Writing 64 MiB in 5 MiB parts, four in flight, never holds much more than five parts."""
    storage = _s3(s3_bucket)
    data = np.random.default_rng(2).integers(0, 256, 64 << 20, dtype=np.uint8)
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
    assert peak < 40 << 20, f"peak {peak >> 20} MiB for a 64 MiB file"
    with storage.open_checkpoint(writer.finish()) as reader:
        assert reader.checksum("arrays.safetensors", "xxh3_128") == (data.size, out.checksum)


def test_abort_aborts_the_open_multipart_upload(s3_bucket):
    """A writer aborted mid-file leaves no object and no unfinished upload."""
    writer = _s3(s3_bucket).new_checkpoint(9)
    out = HashingWriter(writer.create("arrays.safetensors"))
    out.write(_random(2 * PART))
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")
    writer.abort()
    assert not s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")
    assert _keys(s3_bucket) == []


def test_manifest_deleted_since_it_was_read_is_a_conflict(s3_bucket):
    """If-Match against a manifest that no longer exists raises ManifestConflict."""
    storage = _s3(s3_bucket)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    version = storage.read_manifest(100)
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="store/manifest.json")
    with pytest.raises(ManifestConflict):
        storage.commit_manifest(b"two", expected=version)


def test_retried_commit_that_already_landed_is_not_a_conflict(s3_bucket):
    """A 412 on a manifest that already holds exactly this writer's bytes means it committed."""
    storage = _s3(s3_bucket)
    storage.commit_manifest(b"one", expected=ManifestVersion(None))
    version = storage.read_manifest(100)
    storage.commit_manifest(b"two", expected=version)
    storage.commit_manifest(b"two", expected=version)  # as a retry after a lost response
    assert storage.read_manifest(100).data == b"two"


class _RefusingClient:
    """A real client whose manifest PutObject is refused, as S3 refuses it without permission."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        if kwargs["Key"].endswith("manifest.json"):
            error = {"Code": "AccessDenied", "Message": "Access Denied"}
            raise ClientError(
                {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"
            )
        return self._client.put_object(**kwargs)


def test_refused_commit_deletes_the_new_checkpoint_and_keeps_the_manifest(s3_bucket):
    """A commit S3 refuses raises EACCES naming the URL and code; the new files are deleted."""
    _s3(s3_bucket).commit_manifest(b"old", expected=ManifestVersion(None))
    storage = S3Storage(s3_bucket.url(), client=_RefusingClient(_s3(s3_bucket).client))
    name, _ = _write(storage, 5, {"arrays.safetensors": _random(PART + 1), "state.json": b"{}"})
    assert len(_keys(s3_bucket, f"store/{name}/")) == 2
    with pytest.raises(PermissionError) as caught:
        storage.commit_manifest(b"new", expected=storage.read_manifest(100), new_checkpoint=name)
    assert caught.value.errno == errno.EACCES
    assert f"s3://{s3_bucket.name}/store/manifest.json" in str(caught.value)
    assert "AccessDenied" in str(caught.value)
    assert _keys(s3_bucket, f"store/{name}/") == []
    assert storage.read_manifest(100).data == b"old"


def test_delete_checkpoint_deletes_only_the_named_objects(s3_bucket):
    """Objects under the checkpoint's prefix that were not named survive, as do other prefixes."""
    storage = _s3(s3_bucket)
    keep, _ = _write(storage, 1, {"state.json": b"{}"})
    drop, _ = _write(storage, 2, {"state.json": b"{}", "arrays.safetensors": b"x"})
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"store/{drop}/notes.txt", Body=b"")
    storage.delete_checkpoint(drop, ["state.json", "arrays.safetensors"])
    assert _keys(s3_bucket) == sorted([f"store/{drop}/notes.txt", f"store/{keep}/state.json"])


def test_sweep_removes_only_unlisted_leftovers_older_than_the_grace(s3_bucket):
    """Unlisted checkpoints go once past the grace; listed ones, and any with listed=None, stay."""
    young = _s3(s3_bucket, orphan_grace=3600)
    listed, _ = _write(young, 1, {"state.json": b"{}"})
    orphan, _ = _write(young, 2, {"state.json": b"{}"})
    young.sweep({listed})
    assert len(_keys(s3_bucket)) == 2  # the orphan may be a live writer's
    old = _s3(s3_bucket, orphan_grace=0)
    old.sweep(None)
    assert len(_keys(s3_bucket)) == 2  # no manifest: no checkpoint is touched
    old.sweep({listed})
    assert _keys(s3_bucket) == [f"store/{listed}/state.json"]
    assert orphan != listed


def test_sweep_aborts_unfinished_uploads_past_the_grace(s3_bucket):
    """An upload with a recent part survives the sweep; past the grace it is aborted."""
    writer = _s3(s3_bucket).new_checkpoint(3)
    HashingWriter(writer.create("arrays.safetensors")).write(_random(PART))
    _s3(s3_bucket, orphan_grace=3600).sweep(None)
    assert len(s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name)["Uploads"]) == 1
    _s3(s3_bucket, orphan_grace=0).sweep(None)
    assert not s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")


def test_an_upload_with_a_recent_part_past_the_first_page_of_parts_is_not_swept(
    s3_bucket, monkeypatch
):
    """The sweep judges an old upload by its newest part on every page of parts, not the first."""
    storage = _s3(s3_bucket, orphan_grace=3600)
    now = datetime.now(timezone.utc)
    old, recent = now - timedelta(days=2), now - timedelta(seconds=5)
    pages = [
        {"Parts": [{"PartNumber": n, "LastModified": old} for n in range(1, 1001)]},
        {"Parts": [{"PartNumber": 1001, "LastModified": recent}]},
    ]
    asked = []

    class Paginator:
        def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
            asked.append(kwargs)
            return pages

    monkeypatch.setattr(storage.client, "get_paginator", lambda name: Paginator())
    upload = {
        "Key": "store/step_000000000003.1/arrays.safetensors",
        "UploadId": "u",
        "Initiated": old,
    }
    assert not storage._upload_is_stale(upload, now)
    assert asked == [{"Bucket": s3_bucket.name, "Key": upload["Key"], "UploadId": "u"}]
    pages[1]["Parts"][0]["LastModified"] = old
    assert storage._upload_is_stale(upload, now)


def test_credentials_that_may_not_head_the_bucket_still_open_the_store(s3_bucket, monkeypatch):
    """HeadBucket refused (403, prefix-scoped credentials): a listing of the prefix decides."""
    from botocore.exceptions import ClientError

    storage = _s3(s3_bucket)
    forbidden = {
        "Error": {"Code": "403", "Message": "Forbidden"},
        "ResponseMetadata": {"HTTPStatusCode": 403},
    }

    def head_bucket(**kwargs: Any) -> None:
        raise ClientError(forbidden, "HeadBucket")

    monkeypatch.setattr(storage.client, "head_bucket", head_bucket)
    assert storage.exists()
    missing = S3Storage(
        f"s3://no-such-bucket-{uuid.uuid4().hex}/store", storage_options=s3_bucket.options
    )
    monkeypatch.setattr(missing.client, "head_bucket", head_bucket)
    assert not missing.exists()


def test_missing_credentials_say_which_options_or_variables_to_set(s3_bucket, monkeypatch):
    """Without any AWS credentials the error names the storage_options and the variables."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"client_kwargs": s3_bucket.options["client_kwargs"]}
    storage = S3Storage(s3_bucket.url(), storage_options=options)
    with pytest.raises(PermissionError) as caught:
        storage.read_manifest(1 << 20)
    message = str(caught.value)
    assert "no AWS credentials were found" in message
    assert "'key'" in message and "AWS_ACCESS_KEY_ID" in message and "anon" in message


def test_storage_options_follow_s3fs_and_unknown_ones_are_refused(s3_bucket):
    """key/secret/client_kwargs reach the client; an option it would ignore is a TypeError."""
    storage = _s3(s3_bucket)
    assert storage.exists()
    assert not S3Storage("s3://no-such-bucket-here", storage_options=s3_bucket.options).exists()
    with pytest.raises(TypeError, match="default_block_size"):
        S3Storage(s3_bucket.url(), storage_options={"default_block_size": 1})
    assert (
        storage.describe("step_1", "state.json") == f"s3://{s3_bucket.name}/store/step_1/state.json"
    )


def test_missing_bucket_reads_as_filenotfounderror(s3_bucket):
    """A bucket that does not exist is FileNotFoundError naming it, not an empty store."""
    storage = S3Storage("s3://no-such-bucket-here/p", storage_options=s3_bucket.options)
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-here/p/manifest\.json"):
        storage.read_manifest(100)


def test_missing_boto3_names_the_extra(monkeypatch):
    """Without boto3 the ImportError says which pip command installs it."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ImportError, match=r"pip install 'ckptkit-ml\[s3\]'"):
        S3Storage("s3://bucket/prefix")


# -- memory only ------------------------------------------------------------------------------


def test_memory_stores_of_one_name_share_their_contents():
    """Two MemoryStorage objects of one name see one manifest; another name sees none."""
    url = f"memory://share-{uuid.uuid4().hex}"
    MemoryStorage(url).commit_manifest(b"m", expected=ManifestVersion(None))
    assert MemoryStorage(url).read_manifest(10).data == b"m"
    assert MemoryStorage(url + "-other").read_manifest(10).data is None
    MemoryStorage(url).discard()
    assert MemoryStorage(url).read_manifest(10).data is None


def test_memory_sweep_spares_every_checkpoint_a_live_writer_made():
    """A sweep whose listing predates another writer's commit keeps that writer's checkpoint.

    Four writer threads on one memory:// store lost a committed checkpoint this way: one writer's
    first change read the manifest, another committed, and the sweep took the new checkpoint,
    unlisted in what it had read, for a leftover.
    """
    storage = MemoryStorage(f"memory://sweep-{uuid.uuid4().hex}")
    stale = storage.read_manifest(1 << 20)
    writer = storage.new_checkpoint(1)
    out = HashingWriter(writer.create("state.json"))
    out.write(b"{}")
    out.commit()
    storage.sweep(set())  # while it is being written
    name = writer.finish()
    storage.commit_manifest(b"[]", expected=stale, new_checkpoint=name)
    storage.sweep(set())  # with a listing read before the commit
    storage.open_checkpoint(name).close()
    storage.delete_checkpoint(name, ["state.json"])
    with pytest.raises(FileNotFoundError):
        storage.open_checkpoint(name)
