"""Sharded checkpoints written as the ranks of a distributed save write them, with the core alone.

Each tensor is split along dim 0 as ``torch.chunk`` splits it (rows of ``ceil(n / world_size)``,
the last rank's chunk shorter or absent); rank ``r`` writes its rows of every tensor to
``shard_<r>.safetensors`` through a writer that joined the checkpoint, and rank 0 writes
``shards.json``. No torch is involved, so the core's reading side is tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ckptkit._hashing import HashingWriter
from ckptkit._manifest import SHARD_INDEX, shard_file_name
from ckptkit._record import FileEntry
from ckptkit._safetensors import dtype_code, write_safetensors
from ckptkit._sharded import PathKey, ShardChunk, ShardedTensor, ShardIndex, encode_index
from ckptkit._storage import CheckpointWriter, Storage
from ckptkit._store import CheckpointStore

#: Each sharded tensor by its path in the state tree.
Tensors = Mapping[tuple[PathKey, ...], np.ndarray]


def key_of(path: tuple[PathKey, ...]) -> str:
    """The index key of a sharded tensor: its path joined with ``.``."""
    return ".".join(str(p) for p in path)


def rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of an ``n``-row tensor that ``rank`` holds (empty: start == stop)."""
    size = math.ceil(n / world_size) if n else 0
    start = min(rank * size, n)
    return start, min(start + size, n)


def chunk_name(key: str, offsets: tuple[int, ...]) -> str:
    """The name of a chunk's tensor in its shard file: the key, ``@`` and its offsets."""
    return f"{key}@{','.join(map(str, offsets))}"


def rank_pieces(tensors: Tensors, rank: int, world_size: int) -> dict[str, np.ndarray]:
    """What ``rank`` writes to its shard file: its rows of every tensor, by chunk name."""
    pieces = {}
    for path, array in tensors.items():
        start, stop = rows(array.shape[0], rank, world_size)
        if start < stop:
            offsets = (start,) + (0,) * (array.ndim - 1)
            pieces[chunk_name(key_of(path), offsets)] = array[start:stop]
    return pieces


def index_of(tensors: Tensors, world_size: int) -> ShardIndex:
    """The index of ``tensors`` split across ``world_size`` ranks by :func:`rank_pieces`."""
    entries = {}
    for path, array in tensors.items():
        key = key_of(path)
        chunks = []
        for rank in range(world_size):
            start, stop = rows(array.shape[0], rank, world_size)
            if start < stop:
                offsets = (start,) + (0,) * (array.ndim - 1)
                chunks.append(
                    ShardChunk(
                        offsets=offsets,
                        sizes=(stop - start, *array.shape[1:]),
                        file=shard_file_name(rank),
                        name=chunk_name(key, offsets),
                    )
                )
        code = dtype_code(array.dtype)
        assert code is not None, array.dtype
        entries[key] = ShardedTensor(
            key=key, path=path, dtype=code, shape=array.shape, chunks=tuple(chunks)
        )
    return ShardIndex(world_size=world_size, tensors=entries)


def write_file(writer: CheckpointWriter, name: str, write: Callable[[Any], object]) -> FileEntry:
    """Write one file of a checkpoint through ``write(out)``; return its manifest entry."""
    out = HashingWriter(writer.create(name))
    try:
        write(out)
        out.commit()
    except BaseException:
        out.abort()
        raise
    return FileEntry(name=name, size=out.size, checksum=out.checksum)


def safetensors_of(pieces: Mapping[str, np.ndarray]) -> Callable[[Any], object]:
    """What writes ``pieces`` as a safetensors file, for :func:`write_file`."""
    return lambda out: write_safetensors(out, pieces)


def write_shard(
    storage: Storage, checkpoint: str, rank: int, pieces: Mapping[str, np.ndarray]
) -> FileEntry:
    """What a rank other than 0 does: join the checkpoint, write its shard file, finish."""
    joined = storage.join_checkpoint(checkpoint)
    try:
        entry = write_file(joined, shard_file_name(rank), safetensors_of(pieces))
        joined.finish()
    except BaseException:
        joined.abort()
        raise
    return entry


def shard_files(
    storage: Storage, tensors: Tensors, *, world_size: int = 2
) -> Callable[[CheckpointWriter], tuple[FileEntry, ...]]:
    """The ``extra`` hook of a sharded save of ``tensors``, one rank after another.

    Rank 0 writes through the checkpoint's own writer; every other rank joins it.
    """

    def extra(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
        entries = []
        for rank in range(world_size):
            pieces = rank_pieces(tensors, rank, world_size)
            if rank == 0:
                entries.append(write_file(writer, shard_file_name(0), safetensors_of(pieces)))
            else:
                entries.append(write_shard(storage, writer.name, rank, pieces))
        data = encode_index(index_of(tensors, world_size))
        entries.append(write_file(writer, SHARD_INDEX, lambda out: out.write(data)))
        return tuple(entries)

    return extra


def without(state: Any, tensors: Tensors) -> Any:
    """A copy of ``state`` (dicts and lists) with ``None`` at each sharded tensor's path."""
    if not tensors:
        return state
    heads: dict[PathKey, dict[tuple[PathKey, ...], np.ndarray]] = {}
    for path, array in tensors.items():
        heads.setdefault(path[0], {})[path[1:]] = array
    if isinstance(state, dict):
        copy: Any = dict(state)
    elif isinstance(state, list):
        copy = list(state)
    else:
        raise TypeError(f"cannot place a sharded tensor inside a {type(state).__name__}")
    for head, rest in heads.items():
        copy[head] = None if () in rest else without(copy[head], rest)
    return copy


def save_sharded(
    store: CheckpointStore,
    step: int,
    state: Any,
    tensors: Tensors,
    *,
    world_size: int = 2,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Any:
    """Save ``state`` with ``tensors`` sharded across ``world_size`` ranks; return the record.

    ``state`` holds the tensors at their paths; the replicated part goes to the usual files
    and the sharded tensors, left as ``None`` there, to the shard files.
    """
    return store._save_with_files(
        step,
        without(state, tensors),
        metrics,
        metadata,
        shard_files(store._storage, tensors, world_size=world_size),
        overwrite=overwrite,
    )
