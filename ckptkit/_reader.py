"""Reading one committed checkpoint back into its state tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptkit import _fsio
from ckptkit._errors import CorruptCheckpointError
from ckptkit._record import CheckpointRecord
from ckptkit._safetensors import parse_safetensors
from ckptkit._tree import unflatten_state

STATE_FORMAT_VERSION = 1


def read_state(root: Path, record: CheckpointRecord, *, verify: bool) -> Any:
    """Read, check and decode one checkpoint's files.

    Sizes are always checked against the manifest and checksums when ``verify`` is true. Each
    file is read once into a buffer that the arrays then view, so the state costs one copy.

    Raises:
        CorruptCheckpointError: a file differs from the manifest or does not parse.
        FileNotFoundError: a listed file is missing (the caller decides which error that is).
    """
    directory = root / record.directory
    entries = {f.name: f for f in record.files}
    buffers = {}
    for name in ("arrays.safetensors", "state.json"):
        entry = entries.get(name)
        path = directory / name
        if entry is None:
            raise CorruptCheckpointError(
                f"{path}: the manifest lists no {name} for step {record.step}"
            )
        try:
            buffers[name] = _fsio.read_verified(
                path, size=entry.size, checksum=entry.checksum if verify else None
            )
        except ValueError as e:
            raise CorruptCheckpointError(
                f"{path}: {e}; step {record.step} is corrupt: load another step, or pass "
                "fallback=True to load the newest checkpoint that verifies"
            ) from None
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
        CorruptCheckpointError: naming the first file that is missing or differs.
    """
    directory = root / record.directory
    for entry in record.files:
        path = directory / entry.name
        try:
            size, checksum = _fsio.file_checksum(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: file of step {record.step} is missing") from None
        if (size, checksum) != (entry.size, entry.checksum):
            what = "size" if size != entry.size else "checksum"
            raise CorruptCheckpointError(
                f"{path}: {what} of step {record.step} does not match the manifest "
                f"({size} bytes {checksum}, expected {entry.size} bytes {entry.checksum})"
            )
