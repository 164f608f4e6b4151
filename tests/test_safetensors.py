"""Tests for the streaming safetensors writer and the strict zero-copy parser."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from ckptkit import CorruptCheckpointError, UnsupportedStateError
from ckptkit._safetensors import (
    MAX_HEADER_BYTES,
    dtype_code,
    numpy_dtype,
    write_safetensors,
)
from ckptkit._safetensors_read import parse_safetensors
from tests.strategies import DTYPE_CODES, arrays, assert_same_state

# The dtypes safetensors.numpy itself can turn into numpy arrays.
REFERENCE_NUMPY_CODES = [c for c in DTYPE_CODES if c in safetensors.numpy._TYPES]


def _save(arrays_: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    size = write_safetensors(out, arrays_, metadata)
    assert size == len(out.getvalue())
    return out.getvalue()


def _file(header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _sample(code: str) -> np.ndarray:
    dtype = numpy_dtype(code)
    raw = bytes(range(256)) * dtype.itemsize
    if code == "BOOL":
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dtype).reshape(-1, 4)


@pytest.mark.parametrize("code", DTYPE_CODES)
def test_every_dtype_round_trips_bit_exact(code: str) -> None:
    """Each supported dtype, all 256 byte values included, comes back with the same bytes."""
    array = _sample(code)
    parsed, _ = parse_safetensors(_save({"t": array}), source="f")
    assert_same_state(array, parsed["t"])
    assert dtype_code(array.dtype) == code


@pytest.mark.parametrize("code", DTYPE_CODES)
def test_reference_reader_sees_our_dtype_names_and_bytes(code: str) -> None:
    """The reference parser accepts our file and reports the same dtype code, shape and bytes."""
    array = _sample(code)
    ((name, view),) = safetensors.deserialize(_save({"t": array}))
    assert (name, view["dtype"], list(view["shape"])) == ("t", code, list(array.shape))
    assert bytes(view["data"]) == array.tobytes()


def test_reference_numpy_loader_reads_our_file_and_metadata(tmp_path: Path) -> None:
    """safetensors.numpy loads every dtype it knows from our bytes, and safe_open our metadata."""
    tensors = {f"t.{code}": _sample(code) for code in REFERENCE_NUMPY_CODES}
    data = _save(tensors, {"step": "12", "note": "é"})
    loaded = safetensors.numpy.load(data)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert_same_state(array, loaded[name])
    path = tmp_path / "arrays.safetensors"
    path.write_bytes(data)
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == {"step": "12", "note": "é"}


def test_we_read_reference_numpy_output() -> None:
    """Our parser reads what safetensors.numpy.save writes, tensors and metadata alike."""
    tensors = {f"t.{code}": _sample(code) for code in REFERENCE_NUMPY_CODES}
    tensors["empty"] = np.zeros((0, 3), np.float32)
    tensors["scalar"] = np.array(2.5, np.float64)
    parsed, metadata = parse_safetensors(
        safetensors.numpy.save(tensors, metadata={"k": "v"}), source="ref"
    )
    assert metadata == {"k": "v"}
    assert sorted(parsed) == sorted(tensors)
    for name, array in tensors.items():
        assert_same_state(array, parsed[name])


@given(st.dictionaries(st.text(max_size=5), arrays(), max_size=5))
def test_any_arrays_round_trip(tensors: dict[str, np.ndarray]) -> None:
    """Generated arrays of any dtype, shape and layout come back with identical values."""
    parsed, metadata = parse_safetensors(_save(tensors), source="f")
    assert metadata == {}
    assert sorted(parsed) == sorted(tensors)
    for name, array in tensors.items():
        assert_same_state(array, parsed[name])
        assert parsed[name].flags.c_contiguous


@pytest.mark.parametrize(
    "array",
    [
        np.array(-0.0, np.float32),
        np.zeros((2, 0, 3), ml_dtypes.bfloat16),
        np.arange(12, dtype=np.int16).reshape(3, 4).T,
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(20, dtype=np.uint32)[::3],
        np.arange(6, dtype=ml_dtypes.float8_e4m3fn)[::-1],
    ],
    ids=["0-d", "empty", "transposed", "fortran", "strided", "reversed"],
)
def test_shapes_and_layouts_round_trip(array: np.ndarray) -> None:
    """0-d, empty, transposed, Fortran-order and strided arrays keep shape and values."""
    parsed, _ = parse_safetensors(_save({"a": array}), source="f")
    assert_same_state(array, parsed["a"])


def test_big_endian_array_is_written_little_endian_and_loads_native() -> None:
    """A big-endian array is stored little-endian and loads as the native dtype, same values."""
    array = np.arange(5, dtype=">i4") - 2
    data = _save({"a": array})
    assert data.endswith(struct.pack("<5i", -2, -1, 0, 1, 2))
    parsed, _ = parse_safetensors(data, source="f")
    assert parsed["a"].dtype == np.dtype("<i4")
    assert parsed["a"].tolist() == [-2, -1, 0, 1, 2]


def test_layout_is_aligned_and_padded() -> None:
    """The header is padded to 8 bytes with spaces; each tensor offset is a multiple of itemsize."""
    tensors = {"b": np.ones(3, np.uint8), "a": np.ones(1, np.float64), "c": np.ones(3, np.int16)}
    data = _save(tensors)
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8 : 8 + n])
    assert data[8 : 8 + n].rstrip(b" ").endswith(b"}")
    assert [header[k]["data_offsets"] for k in ("a", "c", "b")] == [[0, 8], [8, 14], [14, 17]]


class _RecordingWriter:
    """A sink that accepts at most ``limit`` bytes per call and records each call's size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.calls: list[int] = []

    def write(self, data: bytes | memoryview) -> int:
        chunk = bytes(memoryview(data)[: self.limit])
        self.calls.append(len(memoryview(data).cast("B")))
        self.data += chunk
        return len(chunk)


