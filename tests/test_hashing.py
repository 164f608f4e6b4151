"""HashingWriter: the checksum of a file hashed in a second thread while it is written."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit import _hashing
from ckptkit._hashing import OVERLAP_FROM, HashingWriter


class _ListSink:
    """Keeps what it is given; records the thread of each call."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.committed = self.aborted = False

    def write(self, data: memoryview, /) -> None:
        self.data += data
        self.writes += 1

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


def _expected(data: bytes) -> str:
    return f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3 * OVERLAP_FROM), min_size=0, max_size=6), st.integers(0, 2**32))
def test_the_checksum_is_the_serial_hash_of_every_byte_in_order(
    sizes: list[int], seed: int
) -> None:
    """Pieces small and large, inline and in the hashing thread, hash to the serial checksum."""
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    sink = _ListSink()
    out = HashingWriter(sink)
    for piece in pieces:
        out.write(piece)
    out.commit()
    whole = b"".join(p.tobytes() for p in pieces)
    assert bytes(sink.data) == whole
    assert out.size == len(whole)
    assert out.checksum == _expected(whole)


def test_large_files_are_hashed_in_another_thread_than_the_writer(monkeypatch: Any) -> None:
    """Once a file is large, its pieces are hashed off the writing thread (small ones inline)."""
    threads: list[tuple[int, str]] = []
    real = _hashing.new_hasher

    class Recording:
        def __init__(self) -> None:
            self.inner = real("xxh3_128")

        def update(self, data: Any) -> None:
            threads.append((len(data), threading.current_thread().name))
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr(_hashing, "new_hasher", lambda algorithm: Recording())
    out = HashingWriter(_ListSink())
    out.write(b"header")
    out.write(np.zeros(4 * OVERLAP_FROM, np.uint8))
    out.commit()
    me = threading.current_thread().name
    assert threads[0] == (6, me)
    assert threads[1] == (4 * OVERLAP_FROM, "ckptkit-hash")
    assert out.checksum == _expected(b"header" + bytes(4 * OVERLAP_FROM))


def test_the_checksum_is_only_given_after_the_commit() -> None:
    """Reading the checksum of a file still being written is a programming error, said plainly."""
    out = HashingWriter(_ListSink())
    out.write(np.zeros(2 * OVERLAP_FROM, np.uint8))
    with pytest.raises(RuntimeError, match="once the file is committed"):
        _ = out.checksum
    out.abort()


def test_abort_stops_the_hashing_thread() -> None:
    """An aborted file leaves no hashing thread behind, and the sink is aborted."""
    before = {t.ident for t in threading.enumerate()}
    sink = _ListSink()
    out = HashingWriter(sink)
    out.write(np.zeros(2 * OVERLAP_FROM, np.uint8))
    assert any(t.name == "ckptkit-hash" for t in threading.enumerate())
    out.abort()
    assert sink.aborted and not sink.committed
    assert {t.ident for t in threading.enumerate()} <= before


def test_a_failed_hash_fails_the_commit(monkeypatch: Any) -> None:
    """An error raised while hashing in the other thread is raised by commit, not lost."""

    class Broken:
        def update(self, data: Any) -> None:
            raise MemoryError("hash failed")

        def hexdigest(self) -> str:
            raise AssertionError("never reached")

    monkeypatch.setattr(_hashing, "new_hasher", lambda algorithm: Broken())
    out = HashingWriter(_ListSink())
    out.write(np.zeros(2 * OVERLAP_FROM, np.uint8))
    with pytest.raises(MemoryError, match="hash failed"):
        out.commit()
