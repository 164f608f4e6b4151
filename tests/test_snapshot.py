"""SnapshotBuffers: a state copied back to back into one reused buffer, written in few calls."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit._safetensors import data_order, write_safetensors
from ckptkit._snapshot import SnapshotBuffers
from tests.strategies import arrays


class _CountingWriter(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, data: object) -> int:
        self.calls += 1
        return super().write(data)  # type: ignore[arg-type]


def _file(state: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    write_safetensors(out, state)
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), arrays(), max_size=8))
def test_a_snapshot_holds_the_same_values_and_writes_the_same_file(
    state: dict[str, np.ndarray],
) -> None:
    """Every dtype, byte order, layout and 0-d/empty shape: the same bytes on disk as the state."""
    buffers = SnapshotBuffers()
    snapshot = buffers.snapshot(state)
    assert list(snapshot) == data_order(state)
    for name, array in state.items():
        assert snapshot[name].shape == array.shape and snapshot[name].dtype == array.dtype
        assert (
            np.ascontiguousarray(snapshot[name]).tobytes() == np.ascontiguousarray(array).tobytes()
        )
    assert _file(snapshot) == _file(state)
    assert buffers.nbytes == sum(a.nbytes for a in state.values())


def test_arrays_lie_back_to_back_in_the_order_of_the_file() -> None:
    """Each array starts where the one before it in the file ends, so offsets fit their items."""
    state = {
        "b": np.ones(3, np.int8),
        "a": np.ones(5, np.float64),
        "c": np.ones((2, 2), np.float32),
        "z": np.ones((), np.int16),
    }
    snapshot = SnapshotBuffers().snapshot(state)
    names = data_order(state)
    assert names == ["a", "c", "z", "b"]
    start = snapshot[names[0]].ctypes.data
    for name in names:
        assert snapshot[name].ctypes.data == start
        assert start % snapshot[name].dtype.itemsize == 0
        start += snapshot[name].nbytes


def test_a_snapshot_is_written_in_one_call_however_many_tensors_it_has() -> None:
    """Forty 1 MiB tensors from a snapshot: the header, then one write of the whole data area."""
    state = {f"layer{i:02d}": np.full(1 << 18, i, np.float32) for i in range(40)}
    for source, most in ((state, 41), (SnapshotBuffers().snapshot(state), 2)):
        out = _CountingWriter()
        write_safetensors(out, source)
        assert out.calls == most, (most, out.calls)
        assert out.getvalue() == _file(state)


def test_a_new_layout_gets_a_new_buffer_and_the_old_one_is_released() -> None:
    """Same names, shapes and dtypes reuse the buffer; any change replaces it (one state's worth)."""
    buffers = SnapshotBuffers()
    buffers.snapshot({"w": np.zeros(4), "b": np.zeros(2, np.float32)})
    first = buffers._buffer
    buffers.snapshot({"w": np.ones(4), "b": np.ones(2, np.float32)})
    assert buffers._buffer is first
    buffers.snapshot({"w": np.ones(4), "b": np.ones(2, np.float64)})
    assert buffers._buffer is not first and buffers.nbytes == 48
    buffers.clear()
    assert buffers.nbytes == 0
