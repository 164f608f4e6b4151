"""Write the safetensors file format directly, streaming and zero-copy; the dtype tables.

Layout of a file: an 8-byte little-endian unsigned length ``n``; ``n`` bytes of UTF-8 JSON
header, padded with spaces so the data area starts on an 8-byte boundary; then the data area.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data area) and may hold ``"__metadata__": {str: str}``. Tensor bytes
are little-endian and C-ordered; the tensors exactly cover the data area.

Why not ``safetensors.numpy``: it cannot write bfloat16/float8 arrays, builds the whole file in
memory, and the store hashes bytes while it writes them. Files written here load with the
reference ``safetensors`` package (and with ``safetensors.torch`` as a state dict).

Byte order: arrays of non-native byte order are written little-endian like every other tensor;
they load as the native-order dtype with identical values. The sub-byte dtypes of the spec
(``F4``, ``F6_E2M3``, ``F6_E3M2``) are packed, which numpy cannot view, so they are refused.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ckptkit._errors import UnsupportedStateError

#: The largest header accepted, the same cap as the reference reader.
MAX_HEADER_BYTES = 100_000_000

_METADATA_KEY = "__metadata__"
#: Tensors smaller than this are written together in buffers of about this size.
_SMALL_TENSOR_BYTES = 1 << 20

#: safetensors dtype code -> numpy dtype name (``ml_dtypes`` names for the narrow floats).
_CODE_TO_NAME: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_NAME_TO_CODE = {name: code for code, name in _CODE_TO_NAME.items()}
_ML_DTYPES_NAMES = frozenset(name for name in _NAME_TO_CODE if not hasattr(np, name))
_PACKED_CODES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})


class _Writer(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


def numpy_dtype(code: str) -> np.dtype[np.generic]:
    """Return the native-order numpy dtype for a safetensors dtype code.

    Raises:
        KeyError: ``code`` is not a dtype this module knows.
        UnsupportedStateError: the dtype needs ``ml_dtypes``, which is not installed.
    """
    name = _CODE_TO_NAME[code]
    if name not in _ML_DTYPES_NAMES:
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError as e:
        raise UnsupportedStateError(
            f"dtype {code} ({name}) needs the ml_dtypes package, which is not installed; "
            "run `pip install ml_dtypes` (or `pip install 'ckptkit-ml[dtypes]'`)"
        ) from e
    scalar_type = getattr(ml_dtypes, name, None)
    if scalar_type is None:
        raise UnsupportedStateError(
            f"dtype {code} ({name}) is missing from the installed ml_dtypes "
            f"{getattr(ml_dtypes, '__version__', '?')}; run `pip install -U ml_dtypes`"
        )
    dtype: np.dtype[np.generic] = np.dtype(scalar_type)
    return dtype


def dtype_code(dtype: np.dtype[np.generic]) -> str | None:
    """Return the safetensors code for ``dtype`` (any byte order), or None if it has none."""
    try:
        return _CODE_OF_DTYPE[dtype]
    except KeyError:
        code = _CODE_OF_DTYPE[dtype] = _find_dtype_code(dtype)
        return code
    except TypeError:  # an unhashable dtype
        return _find_dtype_code(dtype)


#: dtype -> code, filled as dtypes are met (``dtype.name`` is slow, and a state has many arrays).
_CODE_OF_DTYPE: dict[np.dtype[np.generic], str | None] = {}


def _find_dtype_code(dtype: np.dtype[np.generic]) -> str | None:
    code = _NAME_TO_CODE.get(dtype.name)
    if code is None or dtype.fields is not None or dtype.subdtype is not None:
        return None
    try:
        native = numpy_dtype(code)
    except UnsupportedStateError:
        return None
    return code if dtype.newbyteorder("=") == native else None


def data_order(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The names of ``arrays`` in the order their bytes follow each other in the data area."""
    return sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))


