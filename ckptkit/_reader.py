"""Reading one committed checkpoint back into its state tree.

Everything read here is treated as untrusted: the storage opens the checkpoint and its files
without following links and checks sizes against the manifest before anything is allocated,
``state.json`` has a size cap, and the parsers refuse anything a correct writer would not
produce. Nothing here knows what medium the files are on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from ckptkit._errors import CorruptCheckpointError, TensorNotFoundError
from ckptkit._progress import Update
from ckptkit._record import CheckpointRecord
from ckptkit._safetensors_read import (
    TensorSlot,
    no_duplicate_keys,
    parse_safetensors,
    read_layout,
    reject_constant,
    tensor_from_bytes,
)
from ckptkit._sharded import ShardIndex, assemble, place, read_index
from ckptkit._storage import CheckpointFiles, RangeReader, Storage, UnsafeFileError
from ckptkit._tree_read import unflatten_state

STATE_FORMAT_VERSION = 1

#: The largest ``state.json`` read or written: the skeleton and the non-array leaves. Large
#: numeric data belongs in arrays, which have no such cap.
MAX_STATE_JSON_BYTES = 256 << 20


def _corrupt(path: str, problem: object, step: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {problem}; step {step} is corrupt: load another step, or pass fallback=True "
        "to load the newest checkpoint that verifies"
    )


def _open_checkpoint(storage: Storage, record: CheckpointRecord) -> CheckpointFiles:
    try:
        return storage.open_checkpoint(record.directory)
    except UnsafeFileError as e:
        raise _corrupt(storage.describe(record.directory), e, record.step) from None


def read_state(
    storage: Storage,
    record: CheckpointRecord,
    *,
    verify: bool,
    mmap: bool = False,
    progress: Update | None = None,
    shards: bool = True,
) -> Any:
    """Read, check and decode one checkpoint's files.

    A sharded checkpoint's tensors are put together whole into the tree (``_sharded.py``);
    with ``shards=False`` they are left as the nulls ``state.json`` holds, for a caller that
    reads them chunk by chunk.

    Sizes are always checked against the manifest and checksums when ``verify`` is true. Each
    file is read once into a buffer that the arrays then view, so the state costs one copy;
    with ``mmap`` the arrays are read-only views of a memory map of the file instead (no
    private copy; pages are read as they are touched, or all at once to verify the checksum).

    Raises:
        CorruptCheckpointError: a file differs from the manifest, is a link or a special
            file, is over its size cap, or does not parse.
        FileNotFoundError: the checkpoint or a listed file is missing (the caller decides
            which error that is).
    """
    entries = {f.name: f for f in record.files}
    for name in ("arrays.safetensors", "state.json"):
        if name not in entries:
            raise _corrupt(
                storage.describe(record.directory, name),
                f"the manifest lists no {name}",
                record.step,
            )
    state_entry = entries["state.json"]
    state_path = storage.describe(record.directory, "state.json")
    arrays_path = storage.describe(record.directory, "arrays.safetensors")
    if state_entry.size > MAX_STATE_JSON_BYTES:
        raise _corrupt(
            state_path,
            f"listed as {state_entry.size} bytes, over the {MAX_STATE_JSON_BYTES}-byte cap "
            "of state.json",
            record.step,
        )
    buffers = {}
    with _open_checkpoint(storage, record) as files:
        for name in ("arrays.safetensors", "state.json"):
            entry = entries[name]
            checksum = entry.checksum if verify else None
            try:
                if name != "arrays.safetensors":
                    buffers[name] = files.read(name, size=entry.size, checksum=checksum)
                elif mmap:
                    buffers[name] = files.map(name, size=entry.size, checksum=checksum)
                else:
                    buffers[name] = files.read(
                        name, size=entry.size, checksum=checksum, progress=progress
                    )
            except ValueError as e:
                raise _corrupt(storage.describe(record.directory, name), e, record.step) from None
        sharded: dict[str, np.ndarray] = {}
        index = None
        if shards and record.sharded:
            where = storage.describe(record.directory)
            index = read_index(files, record, verify=verify, where=where)
            sharded = assemble(files, record, index, index.tensors, verify=verify, where=where)
    try:
        # The writer never writes bare NaN/Infinity or a key twice (json.loads would keep the
        # last of two), so either means the file is not what was written.
        doc = json.loads(
            bytes(buffers["state.json"]),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=reject_constant,
        )
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{state_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "tree" not in doc:
        raise CorruptCheckpointError(f"{state_path}: expected an object with a 'tree' field")
    version = doc.get("format_version")
    if type(version) is not int or version != STATE_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{state_path}: state format_version {version!r} is not one this ckptkit reads "
            f"({STATE_FORMAT_VERSION}); upgrade ckptkit-ml"
        )
    arrays, _ = parse_safetensors(buffers["arrays.safetensors"], source=arrays_path)
    tree = unflatten_state(doc["tree"], arrays, source=state_path)
    if index is not None:
        place(tree, index, sharded, source=state_path)
    return tree


def read_tensors(
    storage: Storage, record: CheckpointRecord, keys: Iterable[str] | None, *, verify: bool
) -> dict[str, np.ndarray]:
    """Read only the named tensors of a checkpoint: its header, then one read per tensor.

    With ``verify`` the whole file is hashed first (streamed, not kept in memory).

    Raises:
        TensorNotFoundError: a key is not a tensor of this checkpoint (the message lists some).
        CorruptCheckpointError: as :func:`read_state`.
    """
    if verify:
        verify_files(storage, record)
    index = read_index_of(storage, record)
    sharded = set(index.tensors) if index is not None else set()
    path = storage.describe(record.directory, "arrays.safetensors")
    with _open_arrays(storage, record) as file:
        slots, data_start = read_layout(file, source=path)
        by_name = {slot[0]: slot for slot in slots}
        wanted = [*by_name, *sorted(sharded)] if keys is None else list(keys)
        missing = [k for k in wanted if k not in by_name and k not in sharded]
        if missing:
            names = sorted([*by_name, *sharded])
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise TensorNotFoundError(
                f"{path}: step {record.step} has no tensor {missing[0]!r}; it has [{shown}] "
                "(tensor names are key paths joined with '.')"
            )
        out = {}
        for key in wanted:
            if key not in by_name:
                continue
            _, code, shape, begin, end = by_name[key]
            try:
                buf = file.read_at(end - begin, data_start + begin)
            except ValueError as e:
                raise _corrupt(path, e, record.step) from None
            out[key] = tensor_from_bytes(buf, code, shape)
    if index is not None:
        with _open_checkpoint(storage, record) as files:
            whole = assemble(
                files,
                record,
                index,
                [k for k in wanted if k in sharded],
                verify=False,
                where=storage.describe(record.directory),
            )
        out.update(whole)
    return {key: out[key] for key in wanted}


def read_index_of(storage: Storage, record: CheckpointRecord) -> ShardIndex | None:
    """A sharded checkpoint's index (None for a checkpoint that is not sharded)."""
    if not record.sharded:
        return None
    with _open_checkpoint(storage, record) as files:
        return read_index(files, record, verify=False, where=storage.describe(record.directory))


