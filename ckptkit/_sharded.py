"""Sharded checkpoints: the index of tensors split across ranks' files, and reading them whole.

A checkpoint saved by several ranks together (``DistributedCheckpointer(..., sharded=True)``)
has, besides the usual ``state.json`` and ``arrays.safetensors`` (the replicated part of the
state, written by rank 0), one ``shard_<rank>.safetensors`` per rank that wrote tensor data
and ``shards.json``, the index. The index lists every sharded tensor by its key (the state's
key path joined with ``.``): the path to its place in the state tree, where ``state.json``
holds a ``null``, its dtype and global shape, and its chunks, each a box of the tensor
(``offsets``, ``sizes``) stored whole as one tensor of a shard file.

Everything here is plain JSON and safetensors, so a sharded checkpoint is read without torch
and without running code: :func:`assemble` puts the chunks of the tensors asked for together
into full arrays, which is how ``store.load()`` and ``store.read_arrays()`` read one. Ranks of
a distributed run read only the chunks they need instead (``adapters/_torch_sharded.py``).

The index's JSON::

    {"format_version": 1, "world_size": 2,
     "tensors": {"model.0.weight": {"path": ["model", "0.weight"], "dtype": "F32",
                                    "shape": [16, 8],
                                    "chunks": [{"offsets": [0, 0], "sizes": [8, 8],
                                                "file": "shard_00000.safetensors",
                                                "name": "model.0.weight@0,0"}, ...]}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptkit._errors import CorruptCheckpointError
from ckptkit._manifest import SHARD_FILE, SHARD_INDEX
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._safetensors import numpy_dtype
from ckptkit._safetensors_read import no_duplicate_keys, parse_safetensors, reject_constant
from ckptkit._storage import CheckpointFiles

INDEX_FORMAT_VERSION = 1
#: The largest index read: about a million chunks.
MAX_INDEX_BYTES = 256 << 20

PathKey = str | int


@dataclass(frozen=True)
class ShardChunk:
    """One box of a tensor, stored whole as tensor ``name`` of shard file ``file``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    name: str


