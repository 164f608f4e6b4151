"""``torch.distributed.checkpoint`` storage classes that write safetensors and JSON, never pickle.

DCP decides which rank writes which chunk of which tensor (its save planner) and which chunks
each rank needs to fill its own tensors (its load planner, which reshards to any world
size); these classes only move the bytes. DCP's own ``FileSystemWriter`` writes its metadata
with ``pickle`` and its reader unpickles it, and it turns any non-tensor value into pickled
bytes: here every rank writes its chunks into one ``shard_<rank>.safetensors`` through the
store's storage (local or object store), the coordinator turns DCP's metadata into the JSON
index of ``ckptkit/_sharded.py``, and reading builds DCP's metadata back from that index.
Non-tensor values never reach DCP (the caller keeps them in ``state.json``), so a ``BYTE_IO``
item is refused rather than pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptkit._errors import CorruptCheckpointError, UnsupportedStateError
from ckptkit._hashing import HashingWriter
from ckptkit._manifest import shard_file_name
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._safetensors import dtype_code, numpy_dtype, write_safetensors
from ckptkit._safetensors_read import parse_safetensors
from ckptkit._sharded import ShardChunk, ShardedTensor, ShardIndex
from ckptkit._storage import CheckpointFiles, CheckpointWriter

from ._torch_convert import array_to_tensor, tensor_to_array


@dataclass(frozen=True)
class ChunkLocation:
    """Where one written chunk is: its file (with the file's size and checksum) and name."""

    file: str
    name: str
    file_size: int
    checksum: str


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _chunk_name(fqn: str, offsets: tuple[int, ...]) -> str:
    return f"{fqn}@{','.join(map(str, offsets))}"


class ShardWriter(StorageWriter):
    """One rank's DCP storage writer: its chunks into ``shard_<rank>.safetensors``.

    After ``dcp.save`` returns, :attr:`metadata` and :attr:`results` hold what DCP gave the
    coordinator (None on the other ranks).
    """

    def __init__(self, writer: CheckpointWriter, rank: int) -> None:
        super().__init__()
        self._writer = writer
        self._rank = rank
        self.metadata: Metadata | None = None
        self.results: list[list[WriteResult]] | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        self.metadata = self.results = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        arrays = {}
        written = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                raise UnsupportedStateError(
                    f"{fqn}: a non-tensor value reached the sharded writer, which never pickles; "
                    "keep non-tensor values out of the tensors given to it"
                )
            tensor = planner.resolve_data(item)
            assert isinstance(tensor, torch.Tensor)
            offsets = tuple(item.index.offset or ())
            name = _chunk_name(fqn, offsets)
            arrays[name] = tensor_to_array(tensor.detach().contiguous(), (fqn,))
            written.append((item, name, arrays[name].nbytes))
        if not arrays:
            return _done([])
        file = shard_file_name(self._rank)
        out = HashingWriter(self._writer.create(file))
        try:
            write_safetensors(out, arrays)
            out.commit()
        except BaseException:
            out.abort()
            raise
        return _done(
            [
                WriteResult(
                    index=item.index,
                    size_in_bytes=nbytes,
                    storage_data=ChunkLocation(file, name, out.size, out.checksum),
                )
                for item, name, nbytes in written
            ]
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.metadata, self.results = metadata, results

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def storage_meta(self) -> None:
        return None


def build_index(
    metadata: Metadata,
    results: list[list[WriteResult]],
    paths: Mapping[str, tuple[str | int, ...]],
    world_size: int,
) -> tuple[ShardIndex, tuple[FileEntry, ...]]:
    """The JSON index of what DCP wrote, and the entries of every rank's shard file."""
    where: dict[MetadataIndex, ChunkLocation] = {}
    files: dict[str, FileEntry] = {}
    for rank_results in results:
        for result in rank_results:
            loc = result.storage_data
            assert isinstance(loc, ChunkLocation)
            where[result.index] = loc
            files[loc.file] = FileEntry(name=loc.file, size=loc.file_size, checksum=loc.checksum)
    tensors = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise UnsupportedStateError(f"{key}: DCP planned a non-tensor value; nothing pickles")
        code = dtype_code(tensor_to_array(torch.empty(0, dtype=md.properties.dtype)).dtype)
        assert code is not None
        chunks = []
        for chunk in md.chunks:
            loc = where[MetadataIndex(key, chunk.offsets)]
            chunks.append(
                ShardChunk(
                    offsets=tuple(chunk.offsets),
                    sizes=tuple(chunk.sizes),
                    file=loc.file,
                    name=loc.name,
                )
            )
        tensors[key] = ShardedTensor(
            key=key, path=paths[key], dtype=code, shape=tuple(md.size), chunks=tuple(chunks)
        )
    return ShardIndex(world_size=world_size, tensors=tensors), tuple(
        files[name] for name in sorted(files)
    )


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    return array_to_tensor(np.empty(0, dtype=numpy_dtype(code))).dtype


class ShardReader(StorageReader):
    """One rank's DCP storage reader over a committed sharded checkpoint.

    DCP's metadata is built from the JSON index; each shard file a rank needs is read once,
    whole, with its size (and, with ``verify``, its checksum) checked against the manifest.
    """

    def __init__(
        self,
        files: CheckpointFiles,
        record: CheckpointRecord,
        index: ShardIndex,
        *,
        verify: bool,
        where: str,
    ) -> None:
        super().__init__()
        self._files = files
        self._entries = {f.name: f for f in record.files}
        self._index = index
        self._verify = verify
        self._where = where
        self._locations: dict[MetadataIndex, ShardChunk] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        state_dict_metadata: dict[str, Any] = {}
        for key, t in self._index.tensors.items():
            state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=torch_dtype(t.dtype)),
                size=torch.Size(t.shape),
                chunks=[
                    ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
                    for c in t.chunks
                ],
            )
            for c in t.chunks:
                self._locations[MetadataIndex(key, c.offsets)] = c
        return Metadata(state_dict_metadata=state_dict_metadata, storage_data=None)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *a: Any, **k: Any
    ) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            chunk = self._locations[item.storage_index]
            by_file.setdefault(chunk.file, []).append((item, chunk))
        for file, items in sorted(by_file.items()):
            source = f"{self._where}/{file}"
            entry = self._entries.get(file)
            if entry is None:
                raise CorruptCheckpointError(f"{source}: not listed in the manifest")
            checksum = entry.checksum if self._verify else None
            try:
                buf = self._files.read(file, size=entry.size, checksum=checksum)
            except ValueError as e:
                raise CorruptCheckpointError(f"{source}: {e}") from None
            arrays, _ = parse_safetensors(buf, source=source)
            for item, chunk in items:
                array = arrays.get(chunk.name)
                if array is None or array.shape != chunk.sizes:
                    raise CorruptCheckpointError(
                        f"{source}: has no tensor {chunk.name!r} of shape {list(chunk.sizes)}, "
                        "which the index names"
                    )
                src = array_to_tensor(array)
                for dim, (start, length) in enumerate(
                    zip(item.storage_offsets, item.lengths, strict=True)
                ):
                    src = src.narrow(dim, start, length)
                dest = planner.resolve_tensor(item).detach()
                if dest.dtype != src.dtype:
                    raise CorruptCheckpointError(
                        f"{source}: tensor {chunk.name!r} is {src.dtype}, the state's "
                        f"{item.dest_index.fqn} is {dest.dtype}"
                    )
                dest.copy_(src)
                planner.commit_tensor(item, dest)
            del arrays, buf
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True
