"""Read the safetensors format strictly: whole files without copying, or a header alone.

Anything a correct writer would not produce is refused with a ``CorruptCheckpointError`` naming
the file and the tensor: a bad header length, a header that is not UTF-8 JSON (bare ``NaN``
tokens and duplicate names included), unknown or packed dtypes, shapes numpy cannot hold or that
disagree with the byte count, tensors that overlap, leave gaps or leave trailing bytes. The
format itself and the writer are in ``_safetensors.py``.
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING

import numpy as np

from ckptkit._errors import CorruptCheckpointError, UnsupportedStateError
from ckptkit._safetensors import (
    _CODE_TO_NAME,
    _METADATA_KEY,
    _PACKED_CODES,
    MAX_HEADER_BYTES,
    numpy_dtype,
)

if TYPE_CHECKING:
    from ckptkit._storage import RangeReader


def _corrupt(source: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{source}: {what}; the file is damaged or not a safetensors file: "
        "restore it from a copy or load another checkpoint"
    )


def reject_constant(token: str) -> object:
    raise ValueError(f"non-standard JSON token {token}")


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would silently keep the last of two same-named tensors.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(buf: memoryview, source: str) -> tuple[dict[str, object], int]:
    if buf.nbytes < 8:
        raise _corrupt(source, f"truncated: {buf.nbytes} bytes, shorter than the 8-byte length")
    (n,) = struct.unpack("<Q", buf[:8])
    _check_header_length(n, buf.nbytes, source)
    return _decode_header(bytes(buf[8 : 8 + n]), source), 8 + n


def _check_header_length(n: int, file_size: int, source: str) -> None:
    if n > MAX_HEADER_BYTES:
        raise _corrupt(source, f"header length {n} is over the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size:
        raise _corrupt(source, f"header length {n} runs past the end of the {file_size}-byte file")


def _decode_header(raw: bytes, source: str) -> dict[str, object]:
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant
        )
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise _corrupt(source, f"header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(source, f"header is a JSON {type(header).__name__}, not an object")
    return header


#: numpy's limits on an array: dimensions, and bytes (its index type is signed 64-bit).
_MAX_DIMS = 64
_MAX_ARRAY_BYTES = 1 << 63


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_info(
    name: str, info: object, data_size: int, source: str
) -> tuple[str, tuple[int, ...], int, int]:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(source, f"{where}: entry must be an object of dtype, shape, data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if isinstance(code, str) and code in _PACKED_CODES:
        raise UnsupportedStateError(
            f"{source}: {where} has packed sub-byte dtype {code}, which numpy cannot view; "
            "read it with the safetensors package of your framework"
        )
    if not isinstance(code, str) or code not in _CODE_TO_NAME:
        raise _corrupt(source, f"{where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(source, f"{where}: shape {_short(shape)} is not a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise _corrupt(
            source, f"{where}: data_offsets {offsets!r} outside the {data_size}-byte data area"
        )
    begin, end = offsets
    expected = math.prod(shape) * numpy_dtype(code).itemsize
    if end - begin != expected:
        raise _corrupt(
            source,
            f"{where}: {end - begin} bytes at data_offsets {offsets!r}, but dtype {code} "
            f"and shape {_short(shape)} need {expected}",
        )
    # With a zero dimension the sizes agree whatever the others are; numpy still refuses these.
    if len(shape) > _MAX_DIMS:
        raise _corrupt(source, f"{where}: {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
    if math.prod(d for d in shape if d) * numpy_dtype(code).itemsize >= _MAX_ARRAY_BYTES:
        raise _corrupt(source, f"{where}: shape {_short(shape)} is too large for any array")
    return code, tuple(shape), begin, end


#: One tensor's place in a file: name, dtype code, shape, begin and end in the data area.
TensorSlot = tuple[str, str, tuple[int, ...], int, int]


def _layout(
    header: dict[str, object], data_size: int, source: str
) -> tuple[list[TensorSlot], dict[str, str]]:
    """Check a parsed header against a data area of ``data_size`` bytes; return the slots."""
    metadata: dict[str, str] = {}
    raw_metadata = header.pop(_METADATA_KEY, None)
    if raw_metadata is not None:
        if not isinstance(raw_metadata, dict) or not all(
            isinstance(v, str) for v in raw_metadata.values()
        ):
            raise _corrupt(source, f"{_METADATA_KEY} is not an object of str to str")
        metadata = raw_metadata

    infos = [(name, *_tensor_info(name, info, data_size, source)) for name, info in header.items()]
    infos.sort(key=lambda info: (info[3], info[4], info[0]))
    covered, previous = 0, "the start of the data area"
    for name, _, _, begin, end in infos:
        if begin < covered:
            raise _corrupt(source, f"tensor {name!r} at byte {begin} overlaps {previous}")
        if begin > covered:
            raise _corrupt(source, f"gap of {begin - covered} unused bytes before tensor {name!r}")
        covered, previous = end, f"tensor {name!r}"
    if covered != data_size:
        raise _corrupt(
            source, f"{data_size - covered} trailing bytes after {previous}, no tensor holds them"
        )
    return infos, metadata


def read_layout(file: RangeReader, *, source: str) -> tuple[list[TensorSlot], int]:
    """Read and check only the header of a safetensors file open for positioned reads.

    Returns the tensor slots (offsets relative to the data area) and where the data area
    starts, so single tensors can be read with positioned reads. Raises as
    :func:`parse_safetensors` does.
    """
    file_size = file.size
    if file_size < 8:
        raise _corrupt(source, f"truncated: {file_size} bytes, shorter than the 8-byte length")
    (n,) = struct.unpack("<Q", file.read_at(8, 0))
    _check_header_length(n, file_size, source)
    try:
        raw = bytes(file.read_at(n, 8))
    except ValueError:
        raise _corrupt(source, f"file ended inside the {n}-byte header") from None
    infos, _ = _layout(_decode_header(raw, source), file_size - 8 - n, source)
    return infos, 8 + n


def tensor_from_bytes(
    buf: bytes | bytearray | memoryview, code: str, shape: tuple[int, ...]
) -> np.ndarray:
    """View ``buf`` (exactly one tensor's bytes) as the tensor's little-endian array."""
    return np.frombuffer(buf, dtype=numpy_dtype(code).newbyteorder("<")).reshape(shape)


def parse_safetensors(
    buf: bytes | bytearray | memoryview, *, source: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a whole safetensors file held in ``buf``, strictly, without copying tensor bytes.

    Every tensor comes back as a view of ``buf`` (writable when ``buf`` is writable, e.g. a
    ``bytearray`` or a writable mmap), so a large file costs no second copy. Anything a
    correct writer would not produce is refused: bad header length, non-JSON header, unknown
    dtype, sizes that disagree with the shape, tensors that overlap, leave gaps, or leave
    trailing bytes.

    Args:
        buf: the complete file contents.
        source: how to name the file in error messages (usually its path).

    Returns:
        ``(arrays, metadata)``: tensor name -> array (little-endian, C order) and the
        ``__metadata__`` mapping (empty if absent).

    Raises:
        CorruptCheckpointError: the bytes are not a valid safetensors file; the message
            names ``source`` and the offending tensor.
        UnsupportedStateError: a tensor's dtype needs ``ml_dtypes`` (not installed) or is a
            packed sub-byte dtype.

    Example:
        >>> import io, numpy as np
        >>> f = io.BytesIO()
        >>> _ = write_safetensors(f, {"w": np.arange(3, dtype=np.int64)}, {"step": "7"})
        >>> arrays, meta = parse_safetensors(f.getvalue(), source="w.safetensors")
        >>> arrays["w"].tolist(), meta
        ([0, 1, 2], {'step': '7'})
    """
    view = memoryview(buf).cast("B")
    header, data_start = _read_header(view, source)
    infos, metadata = _layout(header, view.nbytes - data_start, source)
    arrays: dict[str, np.ndarray] = {}
    for name, code, shape, begin, end in infos:
        dtype = numpy_dtype(code).newbyteorder("<")
        count = (end - begin) // dtype.itemsize
        flat = np.frombuffer(view, dtype=dtype, count=count, offset=data_start + begin)
        arrays[name] = flat.reshape(shape)
    return arrays, metadata
