"""Reading one committed checkpoint back into its state tree.

Everything read here is treated as untrusted: the directory and files are opened without
following links (relative to one directory descriptor), sizes are checked against the manifest
before anything is allocated, ``state.json`` has a size cap, and the parsers refuse anything a
correct writer would not produce.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit import _fsread
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
from ckptkit._tree_read import unflatten_state

STATE_FORMAT_VERSION = 1

#: The largest ``state.json`` read or written: the skeleton and the non-array leaves. Large
#: numeric data belongs in arrays, which have no such cap.
MAX_STATE_JSON_BYTES = 256 << 20


def _corrupt(path: Path, problem: object, step: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {problem}; step {step} is corrupt: load another step, or pass fallback=True "
        "to load the newest checkpoint that verifies"
    )


def _open_directory(root: Path, record: CheckpointRecord) -> int:
    path = root / record.directory
    try:
        return _fsread.open_directory(path)
    except _fsread.UnsafeFileError as e:
        raise _corrupt(path, e, record.step) from None


def read_state(
    root: Path,
    record: CheckpointRecord,
    *,
    verify: bool,
    mmap: bool = False,
    progress: Update | None = None,
) -> Any:
    """Read, check and decode one checkpoint's files.

    Sizes are always checked against the manifest and checksums when ``verify`` is true. Each
    file is read once into a buffer that the arrays then view, so the state costs one copy;
    with ``mmap`` the arrays are read-only views of a memory map of the file instead (no
    private copy; pages are read as they are touched, or all at once to verify the checksum).

    Raises:
        CorruptCheckpointError: a file differs from the manifest, is a link or a special
            file, is over its size cap, or does not parse.
        FileNotFoundError: the directory or a listed file is missing (the caller decides
            which error that is).
    """
    directory = root / record.directory
    entries = {f.name: f for f in record.files}
    for name in ("arrays.safetensors", "state.json"):
        if name not in entries:
            raise _corrupt(directory / name, f"the manifest lists no {name}", record.step)
    state_entry = entries["state.json"]
    if state_entry.size > MAX_STATE_JSON_BYTES:
        raise _corrupt(
            directory / "state.json",
            f"listed as {state_entry.size} bytes, over the {MAX_STATE_JSON_BYTES}-byte cap "
            "of state.json",
            record.step,
        )
    buffers = {}
    dir_fd = _open_directory(root, record)
    try:
        for name in ("arrays.safetensors", "state.json"):
            entry = entries[name]
            checksum = entry.checksum if verify else None
            try:
                if name != "arrays.safetensors":
                    buffers[name] = _fsread.read_verified(
                        name, dir_fd=dir_fd, size=entry.size, checksum=checksum
                    )
                elif mmap:
                    buffers[name] = _fsread.map_verified(
                        name, dir_fd=dir_fd, size=entry.size, checksum=checksum
                    )
                else:
                    buffers[name] = _fsread.read_verified(
                        name, dir_fd=dir_fd, size=entry.size, checksum=checksum, progress=progress
                    )
            except ValueError as e:
                raise _corrupt(directory / name, e, record.step) from None
    finally:
        os.close(dir_fd)
    state_path = directory / "state.json"
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
    arrays, _ = parse_safetensors(
        buffers["arrays.safetensors"], source=str(directory / "arrays.safetensors")
    )
    return unflatten_state(doc["tree"], arrays, source=str(state_path))


def read_tensors(
    root: Path, record: CheckpointRecord, keys: Iterable[str] | None, *, verify: bool
) -> dict[str, np.ndarray]:
    """Read only the named tensors of a checkpoint: its header, then one read per tensor.

    With ``verify`` the whole file is hashed first (streamed, not kept in memory).

    Raises:
        TensorNotFoundError: a key is not a tensor of this checkpoint (the message lists some).
        CorruptCheckpointError: as :func:`read_state`.
    """
    if verify:
        verify_files(root, record)
    fd, path, size = _open_arrays(root, record)
    try:
        slots, data_start = read_layout(fd, size, source=str(path))
        by_name = {slot[0]: slot for slot in slots}
        wanted = list(by_name) if keys is None else list(keys)
        missing = [k for k in wanted if k not in by_name]
        if missing:
            names = sorted(by_name)
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise TensorNotFoundError(
                f"{path}: step {record.step} has no tensor {missing[0]!r}; it has [{shown}] "
                "(tensor names are key paths joined with '.')"
            )
        out = {}
        for key in wanted:
            _, code, shape, begin, end = by_name[key]
            buf = _fsread.pread_exactly(fd, end - begin, data_start + begin)
            out[key] = tensor_from_bytes(buf, code, shape)
        return out
    finally:
        os.close(fd)


def read_layout_of(root: Path, record: CheckpointRecord) -> list[TensorSlot]:
    """The tensor slots of a checkpoint's arrays file, from its header alone."""
    fd, path, size = _open_arrays(root, record)
    try:
        return read_layout(fd, size, source=str(path))[0]
    finally:
        os.close(fd)


def _open_arrays(root: Path, record: CheckpointRecord) -> tuple[int, Path, int]:
    """Open a checkpoint's arrays file safely; return its descriptor, path and checked size."""
    path = root / record.directory / "arrays.safetensors"
    entry = next((f for f in record.files if f.name == "arrays.safetensors"), None)
    if entry is None:
        raise _corrupt(path, "the manifest lists no arrays.safetensors", record.step)
    dir_fd = _open_directory(root, record)
    try:
        fd = _fsread.open_regular("arrays.safetensors", dir_fd=dir_fd)
    except _fsread.UnsafeFileError as e:
        raise _corrupt(path, e, record.step) from None
    finally:
        os.close(dir_fd)
    size = os.fstat(fd).st_size
    if size != entry.size:
        os.close(fd)
        raise _corrupt(path, f"size is {size} bytes, the manifest says {entry.size}", record.step)
    return fd, path, size


def verify_files(root: Path, record: CheckpointRecord) -> None:
    """Check each file of a checkpoint against the size and checksum the manifest lists.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, is a link or a special
            file, or differs.
        FileNotFoundError: the checkpoint's directory is missing.
    """
    directory = root / record.directory
    dir_fd = _open_directory(root, record)
    try:
        for entry in record.files:
            path = directory / entry.name
            try:
                size, checksum = _fsread.file_checksum(
                    entry.name, dir_fd=dir_fd, algorithm=entry.checksum.partition(":")[0]
                )
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{path}: file of step {record.step} is missing"
                ) from None
            except _fsread.UnsafeFileError as e:
                raise _corrupt(path, e, record.step) from None
            if (size, checksum) != (entry.size, entry.checksum):
                what = "size" if size != entry.size else "checksum"
                raise CorruptCheckpointError(
                    f"{path}: {what} of step {record.step} does not match the manifest "
                    f"({size} bytes {checksum}, expected {entry.size} bytes {entry.checksum})"
                )
    finally:
        os.close(dir_fd)
