"""Reading one committed checkpoint back into its state tree.

Everything read here is treated as untrusted: the directory and files are opened without
following links (relative to one directory descriptor), sizes are checked against the manifest
before anything is allocated, ``state.json`` has a size cap, and the parsers refuse anything a
correct writer would not produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptkit import _fsio
from ckptkit._errors import CorruptCheckpointError
from ckptkit._record import CheckpointRecord
from ckptkit._safetensors import parse_safetensors
from ckptkit._tree import unflatten_state

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
        return _fsio.open_directory(path)
    except _fsio.UnsafeFileError as e:
        raise _corrupt(path, e, record.step) from None


def read_state(root: Path, record: CheckpointRecord, *, verify: bool) -> Any:
    """Read, check and decode one checkpoint's files.

    Sizes are always checked against the manifest and checksums when ``verify`` is true. Each
    file is read once into a buffer that the arrays then view, so the state costs one copy.

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
            try:
                buffers[name] = _fsio.read_verified(
                    name,
                    dir_fd=dir_fd,
                    size=entry.size,
                    checksum=entry.checksum if verify else None,
                )
            except ValueError as e:
                raise _corrupt(directory / name, e, record.step) from None
    finally:
        os.close(dir_fd)
    state_path = directory / "state.json"
    try:
        doc = json.loads(bytes(buffers["state.json"]))
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
                size, checksum = _fsio.file_checksum(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{path}: file of step {record.step} is missing"
                ) from None
            except _fsio.UnsafeFileError as e:
                raise _corrupt(path, e, record.step) from None
            if (size, checksum) != (entry.size, entry.checksum):
                what = "size" if size != entry.size else "checksum"
                raise CorruptCheckpointError(
                    f"{path}: {what} of step {record.step} does not match the manifest "
                    f"({size} bytes {checksum}, expected {entry.size} bytes {entry.checksum})"
                )
    finally:
        os.close(dir_fd)