def test_writer_gathers_small_tensors_and_streams_large_ones() -> None:
    """Small tensors share one write with the header; a large tensor is written from its memory."""
    small = {"a": np.zeros(1000, np.float32), "b": np.zeros(10, np.int8), "e": np.zeros(0)}
    sink = _RecordingWriter(limit=1 << 30)
    size = write_safetensors(sink, small)
    assert sink.calls == [size]

    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB, over the 1 MiB gathering threshold
    sink = _RecordingWriter(limit=1 << 30)
    size = write_safetensors(sink, {**small, "big": big})
    assert len(sink.calls) == 3 and sink.calls[1] == big.nbytes
    assert sum(sink.calls) == size
    arrays, _ = parse_safetensors(bytes(sink.data), source="mem")
    np.testing.assert_array_equal(arrays["big"], big)
    np.testing.assert_array_equal(arrays["a"], small["a"])

    many = {f"t{i:03d}": np.full(4096, i, np.float64) for i in range(100)}  # 32 KiB each
    sink = _RecordingWriter(limit=1 << 30)
    size = write_safetensors(sink, many)
    assert len(sink.calls) <= 4 and sum(sink.calls) == size
    arrays, _ = parse_safetensors(bytes(sink.data), source="mem")
    assert all(arrays[f"t{i:03d}"][0] == i for i in range(100))


def test_short_writes_are_retried_until_complete() -> None:
    """A sink that takes only a few bytes per call still receives the whole file."""
    tensors = {"a": np.arange(50, dtype=np.float64), "b": np.arange(7, dtype=np.int8)}
    sink = _RecordingWriter(limit=3)
    size = write_safetensors(sink, tensors, {"m": "x"})
    assert bytes(sink.data) == _save(tensors, {"m": "x"})
    assert size == len(sink.data)