@dataclass(frozen=True)
class ShardedTensor:
    """A tensor whose data is in chunks across shard files."""

    key: str
    path: tuple[PathKey, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ShardChunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ShardIndex:
    """The index of a sharded checkpoint: its sharded tensors by key."""

    world_size: int
    tensors: Mapping[str, ShardedTensor]


def encode_index(index: ShardIndex) -> bytes:
    """The index as the deterministic JSON bytes of ``shards.json``."""
    tensors = {
        key: {
            "path": list(t.path),
            "dtype": t.dtype,
            "shape": list(t.shape),
            "chunks": [
                {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "name": c.name}
                for c in t.chunks
            ],
        }
        for key, t in sorted(index.tensors.items())
    }
    doc = {
        "format_version": INDEX_FORMAT_VERSION,
        "world_size": index.world_size,
        "tensors": tensors,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_index(data: bytes | bytearray | memoryview, *, source: str) -> ShardIndex:
    """Parse ``shards.json`` strictly; anything a correct writer would not write is refused.

    Raises:
        CorruptCheckpointError: naming ``source`` and what is wrong.
    """
    try:
        doc = json.loads(
            bytes(data), object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant
        )
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{source}: not valid JSON ({e})") from None
    try:
        return _index_from_json(doc)
    except KeyError as e:
        raise CorruptCheckpointError(f"{source}: a required field is missing: {e}") from None
    except (ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{source}: {e}") from None


def _is_int(value: object, *, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _int_list(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ValueError(f"{what} {value!r} is not a list of non-negative integers")
    return tuple(value)


def _index_from_json(doc: object) -> ShardIndex:
    if not isinstance(doc, dict):
        raise TypeError("the index must be a JSON object")
    if doc.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(
            f"index format_version {doc.get('format_version')!r} is not one this ckptkit reads "
            f"({INDEX_FORMAT_VERSION}); upgrade ckptkit-ml"
        )
    world_size = doc["world_size"]
    if not _is_int(world_size, minimum=1):
        raise ValueError(f"world_size {world_size!r} is not a positive integer")
    entries = doc["tensors"]
    if not isinstance(entries, dict):
        raise TypeError("'tensors' must be an object")
    tensors = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise TypeError(f"tensor {key!r}: expected an object")
        tensors[key] = _tensor_from_json(key, entry)
    return ShardIndex(world_size=world_size, tensors=tensors)


def _tensor_from_json(key: str, entry: dict[str, Any]) -> ShardedTensor:
    where = f"tensor {key!r}"
    path = entry["path"]
    if (
        not isinstance(path, list)
        or not path
        or not all(isinstance(p, str) or _is_int(p) for p in path)
    ):
        raise ValueError(f"{where}: path {path!r} is not a list of keys and indexes")
    dtype = entry["dtype"]
    try:
        numpy_dtype(dtype)
    except Exception:
        raise ValueError(f"{where}: dtype {dtype!r} is not a safetensors dtype") from None
    shape = _int_list(entry["shape"], f"{where}: shape")
    if not isinstance(entry["chunks"], list):
        raise TypeError(f"{where}: 'chunks' must be a list")
    chunks = []
    covered = 0
    for i, c in enumerate(entry["chunks"]):
        if not isinstance(c, dict):
            raise TypeError(f"{where}: chunk {i} is not an object")
        offsets = _int_list(c["offsets"], f"{where}: chunk {i} offsets")
        sizes = _int_list(c["sizes"], f"{where}: chunk {i} sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise ValueError(f"{where}: chunk {i} has not the tensor's {len(shape)} dimensions")
        if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            raise ValueError(f"{where}: chunk {i} {offsets}+{sizes} lies outside shape {shape}")
        file, name = c["file"], c["name"]
        if not isinstance(file, str) or not SHARD_FILE.fullmatch(file):
            raise ValueError(f"{where}: chunk {i} names file {file!r}, not a shard file")
        if not isinstance(name, str):
            raise TypeError(f"{where}: chunk {i} name {name!r} is not a string")
        covered += math.prod(sizes)
        chunks.append(ShardChunk(offsets=offsets, sizes=sizes, file=file, name=name))
    overlap = _overlap(chunks)
    if overlap is not None:
        raise ValueError(f"{where}: chunks {overlap[0]} and {overlap[1]} overlap")
    # Disjoint boxes inside the shape that hold as many elements as it has cover it exactly.
    if covered != math.prod(shape):
        raise ValueError(
            f"{where}: its chunks hold {covered} elements, its shape {shape} has {math.prod(shape)}"
        )
    return ShardedTensor(key=key, path=tuple(path), dtype=dtype, shape=shape, chunks=tuple(chunks))


def _overlap(chunks: list[ShardChunk]) -> tuple[int, int] | None:
    """The positions of two chunks that share an element, or None when they are disjoint.

    Without this check, two chunks over the same box would make up the element count of a
    tensor whose other box no chunk covers, and loading it would return uninitialised memory.
    A sweep along dim 0 compares only chunks whose rows meet, so chunks split by rows cost
    a sort, not a comparison of every pair.
    """
    boxes = sorted(
        (c.offsets[:1] or (0,), i) for i, c in enumerate(chunks) if all(s > 0 for s in c.sizes)
    )
    active: list[int] = []
    for (start,), i in boxes:
        box = chunks[i]
        active = [j for j in active if _end(chunks[j], 0) > start]
        for j in active:
            other = chunks[j]
            if all(
                a < b + m and b < a + n
                for a, n, b, m in zip(
                    box.offsets, box.sizes, other.offsets, other.sizes, strict=True
                )
            ):
                return min(i, j), max(i, j)
        active.append(i)
    return None


def _end(chunk: ShardChunk, dim: int) -> int:
    """Where a chunk ends along ``dim`` (a 0-d chunk spans one element)."""
    if not chunk.offsets:
        return 1
    return chunk.offsets[dim] + chunk.sizes[dim]


def read_index(
    files: CheckpointFiles, record: CheckpointRecord, *, verify: bool, where: str
) -> ShardIndex:
    """Read and parse a sharded checkpoint's index (its size and checksum checked)."""
    entry = _entry(record, SHARD_INDEX, where)
    if entry.size > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(
            f"{where}/{SHARD_INDEX}: listed as {entry.size} bytes, over the "
            f"{MAX_INDEX_BYTES}-byte cap of the index"
        )
    try:
        data = files.read(SHARD_INDEX, size=entry.size, checksum=entry.checksum if verify else None)
    except ValueError as e:
        raise CorruptCheckpointError(f"{where}/{SHARD_INDEX}: {e}") from None
    index = decode_index(data, source=f"{where}/{SHARD_INDEX}")
    listed = {f.name for f in record.files}
    for tensor in index.tensors.values():
        for chunk in tensor.chunks:
            if chunk.file not in listed:
                raise CorruptCheckpointError(
                    f"{where}/{SHARD_INDEX}: tensor {tensor.key!r} has a chunk in {chunk.file}, "
                    f"which the manifest does not list for step {record.step}"
                )
    return index


def _entry(record: CheckpointRecord, name: str, where: str) -> FileEntry:
    for f in record.files:
        if f.name == name:
            return f
    raise CorruptCheckpointError(f"{where}: the manifest lists no {name} for step {record.step}")


def assemble(
    files: CheckpointFiles,
    record: CheckpointRecord,
    index: ShardIndex,
    keys: Iterable[str],
    *,
    verify: bool,
    where: str,
) -> dict[str, np.ndarray]:
    """The named sharded tensors as whole arrays, put together from their chunks.

    Each shard file that holds a wanted chunk is read once, whole (so its checksum is checked
    with ``verify``), and released before the next.

    Raises:
        CorruptCheckpointError: a file differs from the manifest, does not parse, or lacks a
            chunk the index names, or a chunk's dtype or shape differs from the index.
    """
    wanted = {key: index.tensors[key] for key in keys}
    out = {
        key: np.empty(t.shape, dtype=numpy_dtype(t.dtype).newbyteorder("<"))
        for key, t in wanted.items()
    }
    by_file: dict[str, list[tuple[ShardedTensor, ShardChunk]]] = {}
    for t in wanted.values():
        for chunk in t.chunks:
            by_file.setdefault(chunk.file, []).append((t, chunk))
    for file, chunks in sorted(by_file.items()):
        entry = _entry(record, file, where)
        source = f"{where}/{file}"
        try:
            buf = files.read(file, size=entry.size, checksum=entry.checksum if verify else None)
        except ValueError as e:
            raise CorruptCheckpointError(f"{source}: {e}") from None
        arrays, _ = parse_safetensors(buf, source=source)
        for t, chunk in chunks:
            piece = arrays.get(chunk.name)
            if piece is None:
                raise CorruptCheckpointError(
                    f"{source}: has no tensor {chunk.name!r}, a chunk of {t.key!r} in the index"
                )
            if piece.shape != chunk.sizes or piece.dtype != out[t.key].dtype:
                raise CorruptCheckpointError(
                    f"{source}: tensor {chunk.name!r} is {piece.dtype} {piece.shape}; the index "
                    f"says {t.dtype} {chunk.sizes}"
                )
            box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
            out[t.key][box] = piece
        del arrays, buf
    return out


def place(tree: Any, index: ShardIndex, arrays: Mapping[str, Any], *, source: str) -> None:
    """Put each sharded tensor into the state tree at its path, where ``state.json`` has null."""
    for key, value in arrays.items():
        path = index.tensors[key].path
        node: Any = tree
        try:
            for part in path[:-1]:
                node = node[part]
            last = path[-1]
            # A dict's keys are strings and a list's are indexes: "0" names no list item.
            fits = (isinstance(node, MutableMapping) and isinstance(last, str)) or (
                isinstance(node, MutableSequence) and isinstance(last, int)
            )
            if not fits or node[last] is not None:
                raise KeyError(last)
            node[last] = value
        except (KeyError, IndexError, TypeError):
            raise CorruptCheckpointError(
                f"{source}: sharded tensor {key!r} has path {list(path)}, which is not a null "
                "in the state's tree"
            ) from None
