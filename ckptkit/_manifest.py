"""The manifest: ``root/manifest.json``, the single list of a store's committed checkpoints.

A checkpoint exists if and only if the manifest lists it. The JSON is deterministic (sorted
keys, records sorted by step) and never holds bare ``NaN``/``Infinity`` tokens: non-finite
metric values are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``. The schema is in
``docs/manifest.schema.json``; ``FORMAT_VERSION`` changes only when old readers could misread
new files.

Format version 2 added ``xxh3_128`` file checksums beside ``sha256``, the only form of version 1.
Version 3 added sharded checkpoints, whose records list more files than the two fixed ones
(``shards.json`` and one ``shard_<rank>.safetensors`` per writing rank). The writer writes
version 3 only when a record has such files, so a store without sharded checkpoints stays
readable by older versions; a record read from a version 1 manifest keeps its ``sha256``
checksum when the manifest is rewritten, and still verifies, since files are checked with the
algorithm their checksum names.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ckptkit._errors import StoreFormatError
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._tree import encode_json_value
from ckptkit._tree_read import decode_json_value

FORMAT_VERSION = 3
#: The version written when every record has only the two fixed files.
_PLAIN_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The largest manifest read: about 100,000 checkpoints with modest metadata.
MAX_MANIFEST_BYTES = 64 << 20

#: Directory names the store gives checkpoints: ``step_`` and at least 12 digits, and a
#: ``.N`` suffix for a checkpoint written over an existing step.
CHECKPOINT_DIR = re.compile(r"step_([0-9]{12,})(\.[0-9]+)?")
#: The files of every checkpoint: the state's arrays and its JSON skeleton.
CHECKPOINT_FILES = ("arrays.safetensors", "state.json")
#: A sharded checkpoint's index of its sharded tensors (``_sharded.py``).
SHARD_INDEX = "shards.json"
#: A sharded checkpoint's per-rank tensor files.
SHARD_FILE = re.compile(r"shard_[0-9]{5,}\.safetensors")


def shard_file_name(rank: int) -> str:
    """The name of the file the given rank writes its shards to."""
    return f"shard_{rank:05d}.safetensors"


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is a file name the store writes inside a checkpoint directory."""
    return name in CHECKPOINT_FILES or name == SHARD_INDEX or SHARD_FILE.fullmatch(name) is not None


