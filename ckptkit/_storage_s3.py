"""A store in an S3 bucket (or an S3-compatible server), committed by conditional writes.

Layout under ``s3://bucket/prefix``: ``manifest.json``, and each checkpoint's files under
``step_<12 digits>.<18 random digits>/``. There is no lock; the commit protocol is:

1. Upload the checkpoint's files under a fresh name that no manifest lists, each with
   ``If-None-Match: *`` (so even a name collision fails instead of overwriting). Large files go
   up as multipart uploads, a few parts at a time.
2. PUT ``manifest.json`` with ``If-Match: <the ETag read>`` (``If-None-Match: *`` when there was
   no manifest): the commit point. S3 applies it only if nobody committed since; the loser gets
   412 and raises :class:`ManifestConflict`, and its files stay for its retry.
3. Delete what retention dropped.

A crashed writer leaves unlisted ``step_*`` prefixes and incomplete multipart uploads. Without
a lock a live writer's files are unlisted too, so :meth:`S3Storage.sweep` removes only what is
older than ``orphan_grace`` by the server's clock. The server must honour ``If-Match`` and
``If-None-Match`` on PutObject (AWS S3 does since November 2024);
docs/object-store-design.md has what was measured.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from ckptkit._fsio import new_hasher
from ckptkit._manifest import CHECKPOINT_DIR, MANIFEST_NAME, is_checkpoint_file
from ckptkit._s3_client import (
    CONFLICT_STATUSES,
    INSTALL_HINT,
    STORAGE_OPTIONS,
    STREAM_CHUNK,
    as_oserror,
    client_from_options,
    error_parts,
    is_missing,
    server_time,
    translated,
)
from ckptkit._s3_transfer import MIN_PART_SIZE, S3Sink, download, get_range
from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    ManifestConflict,
    ManifestVersion,
    Progress,
    RangeReader,
    Storage,
    UnsafeFileError,
)

__all__ = ["INSTALL_HINT", "MIN_PART_SIZE", "STORAGE_OPTIONS", "S3Storage"]

logger = logging.getLogger("ckptkit")


def _plain_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\\" in name:
        raise UnsafeFileError(f"{name!r} is not a plain file name inside a checkpoint")
    return name


class _S3CheckpointWriter(CheckpointWriter):
    def __init__(self, storage: S3Storage, name: str, *, joined: bool = False) -> None:
        self._s = storage
        self.name = name
        self._joined = joined
        self._sinks: dict[str, S3Sink] = {}

    def create(self, name: str) -> S3Sink:
        key = self._s.key(self.name, _plain_name(name))
        sink = self._sinks[name] = S3Sink(self._s, key)
        return sink

    def finish(self) -> str:
        # S3 acknowledges a PutObject or CompleteMultipartUpload only once the object is
        # durable: nothing is left to sync, and nothing needs renaming.
        unfinished = [n for n, sink in self._sinks.items() if not sink.done]
        if unfinished:
            raise RuntimeError(f"finish() before commit() of {', '.join(unfinished)}")
        return self.name

    def abort(self) -> None:
        for sink in self._sinks.values():
            if not sink.done:
                sink.abort()
        keys = {self._s.key(self.name, n) for n, s in self._sinks.items() if s.done}
        if not self._joined:
            # The files other ranks added through join_checkpoint too: the prefix is this
            # writer's alone, and left behind they would wait for the sweep's grace period.
            keys.update(self._s.list_keys(self._s.key(self.name) + "/"))
        self._s.delete_objects(sorted(keys))


class _S3Range(RangeReader):
    def __init__(self, storage: S3Storage, key: str, size: int, etag: str) -> None:
        self._s = storage
        self._key = key
        self._etag = etag
        self.size = size

    def read_at(self, size: int, offset: int) -> bytearray:
        if offset + size > self.size:
            raise ValueError(
                f"file ends at byte {self.size}, before the {size}-byte read at byte {offset}"
            )
        buf = bytearray(size)
        if size:
            get_range(self._s, self._key, memoryview(buf), offset, self._etag)
        return buf

    def close(self) -> None:
        pass


class _S3CheckpointFiles(CheckpointFiles):
    def __init__(self, storage: S3Storage, directory: str) -> None:
        self._s = storage
        self._directory = directory

    def _key(self, name: str) -> str:
        return self._s.key(self._directory, _plain_name(name))

    def read(
        self, name: str, *, size: int, checksum: str | None, progress: Progress | None = None
    ) -> memoryview:
        algorithm = checksum.partition(":")[0] if checksum is not None else None
        hasher = new_hasher(algorithm) if algorithm is not None else None
        view = download(self._s, self._key(name), size, hasher, progress)
        if hasher is not None and f"{algorithm}:{hasher.hexdigest()}" != checksum:
            raise ValueError("checksum does not match the manifest (the file's bytes changed)")
        return view

    def map(self, name: str, *, size: int, checksum: str | None) -> memoryview:
        # No memory map of a remote object: a private copy, handed out read-only.
        return self.read(name, size=size, checksum=checksum).toreadonly()

    def open(self, name: str) -> RangeReader:
        key = self._key(name)
        with translated(self._s.url_of(key)):
            head = self._s.client.head_object(Bucket=self._s.bucket, Key=key)
        return _S3Range(self._s, key, int(head["ContentLength"]), str(head["ETag"]))

    def checksum(self, name: str, algorithm: str) -> tuple[int, str]:
        hasher = new_hasher(algorithm)
        key = self._key(name)
        size = 0
        with translated(self._s.url_of(key)):
            body = self._s.client.get_object(Bucket=self._s.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                for chunk in body.iter_chunks(STREAM_CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
        return size, f"{algorithm}:{hasher.hexdigest()}"

    def close(self) -> None:
        pass


class S3Storage(Storage):
    """A store under ``s3://bucket/prefix``, for any server with conditional PutObject.

    Two writers never both commit: each commit is one PutObject conditional on the manifest
    the writer read, and the loser raises :class:`ManifestConflict`. Files go up in parallel
    parts and come back in parallel ranged GETs, with memory bounded by
    ``part_size * (max_concurrency + 1)`` while writing.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        storage_options: as for s3fs (and so pandas, Lightning, HF datasets): ``key``,
            ``secret``, ``token``, ``profile``, ``anon``, ``endpoint_url``,
            ``client_kwargs`` (e.g. ``{"endpoint_url": ..., "region_name": ...}``) and
            ``config_kwargs`` (botocore's ``Config``). What is not given comes from the
            environment as boto3 reads it (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...).
        part_size: bytes per part of a multipart upload and per ranged GET (at least 5 MiB,
            S3's minimum); a file smaller than this goes up in one PutObject.
        max_concurrency: parts or ranges in flight at once for one file.
        orphan_grace: seconds an unlisted checkpoint or an unfinished upload must have been
            left untouched, by the server's clock, before :meth:`sweep` removes it. It must
            exceed the longest save, from its first upload to its commit: on AWS an object
            uploaded in parts carries the upload's start as its LastModified.
        client: a boto3 S3 client to use instead of one built from ``storage_options``.

    Raises:
        ImportError: boto3 is not installed (the message gives the pip command).

    Example::

        storage = S3Storage(
            "s3://my-bucket/runs/exp1",
            storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}},
        )
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        part_size: int = 16 << 20,
        max_concurrency: int = 8,
        orphan_grace: float = 6 * 3600,
        client: Any = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is under S3's minimum of {MIN_PART_SIZE}")
        if max_concurrency < 1 or orphan_grace < 0:
            raise ValueError("max_concurrency must be at least 1 and orphan_grace at least 0")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.orphan_grace = orphan_grace
        self.client = client or client_from_options(storage_options or {}, max_concurrency)

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts]) if self.prefix else "/".join(parts)

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- the store as a whole ------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the bucket exists (a prefix needs no creating).

        Credentials limited to the store's prefix may not ``HeadBucket``: then a listing of
        the prefix, which they may, answers instead.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            parts = error_parts(e)
            if is_missing(parts):
                return False
            if parts is not None and parts[1] == 403:
                return self._prefix_listable()
            err = as_oserror(e, f"s3://{self.bucket}")
            if err is None:
                raise
            raise err from e
        return True

    def _prefix_listable(self) -> bool:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)
        except Exception as e:
            parts = error_parts(e)
            if parts is not None and parts[0] == "NoSuchBucket":
                return False
            err = as_oserror(e, self.url_of(self.key("")))
            if err is None:
                raise
            raise err from e
        return True

    def create(self) -> None:
        """Nothing: a prefix exists once an object is under it (buckets are made elsewhere)."""

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        """A context that does nothing: S3 has no lock.

        The conditional PutObject of :meth:`commit_manifest` is the guard: of two writers that
        read the same manifest, one commits and the other gets :class:`ManifestConflict`.
        """
        return contextlib.nullcontext()

    def lock_description(self) -> str:
        return "nothing (S3 stores commit conditionally instead of locking)"

    # -- the manifest --------------------------------------------------------------------------

    def read_manifest(self, cap: int) -> ManifestVersion:
        """The manifest and its ETag, in one GET; ``ValueError`` past ``cap`` before its body."""
        key = self.key(MANIFEST_NAME)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            parts = error_parts(e)
            if is_missing(parts) and parts is not None and parts[0] != "NoSuchBucket":
                return ManifestVersion(None, None)
            err = as_oserror(e, self.url_of(key))
            if err is None:
                raise
            raise err from e
        with contextlib.closing(response["Body"]) as body, translated(self.url_of(key)):
            size = int(response["ContentLength"])
            if size > cap:
                raise ValueError(f"is {size} bytes, over the {cap}-byte cap")
            data = body.read(cap + 1)
        if len(data) > cap:
            raise ValueError(f"is over the {cap}-byte cap")
        return ManifestVersion(bytes(data), str(response["ETag"]))

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        """One PutObject conditional on ``expected``: the commit point.

        A lost race (412, 409, or 404 for a manifest deleted since) raises
        :class:`ManifestConflict` and leaves ``new_checkpoint`` for the retry. A refusal
        (access denied, no such bucket) deletes ``new_checkpoint`` and raises ``OSError``.
        When the outcome is unknown (a 5xx, a lost connection) the manifest is read back: if it
        holds ``data`` the commit happened (a retried PUT sees its own first try as a
        conflict); if not, ``new_checkpoint`` is left for the sweep, since the first try may
        still land, and ``OSError`` is raised.
        """
        key = self.key(MANIFEST_NAME)
        url = self.url_of(key)
        if expected.data is None:
            condition = {"IfNoneMatch": "*"}
        elif isinstance(expected.token, str):
            condition = {"IfMatch": expected.token}
        else:
            raise ValueError(f"{url}: expected manifest has no ETag to commit against")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
            return
        except Exception as e:
            parts = error_parts(e)
            err = as_oserror(e, url)
            if parts is None or err is None:
                raise
            code, status = parts
            conflict = status in CONFLICT_STATUSES or (status == 404 and "IfMatch" in condition)
            known = conflict or 400 <= status < 500
            if not known or conflict:
                with contextlib.suppress(Exception):
                    if self.read_manifest(len(data)).data == data:
                        logger.info("%s: committed, though S3 answered %s", url, code)
                        return
            if conflict:
                raise ManifestConflict(
                    f"{url}: another writer committed since it was read (S3 {code or status})"
                ) from e
            if known and new_checkpoint is not None:
                self.delete_objects(self.list_keys(self.key(new_checkpoint) + "/"))
            elif new_checkpoint is not None:
                err = OSError(
                    err.errno,
                    f"{err.strerror}; the commit may still land, so {new_checkpoint} is left "
                    "for a later sweep",
                )
            raise err from e

    # -- checkpoints -------------------------------------------------------------------------

    def new_checkpoint(self, step: int) -> CheckpointWriter:
        """A writer under ``step_<12 digits>.<18 random digits>``: no rename, no collision."""
        name = f"step_{step:012d}.{secrets.randbelow(10**18):018d}"
        if not CHECKPOINT_DIR.fullmatch(name):
            raise ValueError(f"step {step} does not make a checkpoint name")
        return _S3CheckpointWriter(self, name)

    def join_checkpoint(self, name: str) -> CheckpointWriter:
        if not CHECKPOINT_DIR.fullmatch(name):
            raise ValueError(f"{name!r} is not the name of a checkpoint being written")
        return _S3CheckpointWriter(self, name, joined=True)

    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        """Open a checkpoint after one LIST request says something is under its prefix."""
        if not CHECKPOINT_DIR.fullmatch(directory):
            raise UnsafeFileError(f"{directory!r} is not a checkpoint name")
        prefix = self.key(directory) + "/"
        with translated(self.url_of(prefix)):
            response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        if not response.get("KeyCount"):
            raise FileNotFoundError(
                errno.ENOENT, f"{self.url_of(prefix)}: no object under this checkpoint's prefix"
            )
        return _S3CheckpointFiles(self, directory)

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        """Delete exactly the named objects of the checkpoint, in DeleteObjects batches."""
        self.delete_objects(self.key(directory, _plain_name(n)) for n in names)

    def sweep(self, listed: set[str] | None) -> None:
        """Remove unlisted checkpoints and unfinished uploads older than ``orphan_grace``.

        Age is judged against the server's clock (the Date of the listing's response), so a
        skewed local clock cannot make a live writer's files look abandoned. Unfinished
        multipart uploads are temporaries and go even when ``listed`` is None; checkpoints are
        touched only when a manifest lists what exists, and within one only the store's own
        file names are deleted.
        """
        if listed is not None:
            self._sweep_checkpoints(listed)
        self._sweep_uploads()

    def _sweep_checkpoints(self, listed: set[str]) -> None:
        root = self.key("")
        newest: dict[str, datetime] = {}
        own: dict[str, list[str]] = {}
        now: datetime | None = None
        with translated(self.url_of(root)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                now = now or server_time(page)
                for obj in page.get("Contents", []):
                    directory, _, name = obj["Key"][len(root) :].partition("/")
                    if not CHECKPOINT_DIR.fullmatch(directory) or directory in listed:
                        continue
                    modified: datetime = obj["LastModified"]
                    newest[directory] = max(modified, newest.get(directory, modified))
                    if is_checkpoint_file(name):
                        own.setdefault(directory, []).append(obj["Key"])
        for directory, keys in own.items():
            if now is not None and (now - newest[directory]).total_seconds() >= self.orphan_grace:
                logger.info("%s: removing %s, which the manifest does not list", self, directory)
                self.delete_objects(keys)

    def _sweep_uploads(self) -> None:
        root = self.key("")
        with translated(self.url_of(root)):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                now = server_time(page)
                for upload in page.get("Uploads", []):
                    if not CHECKPOINT_DIR.fullmatch(upload["Key"][len(root) :].partition("/")[0]):
                        continue
                    if now is None or not self._upload_is_stale(upload, now):
                        continue
                    logger.info("%s: aborting an unfinished upload of %s", self, upload["Key"])
                    with contextlib.suppress(Exception):  # finished or aborted meanwhile
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )

    def _upload_is_stale(self, upload: dict[str, Any], now: datetime) -> bool:
        # An upload is abandoned when neither its start nor its newest part is recent: a slow
        # writer that is still sending parts keeps its upload however long ago it began.
        if (now - upload["Initiated"]).total_seconds() < self.orphan_grace:
            return False
        try:
            # Every page of parts: a writer past its thousandth part is judged by its newest.
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            for page in pages:
                for part in page.get("Parts", []):
                    if (now - part["LastModified"]).total_seconds() < self.orphan_grace:
                        return False
        except Exception as e:
            parts_of_error = error_parts(e)
            if parts_of_error is not None and parts_of_error[0] == "NoSuchUpload":
                return False  # finished or aborted since the listing: nothing to do
            raise
        return True

    # -- object helpers (the writer, reader and sweep share them) -------------------------------

    def list_keys(self, prefix: str) -> list[str]:
        with translated(self.url_of(prefix)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def delete_objects(self, keys: Iterable[str]) -> None:
        """Delete exactly ``keys`` (missing ones are no error), 1000 per request."""
        batch: list[str] = []
        for key in [*keys, None]:
            if key is not None:
                batch.append(key)
            if batch and (key is None or len(batch) == 1000):
                with translated(self.url_of(batch[0])):
                    response = self.client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
                for failed in response.get("Errors", []):
                    code = failed.get("Code", "")
                    number = errno.EACCES if code == "AccessDenied" else errno.EIO
                    raise OSError(number, f"{self.url_of(failed['Key'])}: not deleted (S3 {code})")
                batch = []

    def __repr__(self) -> str:
        return f"S3Storage({self.location!r})"