def read_layout_of(storage: Storage, record: CheckpointRecord) -> list[TensorSlot]:
    """The tensor slots of a checkpoint's arrays file, from its header alone."""
    path = storage.describe(record.directory, "arrays.safetensors")
    with _open_arrays(storage, record) as file:
        return read_layout(file, source=path)[0]


def _open_arrays(storage: Storage, record: CheckpointRecord) -> RangeReader:
    """Open a checkpoint's arrays file safely, with its size checked against the manifest."""
    path = storage.describe(record.directory, "arrays.safetensors")
    entry = next((f for f in record.files if f.name == "arrays.safetensors"), None)
    if entry is None:
        raise _corrupt(path, "the manifest lists no arrays.safetensors", record.step)
    with _open_checkpoint(storage, record) as files:
        try:
            file = files.open("arrays.safetensors")
        except UnsafeFileError as e:
            raise _corrupt(path, e, record.step) from None
    if file.size != entry.size:
        file.close()
        raise _corrupt(
            path, f"size is {file.size} bytes, the manifest says {entry.size}", record.step
        )
    return file


def verify_files(storage: Storage, record: CheckpointRecord) -> None:
    """Check each file of a checkpoint against the size and checksum the manifest lists.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, is a link or a special
            file, or differs.
        FileNotFoundError: the checkpoint is missing.
    """
    with _open_checkpoint(storage, record) as files:
        for entry in record.files:
            path = storage.describe(record.directory, entry.name)
            try:
                size, checksum = files.checksum(entry.name, entry.checksum.partition(":")[0])
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{path}: file of step {record.step} is missing"
                ) from None
            except UnsafeFileError as e:
                raise _corrupt(path, e, record.step) from None
            if (size, checksum) != (entry.size, entry.checksum):
                what = "size" if size != entry.size else "checksum"
                raise CorruptCheckpointError(
                    f"{path}: {what} of step {record.step} does not match the manifest "
                    f"({size} bytes {checksum}, expected {entry.size} bytes {entry.checksum})"
                )
