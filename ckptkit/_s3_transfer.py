"""Moving bytes to and from S3: multipart uploads in parallel parts, parallel ranged reads.

Memory stays bounded while writing (at most ``max_concurrency`` parts in flight and one filling)
and while reading (one buffer, the size of the file, after its size was checked).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ckptkit._fsio import Hasher
from ckptkit._s3_client import as_oserror, error_parts, read_into, translated
from ckptkit._storage import Progress

if TYPE_CHECKING:
    from ckptkit._storage_s3 import S3Storage

logger = logging.getLogger("ckptkit")

#: S3 refuses a multipart upload whose parts, all but the last, are smaller than this.
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000
# Part n (from 0) is part_size * (1 + n // 1000): 16 MiB parts reach 860 GiB in 10,000 parts,
# and a part stays far under S3's 5 GiB limit.
PARTS_PER_SIZE = 1000


class S3Sink:
    """One file going up: a single PutObject if small, else parts uploaded a few at a time.

    Memory stays bounded: at most ``max_concurrency`` parts are in flight and one fills; a
    ``write`` that finds every slot busy waits for a part to finish.
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._s = storage
        self._key = key
        self._url = storage.url_of(key)
        self._buf = bytearray(storage.part_size)
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[Future[str]] = []
        self._slots = threading.Semaphore(storage.max_concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self.done = False

    def write(self, data: memoryview, /) -> None:
        view = memoryview(data).cast("B")
        if view and not self._buf:
            raise ValueError(f"{self._url}: write after commit or abort")
        while view:
            n = min(len(view), len(self._buf) - self._filled)
            self._buf[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._buf):
                self._send_part(last=False)

    def _send_part(self, *, last: bool) -> None:
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise OSError(
                errno.EFBIG,
                f"{self._url}: over {MAX_PARTS} parts; pass S3Storage a larger part_size",
            )
        with translated(self._url):
            if self._upload_id is None:
                self._upload_id = self._s.client.create_multipart_upload(
                    Bucket=self._s.bucket, Key=self._key
                )["UploadId"]
            for failed in (f for f in self._parts if f.done() and f.exception()):
                failed.result()  # stop at the first failed part, not at commit
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._s.max_concurrency, "ckptkit-s3-put")
        data = self._buf[: self._filled] if self._filled < len(self._buf) else self._buf
        self._slots.acquire()
        future = self._pool.submit(self._upload_part, number, data)
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)
        size = self._s.part_size * (1 + len(self._parts) // PARTS_PER_SIZE)
        self._buf = bytearray(0 if last else size)
        self._filled = 0

    def _upload_part(self, number: int, data: bytearray) -> str:
        response = self._s.client.upload_part(
            Bucket=self._s.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        return str(response["ETag"])

    def commit(self) -> None:
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._close()
        self.done = True

    def _finish(self) -> None:
        with translated(self._url):
            if self._upload_id is None:
                self._s.client.put_object(
                    Bucket=self._s.bucket,
                    Key=self._key,
                    Body=bytes(self._buf[: self._filled]),
                    IfNoneMatch="*",
                )
            else:
                if self._filled:
                    self._send_part(last=True)
                parts = [
                    {"PartNumber": i, "ETag": f.result()} for i, f in enumerate(self._parts, 1)
                ]
                self._s.client.complete_multipart_upload(
                    Bucket=self._s.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )

    def abort(self) -> None:
        self._close()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._s.client.abort_multipart_upload(
                    Bucket=self._s.bucket, Key=self._key, UploadId=upload_id
                )
            except Exception as e:
                # The sweep aborts it once it is older than the grace period.
                logger.warning("%s: could not abort its multipart upload: %s", self._url, e)

    def _close(self) -> None:
        for f in self._parts:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buf = bytearray()


def get_range(storage: S3Storage, key: str, view: memoryview, offset: int, etag: str) -> None:
    """Fill ``view`` from ``offset`` of the object, which must still have ``etag``."""
    url = storage.url_of(key)
    try:
        response = storage.client.get_object(
            Bucket=storage.bucket,
            Key=key,
            Range=f"bytes={offset}-{offset + len(view) - 1}",
            IfMatch=etag,
        )
    except Exception as e:
        if error_parts(e) == ("PreconditionFailed", 412):
            raise ValueError("the object was replaced while it was being read") from e
        err = as_oserror(e, url)
        if err is None:
            raise
        raise err from e
    with contextlib.closing(response["Body"]) as body, translated(url):
        got = read_into(body, view)
    if got < len(view):
        raise ValueError(f"file ended {got} bytes into a {len(view)}-byte read at {offset}")


def download(
    storage: S3Storage, key: str, size: int, hasher: Hasher | None, progress: Progress | None
) -> memoryview:
    """The whole object in a fresh buffer, after its size proved to be ``size``.

    The first ranged GET tells the object's size (Content-Range) before the buffer is
    allocated; the other ranges come in parallel into their slices of that buffer, pinned to
    the first response's ETag, and are hashed in order as they complete.
    """
    url = storage.url_of(key)
    first = min(size, storage.part_size)
    try:
        response = storage.client.get_object(
            Bucket=storage.bucket, Key=key, **({"Range": f"bytes=0-{first - 1}"} if size else {})
        )
    except Exception as e:
        if error_parts(e) == ("InvalidRange", 416):  # the object is empty
            raise ValueError(f"size is 0 bytes, the manifest says {size}") from e
        err = as_oserror(e, url)
        if err is None:
            raise
        raise err from e
    with contextlib.closing(response["Body"]) as body, translated(url):
        content_range = response.get("ContentRange")
        actual = int(content_range.rpartition("/")[2]) if content_range else None
        actual = int(response["ContentLength"]) if actual is None else actual
        if actual != size:
            raise ValueError(f"size is {actual} bytes, the manifest says {size}")
        # np.empty, not bytearray: no zero-filling pass over memory about to be overwritten.
        view = memoryview(np.empty(size, dtype=np.uint8).data)
        got = read_into(body, view[:first])
    if got < first:
        raise ValueError(f"file ended after {got} of {size} bytes while reading")
    _account(view[:first], hasher, progress)
    rest = [(o, min(storage.part_size, size - o)) for o in range(first, size, storage.part_size)]
    if not rest:
        return view
    etag = str(response["ETag"])
    with ThreadPoolExecutor(min(storage.max_concurrency, len(rest)), "ckptkit-s3-get") as pool:
        futures = [pool.submit(get_range, storage, key, view[o : o + n], o, etag) for o, n in rest]
        try:
            for (o, n), future in zip(rest, futures, strict=True):
                future.result()
                _account(view[o : o + n], hasher, progress)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return view


def _account(view: memoryview, hasher: Hasher | None, progress: Progress | None) -> None:
    if hasher is not None:
        hasher.update(view)
    if progress is not None:
        progress(len(view))
