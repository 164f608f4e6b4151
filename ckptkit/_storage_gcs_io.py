"""A checkpoint's files on GCS: each going up in chunks, and coming back in parallel ranges.

``GCSStorage`` (``_storage_gcs.py``) owns the commit protocol and the object helpers these use.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptkit._fsio import Hasher, new_hasher
from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    Progress,
    RangeReader,
    UnsafeFileError,
)
from ckptkit._storage_gcs_client import as_oserror, status_of, translated

if TYPE_CHECKING:
    from ckptkit._storage_gcs import GCSStorage

logger = logging.getLogger("ckptkit")


def plain_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\\" in name:
        raise UnsafeFileError(f"{name!r} is not a plain file name inside a checkpoint")
    return name


class ViewWriter:
    """A file-like sink for a download that fills ``view`` and refuses to overflow it."""

    def __init__(self, view: memoryview, *, cap_message: str) -> None:
        self.view = view
        self.filled = 0
        self._cap_message = cap_message

    def write(self, data: Any) -> int:
        piece = memoryview(data).cast("B")
        end = self.filled + len(piece)
        if end > len(self.view):
            raise ValueError(self._cap_message)
        self.view[self.filled : end] = piece
        self.filled = end
        return len(piece)


class CappedWriter:
    """A file-like sink for a small download (the manifest) that refuses more than ``cap``."""

    def __init__(self, cap: int) -> None:
        self.data = bytearray()
        self._cap = cap

    def write(self, data: Any) -> int:
        if len(self.data) + len(data) > self._cap:
            raise ValueError(f"is over the {self._cap}-byte cap")
        self.data += data
        return len(data)


class _HashWriter:
    """A file-like sink for a download that only counts and hashes what passes through."""

    def __init__(self, algorithm: str) -> None:
        self.size = 0
        self.hasher = new_hasher(algorithm)

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return len(data)


class GCSSink:
    """One file going up: a single create-only upload if small, else a resumable upload.

    Bytes collect in a chunk-sized buffer. The first full chunk opens a resumable upload
    (``ifGenerationMatch=0``); each full chunk is handed to one upload thread while the next
    fills, so a chunk is sent while the caller serialises and hashes the next. A ``write``
    that finds the thread still busy waits: memory stays at a few chunks (the one filling,
    the one handed over, the client's copy of it and the request body it reads from that).
    """

    def __init__(self, storage: GCSStorage, key: str) -> None:
        self._s = storage
        self._key = key
        self._url = storage.url_of(key)
        self._buf = bytearray(storage.chunk_size)
        self._filled = 0
        self._upload: Any = None  # google.cloud.storage's BlobWriter, once opened
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
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
                self._send_chunk(last=False)

    def _send_chunk(self, *, last: bool) -> None:
        if self._upload is None:
            blob = self._s.bucket.blob(self._key)
            self._upload = blob.open("wb", chunk_size=self._s.chunk_size, if_generation_match=0)
            self._pool = ThreadPoolExecutor(1, "ckptkit-gcs-put")
        assert self._pool is not None
        self._wait()  # one chunk in flight: the resumable protocol sends them in order
        data = self._buf if self._filled == len(self._buf) else self._buf[: self._filled]
        self._pending = self._pool.submit(self._upload.write, data)
        self._buf = bytearray(0 if last else self._s.chunk_size)
        self._filled = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with translated(self._url):
                pending.result()

    def commit(self) -> None:
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._close()
        self.done = True

    def _finish(self) -> None:
        if self._upload is None:
            # One request, create-only: a file of this checkpoint's name exists nowhere yet.
            with translated(self._url):
                self._s.bucket.blob(self._key).upload_from_string(
                    bytes(self._buf[: self._filled]), if_generation_match=0
                )
            return
        if self._filled:
            self._send_chunk(last=True)
        self._wait()
        with translated(self._url):
            self._upload.close()  # sends what is left and finalises the object
        self._upload = None

    def abort(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._close()
        if self._upload is not None:
            upload, self._upload = self._upload, None
            # The writer must be closed without finishing: a BlobWriter that is merely dropped
            # finishes its upload when garbage-collected (io's finaliser calls close()), and a
            # truncated file would appear under the checkpoint's name. terminate() closes it
            # (its DELETE goes to the URL that started the session, not to the session, in
            # google-cloud-storage 3.17.1; the unfinished session expires on its own).
            try:
                upload.terminate()
            except Exception as e:
                logger.warning("%s: could not cancel its resumable upload: %s", self._url, e)
                with contextlib.suppress(Exception):
                    upload._buffer.close()  # what terminate() does after its request

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = None
        self._buf = bytearray()


class GCSCheckpointWriter(CheckpointWriter):
    def __init__(self, storage: GCSStorage, name: str, *, joined: bool = False) -> None:
        self._s = storage
        self.name = name
        self._joined = joined
        self._sinks: dict[str, GCSSink] = {}

    def create(self, name: str) -> GCSSink:
        key = self._s.key(self.name, plain_name(name))
        sink = self._sinks[name] = GCSSink(self._s, key)
        return sink

    def finish(self) -> str:
        # GCS acknowledges an upload only once the object is durable: nothing is left to sync,
        # and nothing needs renaming.
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
        self._s.delete_keys(sorted(keys))


def metadata(s: GCSStorage, key: str) -> tuple[int, int]:
    """The object's size and generation; ``FileNotFoundError`` if it does not exist."""
    with translated(s.url_of(key)):
        blob = s.bucket.get_blob(key)
    if blob is None:
        raise FileNotFoundError(errno.ENOENT, f"{s.url_of(key)}: no such object")
    return int(blob.size), int(blob.generation)


def get_range(s: GCSStorage, key: str, view: memoryview, offset: int, generation: int) -> None:
    """Fill ``view`` from ``offset`` of the object's ``generation`` (ValueError if gone)."""
    out = ViewWriter(view, cap_message=f"more than the {len(view)} bytes asked for")
    blob = s.bucket.blob(key, generation=generation)
    try:
        # No checksum per range: ckptkit checks the whole file's checksum itself.
        end = offset + len(view) - 1
        blob.download_to_file(out, start=offset, end=end, raw_download=True, checksum=None)
    except Exception as e:
        if status_of(e) == 404:
            raise ValueError(
                f"the object changed while it was being read (generation {generation} is gone)"
            ) from e
        err = as_oserror(e, s.url_of(key))
        if err is None:
            raise
        raise err from e
    if out.filled < len(view):
        raise ValueError(f"file ended {out.filled} bytes into a {len(view)}-byte read at {offset}")


def download(
    s: GCSStorage, key: str, size: int, hasher: Hasher | None, progress: Progress | None
) -> memoryview:
    """The whole object in a fresh buffer, after its metadata proved its size is ``size``.

    The ranges come in parallel into their slices of the buffer, each pinned to the generation
    the metadata named, and are hashed in order as they complete.
    """
    actual, generation = metadata(s, key)
    if actual != size:
        raise ValueError(f"size is {actual} bytes, the manifest says {size}")
    # np.empty, not bytearray: no zero-filling pass over memory about to be overwritten.
    view = memoryview(np.empty(size, dtype=np.uint8).data)
    ranges = [(o, min(s.chunk_size, size - o)) for o in range(0, size, s.chunk_size)]
    if not ranges:
        return view
    with ThreadPoolExecutor(min(s.max_concurrency, len(ranges)), "ckptkit-gcs-get") as pool:
        futures = [
            pool.submit(get_range, s, key, view[o : o + n], o, generation) for o, n in ranges
        ]
        try:
            for (o, n), future in zip(ranges, futures, strict=True):
                future.result()
                if hasher is not None:
                    hasher.update(view[o : o + n])
                if progress is not None:
                    progress(n)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return view


class _GCSRange(RangeReader):
    def __init__(self, storage: GCSStorage, key: str, size: int, generation: int) -> None:
        self._s = storage
        self._key = key
        self._generation = generation
        self.size = size

    def read_at(self, size: int, offset: int) -> bytearray:
        if offset + size > self.size:
            raise ValueError(
                f"file ends at byte {self.size}, before the {size}-byte read at byte {offset}"
            )
        buf = bytearray(size)
        if size:
            get_range(self._s, self._key, memoryview(buf), offset, self._generation)
        return buf

    def close(self) -> None:
        pass


class GCSCheckpointFiles(CheckpointFiles):
    def __init__(self, storage: GCSStorage, directory: str) -> None:
        self._s = storage
        self._directory = directory

    def _key(self, name: str) -> str:
        return self._s.key(self._directory, plain_name(name))

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
        size, generation = metadata(self._s, key)
        return _GCSRange(self._s, key, size, generation)

    def checksum(self, name: str, algorithm: str) -> tuple[int, str]:
        key = self._key(name)
        size, generation = metadata(self._s, key)
        out = _HashWriter(algorithm)
        if size:
            blob = self._s.bucket.blob(key, generation=generation)
            with translated(self._s.url_of(key)):
                blob.download_to_file(out, raw_download=True, checksum=None)
        if out.size != size:
            raise OSError(errno.EIO, f"{self._s.url_of(key)}: {out.size} of {size} bytes came")
        return size, f"{algorithm}:{out.hasher.hexdigest()}"

    def close(self) -> None:
        pass