#: The checksum forms each manifest format version accepts: algorithm to hex digits of the digest.
CHECKSUM_FORMS: dict[int, dict[str, int]] = {
    1: {"sha256": 64},
    2: {"sha256": 64, "xxh3_128": 32},
    3: {"sha256": 64, "xxh3_128": 32},
}
_CHECKSUM_PATTERNS = {
    version: re.compile("|".join(f"{re.escape(a)}:[0-9a-f]{{{n}}}" for a, n in forms.items()))
    for version, forms in CHECKSUM_FORMS.items()
}
_CHECKSUM_WORDS = {
    version: " or ".join(f"{algo}:<{n} hex digits>" for algo, n in forms.items())
    for version, forms in CHECKSUM_FORMS.items()
}

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_metric(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode_metric(value: object, *, where: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = _to_float(value)
        if number is None:
            raise ValueError(f"{where}: metric value {_describe(value)} is too large for a float")
        return number
    raise ValueError(f"{where}: metric value {value!r} is not a number")


def _to_float(value: int | float) -> float | None:
    """The value as a float, or None for an int too large for one (JSON allows any digits)."""
    try:
        return float(value)
    except OverflowError:
        return None


def _describe(value: int | float) -> str:
    """A number for an error message, without printing hundreds of digits."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


# Every change rewrites the whole manifest, and Python's JSON encoder is its slow, pure-Python
# one whenever it indents: a store listing 1,000 checkpoints spent 49 ms of each save encoding
# them and about 40 ms parsing and checking them again. Both are cached: each record's text by
# the record object (records are frozen; a change keeps the ones it read), and the records of
# the last manifest parsed or written, by its bytes. The bytes are the same as without caches.
_encoded: dict[int, tuple[CheckpointRecord, str]] = {}
_parsed: tuple[bytes, list[CheckpointRecord]] | None = None


def dumps(records: Sequence[CheckpointRecord]) -> bytes:
    """Serialise records to the manifest's deterministic JSON bytes.

    The format's own keys are written in sorted order; the keys of metrics and metadata keep
    the order they were given in, so metadata loads back with its key order. The text is that
    of ``json.dumps(doc, indent=1)`` and a final newline.
    """
    global _encoded, _parsed
    encoded: dict[int, tuple[CheckpointRecord, str]] = {}
    chunks = []
    ordered = sorted(records, key=lambda r: r.step)
    for r in ordered:
        hit = _encoded.get(id(r))
        text = hit[1] if hit is not None and hit[0] is r else _encode_record(r)
        encoded[id(r)] = (r, text)
        chunks.append(text)
    _encoded = encoded  # one rebinding: another thread sees the old cache or the new one
    sharded = any(f.name not in CHECKPOINT_FILES for r in records for f in r.files)
    version = FORMAT_VERSION if sharded else _PLAIN_FORMAT_VERSION
    listed = "[\n" + ",\n".join(chunks) + "\n ]" if chunks else "[]"
    data = f'{{\n "checkpoints": {listed},\n "format_version": {version}\n}}\n'.encode("ascii")
    # These bytes parse to these records: the next read of the manifest gets them back.
    _parsed = (data, ordered)
    return data


def _encode_record(r: CheckpointRecord) -> str:
    """One checkpoint as ``json.dumps(doc, indent=1)`` writes it inside the manifest's list."""
    doc = {
        "created": r.created,
        "directory": r.directory,
        "files": [{"checksum": f.checksum, "name": f.name, "size": f.size} for f in r.files],
        "metadata": encode_json_value(dict(r.metadata), what=f"metadata of step {r.step}"),
        "metrics": {k: encode_metric(v) for k, v in r.metrics.items()},
        "pinned": r.pinned,
        "step": r.step,
    }
    # Nested two levels deep (the top object, then its list): two more spaces on every line.
    return "  " + json.dumps(doc, indent=1, allow_nan=False).replace("\n", "\n  ")


def loads(data: bytes, *, path: str, cached: bool = False) -> list[CheckpointRecord]:
    """Parse manifest bytes; any deviation from the format raises ``StoreFormatError``.

    With ``cached``, the records of the last manifest parsed or written may come back as the
    same objects (for a change to the store, which only reads them and hands none out);
    without, every record is a new object.
    """
    global _parsed
    last = _parsed
    if cached and last is not None and last[0] == data:
        return list(last[1])
    records = _parse(data, path=path)
    if cached:
        _parsed = (bytes(data), records)
    return list(records)


def detached(record: CheckpointRecord) -> CheckpointRecord:
    """The record with its own copy of its metadata, to hand out of a change."""
    return replace(record, metadata=copy.deepcopy(dict(record.metadata)))


def _parse(data: bytes, *, path: str) -> list[CheckpointRecord]:
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise StoreFormatError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StoreFormatError(f"{path}: the manifest must be a JSON object")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreFormatError(f"{path}: the manifest has no integer format_version")
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{path}: manifest format_version {version} is newer than this ckptkit reads "
            f"({FORMAT_VERSION}); upgrade ckptkit-ml to read this store"
        )
    if version < 1:
        raise StoreFormatError(f"{path}: manifest format_version {version} is not valid")
    entries = doc.get("checkpoints")
    if not isinstance(entries, list):
        raise StoreFormatError(f"{path}: 'checkpoints' must be a list")
    records = []
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        try:
            record = _record_from_json(entry, version=version)
        except (ValueError, TypeError, KeyError) as e:
            raise StoreFormatError(f"{path}: checkpoints[{i}] is malformed: {e}") from None
        if record.step in seen:
            raise StoreFormatError(f"{path}: step {record.step} is listed twice")
        seen.add(record.step)
        records.append(record)
    records.sort(key=lambda r: r.step)
    return records


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not allowed")


def _record_from_json(entry: object, *, version: int) -> CheckpointRecord:
    if not isinstance(entry, dict):
        raise TypeError("expected an object")
    step = entry["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step {step!r} is not a non-negative integer")
    where = f"step {step}"
    directory = entry["directory"]
    # The directory must name this step: with steps unique, no two records can share files
    # (deleting one would destroy the other).
    match = CHECKPOINT_DIR.fullmatch(directory) if isinstance(directory, str) else None
    if match is None or int(match.group(1)) != step:
        raise ValueError(
            f"{where}: directory {directory!r} is not a checkpoint directory name of this step"
        )
    created = entry["created"]
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise ValueError(f"{where}: created {created!r} is not a number")
    created_seconds = _to_float(created)
    # JSON reads 1e400 as infinity: a time must be a finite number of seconds.
    if created_seconds is None or not math.isfinite(created_seconds):
        raise ValueError(f"{where}: created {_describe(created)} is not a finite number of seconds")
    pinned = entry.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ValueError(f"{where}: pinned {pinned!r} is not a boolean")
    metrics = entry.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}: metrics must be an object")
    metadata = decode_json_value(entry.get("metadata", {}), what=f"metadata of {where}")
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{where}: metadata must be an object")
    files = entry["files"]
    if not isinstance(files, list):
        raise ValueError(f"{where}: files must be a list")
    names = [f.get("name") if isinstance(f, dict) else None for f in files]
    if len(set(map(str, names))) != len(names):
        raise ValueError(f"{where}: a file is listed twice")
    shards = [n for n in names if isinstance(n, str) and SHARD_FILE.fullmatch(n)]
    if shards and SHARD_INDEX not in names:
        raise ValueError(f"{where}: shard files are listed without {SHARD_INDEX}")
    return CheckpointRecord(
        step=step,
        directory=directory,
        created=created_seconds,
        pinned=pinned,
        metrics={
            str(k): decode_metric(v, where=f"{where}, metric {k!r}") for k, v in metrics.items()
        },
        metadata=metadata,
        files=tuple(_file_from_json(f, where=where, version=version) for f in files),
    )


def _file_from_json(entry: object, *, where: str, version: int) -> FileEntry:
    if not isinstance(entry, dict):
        raise TypeError(f"{where}: a file entry must be an object")
    name, size, checksum = entry["name"], entry["size"], entry["checksum"]
    allowed = isinstance(name, str) and (
        is_checkpoint_file(name) if version >= 3 else name in CHECKPOINT_FILES
    )
    if not allowed:
        raise ValueError(
            f"{where}: file name {name!r} is not one the store writes "
            f"(in manifest format_version {version})"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where}: size of {name} is {size!r}, not a non-negative integer")
    if not isinstance(checksum, str) or not _CHECKSUM_PATTERNS[version].fullmatch(checksum):
        raise ValueError(
            f"{where}: checksum of {name} is {checksum!r}, not {_CHECKSUM_WORDS[version]} "
            f"(what manifest format_version {version} accepts)"
        )
    return FileEntry(name=name, size=size, checksum=checksum)