def test_parse_is_zero_copy_and_writable_for_bytearray() -> None:
    """Tensors parsed from a bytearray are writable views of it; from bytes they are read-only."""
    data = _save({"a": np.arange(4, dtype=np.int32)})
    buf = bytearray(data)
    parsed, _ = parse_safetensors(buf, source="f")
    parsed["a"][0] = 99
    assert np.frombuffer(buf[-16:], np.int32)[0] == 99
    readonly, _ = parse_safetensors(data, source="f")
    assert not readonly["a"].flags.writeable


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        (
            {"c": np.zeros(2, np.complex128)},
            None,
            "tensor 'c': dtype complex128 has no safetensors",
        ),
        ({"__metadata__": np.zeros(2)}, None, "'__metadata__' is reserved"),
        ({"a": np.zeros(2)}, {"k": 1}, "metadata must map str to str, got 'k': 1"),
        ({"a": np.zeros(2, ml_dtypes.float8_e4m3)}, None, "dtype float8_e4m3 has no safetensors"),
    ],
    ids=["complex128", "reserved-name", "metadata-value", "ieee-float8"],
)
def test_write_rejects_what_the_format_cannot_hold(
    tensors: dict[str, np.ndarray], metadata: dict[str, object] | None, message: str
) -> None:
    """Arrays without a safetensors dtype, the reserved name and non-str metadata are refused."""
    with pytest.raises(UnsupportedStateError, match=message.replace("(", r"\(")):
        write_safetensors(io.BytesIO(), tensors, metadata)  # type: ignore[arg-type]


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CORRUPT = [
    ("short", b"\x01\x00\x00", "truncated: 3 bytes"),
    ("cap", struct.pack("<Q", MAX_HEADER_BYTES + 1), "over the 100000000-byte cap"),
    ("past-end", struct.pack("<Q", 64) + b"{}", "header length 64 runs past the end"),
    ("not-json", _file(None, raw_header=b"{nope"), "header is not valid UTF-8 JSON"),
    ("not-utf8", _file(None, raw_header=b'{"\xff": 1}'), "header is not valid UTF-8 JSON"),
    ("nan-token", _file(None, raw_header=b'{"a": NaN}'), "header is not valid UTF-8 JSON"),
    ("duplicate", _file(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate key 'a'"),
    ("list", _file([1, 2]), "header is a JSON list, not an object"),
    ("entry-keys", _file({"w": {"dtype": "F32", "shape": [1]}}), "tensor 'w': entry must be"),
    ("dtype", _file({"w": _t("F128", [1], 0, 16)}, bytes(16)), "tensor 'w': unknown dtype 'F128'"),
    ("shape", _file({"w": _t("U8", [-1], 0, 0)}), "tensor 'w': shape [-1] is not a list"),
    ("bool-shape", _file({"w": _t("U8", [True], 0, 1)}, b"x"), "tensor 'w': shape [True]"),
    (
        "outside",
        _file({"w": _t("U8", [4], 0, 4)}, bytes(2)),
        "tensor 'w': data_offsets [0, 4] outside the 2-byte data area",
    ),
    (
        "size",
        _file({"w": _t("F32", [3], 0, 8)}, bytes(8)),
        "tensor 'w': 8 bytes at data_offsets [0, 8], but dtype F32 and shape [3] need 12",
    ),
    (
        "overlap",
        _file({"a": _t("U8", [4], 0, 4), "b": _t("U8", [4], 2, 6)}, bytes(6)),
        "tensor 'b' at byte 2 overlaps tensor 'a'",
    ),
    (
        "gap",
        _file({"a": _t("U8", [2], 0, 2), "b": _t("U8", [2], 4, 6)}, bytes(6)),
        "gap of 2 unused bytes before tensor 'b'",
    ),
    (
        "trailing",
        _file({"a": _t("U8", [2], 0, 2)}, bytes(5)),
        "3 trailing bytes after tensor 'a'",
    ),
    (
        "metadata",
        _file({"__metadata__": {"k": 1}}),
        "__metadata__ is not an object of str to str",
    ),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_files_are_refused_with_file_and_tensor_named(data: bytes, message: str) -> None:
    """Each kind of malformed file raises CorruptCheckpointError naming the file and tensor."""
    with pytest.raises(CorruptCheckpointError) as info:
        parse_safetensors(data, source="ckpt/arrays.safetensors")
    assert str(info.value).startswith("ckpt/arrays.safetensors: ")
    assert message in str(info.value)
    assert "load another checkpoint" in str(info.value)


def test_truncated_real_file_is_refused() -> None:
    """Cutting bytes off the end of a valid file is detected as corruption."""
    data = _save({"a": np.arange(8, dtype=np.float32), "b": np.arange(3, dtype=np.int8)})
    with pytest.raises(CorruptCheckpointError, match=r"data_offsets .* outside"):
        parse_safetensors(data[:-5], source="f")


def test_packed_sub_byte_dtype_is_unsupported_not_corrupt() -> None:
    """A valid file with packed F4 tensors is refused with an explanation, not called corrupt."""
    data = _file({"w": _t("F4", [4], 0, 2)}, bytes(2))
    with pytest.raises(UnsupportedStateError, match="packed sub-byte dtype F4"):
        parse_safetensors(data, source="f")


def test_bfloat16_without_ml_dtypes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a bfloat16 tensor when ml_dtypes cannot be imported names the pip command."""
    data = _save({"w": np.ones(2, ml_dtypes.bfloat16)})
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(UnsupportedStateError, match=r"pip install ml_dtypes") as info:
        parse_safetensors(data, source="f")
    assert isinstance(info.value.__cause__, ImportError)
    parsed, _ = parse_safetensors(_save({"w": np.ones(2, np.float32)}), source="f")
    assert parsed["w"].tolist() == [1.0, 1.0]
