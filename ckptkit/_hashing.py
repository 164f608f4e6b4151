"""HashingWriter: a file being written, hashed in a second thread while its bytes go out.

A checkpoint's checksum covers every byte of its files. Hashing each piece before writing it
puts the hash on the save's critical path (xxh3 at ~12 GiB/s adds about 8 ms per 100 MiB).
Instead, once a file reaches :data:`OVERLAP_FROM` bytes, each piece is handed to a hashing
thread and written at once: the hash of piece k runs while piece k is copied into the page
cache, and the last pieces are hashed while the file is fsynced. ``xxhash`` and ``hashlib``
release the GIL on buffers this large, and so does ``os.write``, so the two run on two cores.
Small files (``state.json``, the manifest) are hashed inline: a thread would cost more than
their hash.

The pieces are hashed in order by one thread, so the checksum is the one a serial hash gives.
A piece is read again by that thread after ``write`` returns: what is given to ``write`` must
not change until :meth:`HashingWriter.commit` or :meth:`HashingWriter.abort` returns (the
safetensors writer and the store's callers hand over arrays and bytes they no longer change).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import TYPE_CHECKING, Any

from ckptkit._fsio import CHECKSUM_ALGORITHM, CHUNK, Hasher, new_hasher

if TYPE_CHECKING:
    from ckptkit._storage import Progress, Sink

#: A file's hashing moves to its own thread once this many bytes have been written.
OVERLAP_FROM = 1 << 20
#: The largest piece written or hashed at once (a progress bar moves between pieces).
PIECE = CHUNK


class _HashThread:
    """Hashes the pieces it is given, in order, in its own thread."""

    def __init__(self, hasher: Hasher) -> None:
        self._hasher = hasher
        self._pieces: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        # A daemon: commit() and abort() always join it; nothing is left running at exit.
        self._thread = threading.Thread(target=self._run, name="ckptkit-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            if self._error is None:
                try:
                    self._hasher.update(piece)
                except BaseException as e:  # raised by finish() in the writer's thread
                    self._error = e

    def put(self, piece: memoryview) -> None:
        self._pieces.put(piece)

    def finish(self) -> None:
        """Wait until every piece is hashed; raise what hashing raised."""
        self._pieces.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class HashingWriter:
    """A file being written that counts and hashes every byte on its way to a :class:`Sink`.

    ``write`` accepts anything exposing the buffer protocol (the safetensors writer gives it
    arrays' memory) and must not be handed bytes that change before the file is committed or
    aborted (see the module docstring). :attr:`checksum` is ready after :meth:`commit`.
    """

    def __init__(self, sink: Sink, *, progress: Progress | None = None) -> None:
        self.size = 0
        self._sink = sink
        self._progress = progress
        self._hash: Hasher = new_hasher(CHECKSUM_ALGORITHM)
        self._thread: _HashThread | None = None
        self._digest: str | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._thread is None and self.size + len(view) >= OVERLAP_FROM:
            self._thread = _HashThread(self._hash)
        # In pieces, so a progress bar moves during one large tensor, and hashing of one piece
        # overlaps the write of the next.
        for start in range(0, len(view), PIECE):
            piece = view[start : start + PIECE]
            if self._thread is not None:
                self._thread.put(piece)
            else:
                self._hash.update(piece)
            self._sink.write(piece)
            if self._progress is not None:
                self._progress(len(piece))
        self.size += len(view)
        return len(view)

    @property
    def checksum(self) -> str:
        if self._digest is None:
            raise RuntimeError("the checksum of a file is known once the file is committed")
        return f"{CHECKSUM_ALGORITHM}:{self._digest}"

    def commit(self) -> None:
        """Make the file durable (its sink's commit) while the last pieces are hashed."""
        self._sink.commit()
        self._join()
        self._digest = self._hash.hexdigest()

    def abort(self) -> None:
        try:
            self._sink.abort()
        finally:
            # The failure being handled is the one to report, not the hash's.
            with contextlib.suppress(Exception):
                self._join()

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.finish()