class _Run:
    """Bytes of consecutive tensors that lie next to each other in one uint8 buffer."""

    def __init__(self, owner: np.ndarray, begin: int, end: int) -> None:
        self.owner, self.begin, self.end = owner, begin, end

    @classmethod
    def start(cls, flat: np.ndarray) -> _Run | None:
        """Where ``flat`` lies in the 1-d uint8 buffer that owns its memory, if it has one."""
        owner = flat.base
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        if not (
            isinstance(owner, np.ndarray)
            and owner.dtype == np.uint8
            and owner.ndim == 1
            and owner.flags.c_contiguous
        ):
            return None
        begin = flat.ctypes.data - owner.ctypes.data
        return cls(owner, begin, begin + flat.nbytes)

    def extend(self, flat: np.ndarray) -> bool:
        """Add ``flat`` if it starts where the run ends, in the same buffer."""
        if flat.ctypes.data != self.owner.ctypes.data + self.end:
            return False
        place = _Run.start(flat)
        if place is None or place.owner is not self.owner:
            return False
        self.end = place.end
        return True

    def view(self) -> memoryview:
        return self.owner.data[self.begin : self.end]


def supported_dtype_names() -> list[str]:
    """Return the numpy names of every dtype a tensor may have, for error messages."""
    return list(_NAME_TO_CODE)


def _little_endian_c_order(array: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into shape (1,); keep the shape.
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"), order="C")
    elif not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    return array


def _write_all(out: _Writer, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = out.write(view)
        # A raw (unbuffered) file may take fewer bytes than offered; None means all of them.
        if written is None or written >= view.nbytes:
            return
        view = view[written:]


def write_safetensors(
    out: _Writer, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
    """Stream ``arrays`` to ``out`` as one safetensors file; return the number of bytes written.

    Each tensor is written straight from its own memory (a copy only for a non-contiguous or
    big-endian array, one tensor at a time), so the file is never built in memory and the
    caller may hash ``out`` as it is written. Tensors are ordered by itemsize descending, then
    name, so every tensor's offset is a multiple of its itemsize.

    Args:
        out: anything with ``write(bytes-like)``, e.g. a file opened ``"wb"`` or ``io.BytesIO``.
        arrays: tensor name -> numpy array of a dtype the format has (see ``dtype_code``).
        metadata: optional ``str -> str`` stored under ``__metadata__``.

    Returns:
        The file size in bytes.

    Raises:
        UnsupportedStateError: an array's dtype has no safetensors code, a name is
            ``__metadata__``, or metadata is not ``str -> str``.

    Example:
        >>> import io, numpy as np
        >>> write_safetensors(io.BytesIO(), {"w": np.zeros(2, np.float32)})
        72
    """
    entries: list[tuple[int, str, str, np.ndarray]] = []
    for name, array in arrays.items():
        if name == _METADATA_KEY:
            raise UnsupportedStateError(
                f"tensor name {name!r} is reserved by the safetensors format; rename the tensor"
            )
        code = dtype_code(array.dtype)
        if code is None:
            raise UnsupportedStateError(
                f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent; "
                f"convert it to one of {', '.join(supported_dtype_names())}"
            )
        entries.append((-array.dtype.itemsize, name, code, array))
    entries.sort(key=lambda entry: (entry[0], entry[1]))  # the order of data_order()

    header: dict[str, object] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise UnsupportedStateError(
                    f"safetensors metadata must map str to str, got {key!r}: {value!r}; "
                    "convert the values to str (e.g. json.dumps) before writing"
                )
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for _, name, code, array in entries:
        end = offset + array.nbytes
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, end]}
        offset = end
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    # Small tensors are gathered into one buffer, so a state of many small arrays costs a few
    # writes instead of one per tensor; large ones are written from their own memory, and
    # neighbours in one buffer (a save_async snapshot) are written together, in one call.
    pending = bytearray(struct.pack("<Q", len(header_bytes)))
    pending += header_bytes

    def emit(data: memoryview) -> None:
        nonlocal pending
        if len(data) < _SMALL_TENSOR_BYTES:
            pending += data
            if len(pending) >= _SMALL_TENSOR_BYTES:
                _write_all(out, memoryview(pending))
                pending = bytearray()  # a new buffer: the old one may still be being hashed
            return
        if pending:
            _write_all(out, memoryview(pending))
            pending = bytearray()
        _write_all(out, data)

    run: _Run | None = None
    for _, _, _, array in entries:
        if not array.nbytes:
            continue
        flat = _little_endian_c_order(array).reshape(-1).view(np.uint8)
        if run is not None and run.extend(flat):
            continue
        if run is not None:
            emit(run.view())
        run = _Run.start(flat)
        if run is None:
            emit(memoryview(flat.data))
    if run is not None:
        emit(run.view())
    if pending:
        _write_all(out, memoryview(pending))
    return 8 + len(header_bytes) + offset
