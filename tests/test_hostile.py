"""Hostile and corrupt checkpoints: each is refused with the right error, naming file and fault.

Files are rewritten and their true size and sha256 patched into the manifest, so the parsers
themselves meet the hostile bytes rather than the checksum check. Symlinks, FIFOs and
directories in place of files must be refused without reading anything outside the store.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import (
    CheckpointStore,
    CkptkitError,
    CorruptCheckpointError,
    FallbackWarning,
    StoreFormatError,
    UnsupportedStateError,
    _manifest,
    _reader,
)
from ckptkit._safetensors import MAX_HEADER_BYTES
from tests.strategies import assert_same_state

STATE = {"w": np.arange(4, dtype=np.float32), "epoch": 3, "pair": (1, 2.5)}
ARRAYS = "arrays.safetensors"
STATE_JSON = "state.json"
REFUSED_FILE = r"symlink|not a regular file"


def _store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "store")
    store.save(1, STATE)
    store.save(2, STATE)
    return store


def _step_dir(store: CheckpointStore, step: int = 1) -> Path:
    return store.root / store.record(step).directory


def _manifest_doc(store: CheckpointStore) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(store.manifest_path.read_bytes())
    return doc


def _write_manifest(store: CheckpointStore, doc: dict[str, Any], raw: str | None = None) -> None:
    text = json.dumps(doc, indent=1)
    if raw is not None:
        # The sentinel string becomes raw JSON text: NaN tokens, huge literals, deep nesting.
        text = text.replace(json.dumps(RAW), raw)
    store.manifest_path.write_bytes(text.encode())


def _replace_file(store: CheckpointStore, name: str, data: bytes, step: int = 1) -> Path:
    """Write ``data`` as a checkpoint file and list its true size and sha256 in the manifest."""
    path = _step_dir(store, step) / name
    path.write_bytes(data)
    doc = _manifest_doc(store)
    (record,) = (r for r in doc["checkpoints"] if r["step"] == step)
    (entry,) = (f for f in record["files"] if f["name"] == name)
    entry["size"] = len(data)
    entry["checksum"] = "sha256:" + hashlib.sha256(data).hexdigest()
    _write_manifest(store, doc)
    return path


def _raises(error: type[CkptkitError], call: Callable[[], object]) -> str:
    """Run ``call``; assert it raises exactly ``error`` (not a subclass); return the message."""
    with pytest.raises(CkptkitError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    return str(info.value)


# -- arrays.safetensors ----------------------------------------------------------------------


def _st(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _t(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


#: (id, file bytes, error, text the message must contain besides the file's path).
ARRAYS_CASES: list[tuple[str, bytes, type[CkptkitError], str]] = [
    ("empty-file", b"", CorruptCheckpointError, "truncated: 0 bytes"),
    ("short-length", b"\x08\x00\x00", CorruptCheckpointError, "truncated: 3 bytes"),
    (
        "header-over-cap",
        struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
        CorruptCheckpointError,
        f"header length {MAX_HEADER_BYTES + 1} is over the {MAX_HEADER_BYTES}-byte cap",
    ),
    (
        "header-length-max",
        struct.pack("<Q", 2**64 - 1) + b"{}",
        CorruptCheckpointError,
        "header length 18446744073709551615 is over",
    ),
    (
        "header-past-end",
        struct.pack("<Q", 64) + b"{}",
        CorruptCheckpointError,
        "header length 64 runs past the end of the 10-byte file",
    ),
    ("header-length-zero", struct.pack("<Q", 0), CorruptCheckpointError, "not valid UTF-8 JSON"),
    ("not-json", _st(None, raw=b"{nope"), CorruptCheckpointError, "not valid UTF-8 JSON"),
    ("not-utf8", _st(None, raw=b'{"\xff": 1}'), CorruptCheckpointError, "not valid UTF-8 JSON"),
    ("nan-token", _st(None, raw=b'{"w": NaN}'), CorruptCheckpointError, "not valid UTF-8 JSON"),
    ("json-array", _st([1, 2]), CorruptCheckpointError, "header is a JSON list, not an object"),
    (
        "duplicate-tensor",
        _st(None, raw=b'{"w": {}, "w": {}}'),
        CorruptCheckpointError,
        "duplicate key 'w'",
    ),
    (
        "entry-keys",
        _st({"w": {"dtype": "F32", "shape": [4]}}),
        CorruptCheckpointError,
        "tensor 'w': entry must be",
    ),
    (
        "unknown-dtype",
        _st({"w": _t("F128", [1], [0, 16])}, bytes(16)),
        CorruptCheckpointError,
        "tensor 'w': unknown dtype 'F128'",
    ),
    (
        "dtype-not-str",
        _st({"w": _t(4, [1], [0, 4])}, bytes(4)),  # type: ignore[arg-type]
        CorruptCheckpointError,
        "tensor 'w': unknown dtype 4",
    ),
    (
        "dtype-list",
        _st({"w": _t([], [1], [0, 4])}, bytes(4)),  # type: ignore[arg-type]
        CorruptCheckpointError,
        "tensor 'w': unknown dtype []",
    ),
    (
        "dtype-object",
        _st({"w": _t({"F32": 1}, [1], [0, 4])}, bytes(4)),  # type: ignore[arg-type]
        CorruptCheckpointError,
        "tensor 'w': unknown dtype {'F32': 1}",
    ),
    (
        "packed-dtype",
        _st({"w": _t("F4", [4], [0, 2])}, bytes(2)),
        UnsupportedStateError,
        "tensor 'w' has packed sub-byte dtype F4",
    ),
    (
        "negative-dim",
        _st({"w": _t("U8", [-1], [0, 0])}),
        CorruptCheckpointError,
        "tensor 'w': shape [-1] is not a list of non-negative ints",
    ),
    (
        "float-dim",
        _st({"w": _t("U8", [2.0], [0, 2])}, bytes(2)),
        CorruptCheckpointError,
        "tensor 'w': shape [2.0] is not a list",
    ),
    (
        "bool-dim",
        _st({"w": _t("U8", [True], [0, 1])}, bytes(1)),
        CorruptCheckpointError,
        "tensor 'w': shape [True] is not a list",
    ),
    (
        "shape-not-list",
        _st({"w": _t("U8", 4, [0, 4])}, bytes(4)),  # type: ignore[arg-type]
        CorruptCheckpointError,
        "tensor 'w': shape 4 is not a list",
    ),
    (
        "shape-vs-bytes",
        _st({"w": _t("F32", [3], [0, 8])}, bytes(8)),
        CorruptCheckpointError,
        "tensor 'w': 8 bytes at data_offsets [0, 8], but dtype F32 and shape [3] need 12",
    ),
    (
        "huge-shape-product",
        _st({"w": _t("U8", [2**62, 2**62], [0, 16])}, bytes(16)),
        CorruptCheckpointError,
        f"tensor 'w': 16 bytes at data_offsets [0, 16], but dtype U8 and shape "
        f"[{2**62}, {2**62}] need {2**124}",
    ),
    (
        "huge-dims-of-empty-tensor",
        _st({"w": _t("U8", [2**62, 2**62, 0], [0, 0])}),
        CorruptCheckpointError,
        "tensor 'w'",
    ),
    (
        "dim-over-int64-of-empty-tensor",
        _st({"w": _t("U8", [2**64, 0], [0, 0])}),
        CorruptCheckpointError,
        "tensor 'w'",
    ),
    (
        "more-dims-than-numpy-has",
        _st({"w": _t("U8", [1] * 65, [0, 1])}, bytes(1)),
        CorruptCheckpointError,
        "tensor 'w'",
    ),
    (
        "overlap",
        _st({"a": _t("U8", [4], [0, 4]), "b": _t("U8", [4], [2, 6])}, bytes(6)),
        CorruptCheckpointError,
        "tensor 'b' at byte 2 overlaps tensor 'a'",
    ),
    (
        "same-bytes-twice",
        _st({"a": _t("U8", [4], [0, 4]), "b": _t("U8", [4], [0, 4])}, bytes(4)),
        CorruptCheckpointError,
        "tensor 'b' at byte 0 overlaps tensor 'a'",
    ),
    (
        "offsets-past-end",
        _st({"w": _t("U8", [4], [0, 4])}, bytes(2)),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [0, 4] outside the 2-byte data area",
    ),
    (
        "offsets-huge",
        _st({"w": _t("U8", [1], [2**64, 2**64 + 1])}, bytes(1)),
        CorruptCheckpointError,
        f"tensor 'w': data_offsets [{2**64}, {2**64 + 1}] outside",
    ),
    (
        "offsets-negative",
        _st({"w": _t("U8", [0], [-4, -4])}),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [-4, -4] outside",
    ),
    (
        "offsets-reversed",
        _st({"w": _t("U8", [4], [4, 0])}, bytes(4)),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [4, 0] outside",
    ),
    (
        "offsets-float",
        _st({"w": _t("U8", [4], [0.0, 4.0])}, bytes(4)),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [0.0, 4.0] outside",
    ),
    (
        "offsets-bool",
        _st({"w": _t("U8", [1], [False, True])}, bytes(1)),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [False, True] outside",
    ),
    (
        "offsets-three",
        _st({"w": _t("U8", [4], [0, 2, 4])}, bytes(4)),
        CorruptCheckpointError,
        "tensor 'w': data_offsets [0, 2, 4] outside",
    ),
    (
        "offsets-string",
        _st({"w": _t("U8", [4], "0-4")}, bytes(4)),  # type: ignore[arg-type]
        CorruptCheckpointError,
        "tensor 'w': data_offsets '0-4' outside",
    ),
    (
        "gap",
        _st({"a": _t("U8", [2], [0, 2]), "b": _t("U8", [2], [4, 6])}, bytes(6)),
        CorruptCheckpointError,
        "gap of 2 unused bytes before tensor 'b'",
    ),
    (
        "gap-at-start",
        _st({"w": _t("U8", [2], [2, 4])}, bytes(4)),
        CorruptCheckpointError,
        "gap of 2 unused bytes before tensor 'w'",
    ),
    (
        "trailing-bytes",
        _st({"w": _t("F32", [4], [0, 16])}, bytes(19)),
        CorruptCheckpointError,
        "3 trailing bytes after tensor 'w', no tensor holds them",
    ),
    (
        "metadata-not-str",
        _st({"__metadata__": {"k": 1}}),
        CorruptCheckpointError,
        "__metadata__ is not an object of str to str",
    ),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
@pytest.mark.parametrize(
    ("data", "error", "words"), [c[1:] for c in ARRAYS_CASES], ids=[c[0] for c in ARRAYS_CASES]
)
def test_hostile_arrays_file_is_refused_naming_file_and_tensor(
    tmp_path: Path, data: bytes, error: type[CkptkitError], words: str, verify: bool
) -> None:
    """A malformed safetensors file with a matching checksum raises the exact error, with path."""
    store = _store(tmp_path)
    path = _replace_file(store, ARRAYS, data)
    message = _raises(error, lambda: store.load(1, verify=verify))
    assert str(path) in message and words in message
    store.verify(1)  # the bytes are what the manifest lists: only the parser objects
    assert_same_state(STATE, store.load(2))


def test_arrays_file_of_another_state_is_refused(tmp_path: Path) -> None:
    """A valid safetensors file whose tensors the state.json does not name is refused."""
    store = _store(tmp_path)
    _replace_file(store, ARRAYS, _st({"v": _t("U8", [1], [0, 1])}, b"\x07"))
    message = _raises(CorruptCheckpointError, lambda: store.load(1))
    assert str(_step_dir(store) / STATE_JSON) in message
    assert "refers to tensor 'w', which the arrays file lacks" in message


def test_unreferenced_tensor_is_refused(tmp_path: Path) -> None:
    """An arrays file holding a tensor the state never refers to is refused by name."""
    store = _store(tmp_path)
    extra = {
        "w": _t("F32", [4], [0, 16]),
        "stowaway": _t("U8", [2], [16, 18]),
    }
    arrays = np.arange(4, dtype="<f4").tobytes() + b"\x01\x02"
    _replace_file(store, ARRAYS, _st(extra, arrays))
    message = _raises(CorruptCheckpointError, lambda: store.load(1))
    assert "holds tensors the state never refers to: 'stowaway'" in message


# -- state.json ------------------------------------------------------------------------------


def _state(tree_x: object = 0, *, raw: str | None = None, version: object = 1) -> bytes:
    """A state.json whose tree is ``{"w": <the array>, "x": tree_x}``; ``raw`` replaces x's text."""
    doc = {"format_version": version, "tree": {"w": {"$array": "w"}, "x": tree_x}}
    text = json.dumps(doc)
    if raw is not None:
        text = text.replace('"x": 0', '"x": ' + raw)
    return text.encode()


DEEP = 100_000
#: (id, state.json bytes, regex the message must match besides the file's path).
STATE_CASES: list[tuple[str, bytes, str]] = [
    (
        "deep-lists",
        b'{"format_version": 1, "tree": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        r"not valid JSON|nested too deeply",
    ),
    (
        "deep-objects",
        b'{"format_version": 1, "tree": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
        r"not valid JSON|nested too deeply",
    ),
    ("deep-within-json-limit", _state(raw="[" * 900 + "]" * 900), r"nested too deeply"),
    ("deep-tuples", _state(raw='{"$tuple": [' * 400 + "]}" * 400), r"nested too deeply"),
    ("huge-int-literal", _state(raw="9" * 5000), r"not valid JSON"),
    (
        "huge-int-version",
        b'{"format_version": 1' + b"0" * 5000 + b', "tree": {}}',
        r"not valid JSON",
    ),
    ("not-utf8", b'{"format_version": 1, "tree": "\xff\xfe"}', r"not valid JSON"),
    ("empty", b"", r"not valid JSON"),
    ("nan-token", b'{"format_version": 1, "tree": {"x": NaN}}', r"not valid JSON .*NaN"),
    ("duplicate-key", b'{"format_version": 1, "tree": {"x": 1, "x": 2}}', r"not valid JSON .*'x'"),
    ("json-array", b"[1, 2]", r"expected an object with a 'tree' field"),
    ("tree-missing", b'{"format_version": 1}', r"expected an object with a 'tree' field"),
    ("version-string", _state(version="1"), r"state format_version '1' is not one this ckptkit"),
    ("version-bool", _state(version=True), r"state format_version True is not one"),
    ("version-two", _state(version=2), r"state format_version 2 is not one"),
    ("version-float", _state(version=1.0), r"state format_version 1\.0 is not one"),
    ("version-null", _state(version=None), r"state format_version None is not one"),
    (
        "array-missing",
        _state({"$array": "nope"}),
        r"state\[\"x\"\]: refers to tensor 'nope', which the arrays file lacks",
    ),
    ("array-twice", _state({"$array": "w"}), r"tensor 'w' is referenced a second time"),
    ("array-not-str", _state({"$array": 5}), r"malformed tag '\$array' with value 5"),
    ("unknown-tag", _state({"$set": [1]}), r"state\[\"x\"\]: malformed tag '\$set'"),
    ("bare-dollar", _state({"$": 1}), r"malformed tag '\$'"),
    ("unescaped-key", _state({"a": 1, "$b": 2}), r"key '\$b' is neither a tag nor an escaped"),
    ("float-short", _state({"$float": "7ff8"}), r"malformed tag '\$float' with value '7ff8'"),
    ("float-number", _state({"$float": 1.5}), r"malformed tag '\$float' with value 1\.5"),
    ("float-upper", _state({"$float": "7FF8000000000000"}), r"malformed tag '\$float'"),
    ("float-not-hex", _state({"$float": "zzzzzzzzzzzzzzzz"}), r"malformed tag '\$float'"),
    ("int-decimal", _state({"$int": "12"}), r"malformed tag '\$int' with value '12'"),
    ("int-number", _state({"$int": 12}), r"malformed tag '\$int' with value 12"),
    ("int-empty-hex", _state({"$int": "0x"}), r"malformed tag '\$int'"),
    ("int-upper-hex", _state({"$int": "0xFF"}), r"malformed tag '\$int'"),
    ("tuple-object", _state({"$tuple": {}}), r"malformed tag '\$tuple'"),
    ("scalar-one-item", _state({"$scalar": ["F32"]}), r"malformed tag '\$scalar'"),
    ("scalar-object", _state({"$scalar": {"F32": 1.0}}), r"malformed tag '\$scalar'"),
    ("scalar-dtype", _state({"$scalar": ["F128", 1.0]}), r"unknown numpy scalar dtype 'F128'"),
    ("scalar-dtype-int", _state({"$scalar": [7, 1.0]}), r"unknown numpy scalar dtype 7"),
    ("scalar-int-range", _state({"$scalar": ["I8", 300]}), r"malformed I8 scalar value 300"),
    ("scalar-unsigned", _state({"$scalar": ["U64", -1]}), r"malformed U64 scalar value -1"),
    ("scalar-int-float", _state({"$scalar": ["I32", 1.5]}), r"malformed I32 scalar value 1\.5"),
    ("scalar-bool-int", _state({"$scalar": ["BOOL", 1]}), r"malformed BOOL scalar value 1"),
    ("scalar-short-hex", _state({"$scalar": ["F32", "00"]}), r"malformed F32 scalar value '00'"),
    ("scalar-complex", _state({"$scalar": ["C64", 1.5]}), r"malformed C64 scalar value 1\.5"),
    ("scalar-f32-overflow", _state({"$scalar": ["F32", 1e308]}), r"F32"),
    ("scalar-f16-overflow", _state({"$scalar": ["F16", 1e10]}), r"F16"),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
@pytest.mark.parametrize(
    ("data", "pattern"), [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES]
)
def test_hostile_state_json_is_refused_naming_file_and_key(
    tmp_path: Path, data: bytes, pattern: str, verify: bool
) -> None:
    """A malformed state.json with a matching checksum raises CorruptCheckpointError, with path."""
    store = _store(tmp_path)
    path = _replace_file(store, STATE_JSON, data)
    message = _raises(CorruptCheckpointError, lambda: store.load(1, verify=verify))
    assert str(path) in message
    assert _search(pattern, message)


def _search(pattern: str, message: str) -> bool:
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return True


# -- manifest.json ---------------------------------------------------------------------------

RAW = "\x00raw\x00"


def _set(*path: str | int, value: object) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc["checkpoints"][0]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


def _set_file(name: str, field: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        (entry,) = (f for f in doc["checkpoints"][0]["files"] if f["name"] == name)
        entry[field] = value

    return change


def _list_file_twice(doc: dict[str, Any]) -> None:
    files = doc["checkpoints"][0]["files"]
    files[1] = dict(files[0])


def _duplicate_step(doc: dict[str, Any]) -> None:
    doc["checkpoints"].append(doc["checkpoints"][0])


#: (id, change to the manifest, raw text for the RAW sentinel, regex for the message).
MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str | None, str]] = [
    ("absolute-directory", _set("directory", value="/etc"), None, r"directory '/etc' is not"),
    (
        "absolute-step-directory",
        _set("directory", value="/tmp/step_000000000001"),
        None,
        r"directory '/tmp/step_000000000001' is not a checkpoint directory name of this step",
    ),
    ("dotdot-directory", _set("directory", value="../x"), None, r"directory '\.\./x' is not"),
    (
        "dotdot-step-directory",
        _set("directory", value="../step_000000000001"),
        None,
        r"directory '\.\./step_000000000001' is not",
    ),
    (
        "step-then-dotdot",
        _set("directory", value="step_000000000001/../.."),
        None,
        r"directory 'step_000000000001/\.\./\.\.' is not",
    ),
    (
        "trailing-slash",
        _set("directory", value="step_000000000001/"),
        None,
        r"directory 'step_000000000001/' is not",
    ),
    ("dot-directory", _set("directory", value="."), None, r"directory '\.' is not"),
    ("empty-directory", _set("directory", value=""), None, r"directory '' is not"),
    (
        "directory-of-another-step",
        _set("directory", value="step_000000000002"),
        None,
        r"step 1: directory 'step_000000000002' is not a checkpoint directory name of this step",
    ),
    (
        "directory-not-str",
        _set("directory", value=["step_000000000001"]),
        None,
        r"directory \['step_000000000001'\] is not",
    ),
    (
        "file-name-with-slash",
        _set_file(ARRAYS, "name", "sub/arrays.safetensors"),
        None,
        r"file name 'sub/arrays\.safetensors' is not one the store writes",
    ),
    (
        "file-name-dotdot",
        _set_file(ARRAYS, "name", "../arrays.safetensors"),
        None,
        r"file name '\.\./arrays\.safetensors' is not one",
    ),
    (
        "file-name-absolute",
        _set_file(ARRAYS, "name", "/etc/passwd"),
        None,
        r"file name '/etc/passwd' is not one",
    ),
    ("file-entry-null", _set("files", 1, value=None), None, r"a file entry must be an object"),
    ("file-twice", _list_file_twice, None, r"a file is listed twice"),
    (
        "negative-size",
        _set_file(ARRAYS, "size", -1),
        None,
        r"size of arrays\.safetensors is -1, not a non-negative integer",
    ),
    ("float-size", _set_file(ARRAYS, "size", 1.5), None, r"size of .* is 1\.5, not"),
    ("bool-size", _set_file(ARRAYS, "size", True), None, r"size of .* is True, not"),
    ("string-size", _set_file(ARRAYS, "size", "12"), None, r"size of .* is '12', not"),
    (
        "md5-checksum",
        _set_file(ARRAYS, "checksum", "md5:" + "0" * 32),
        None,
        r"checksum of arrays\.safetensors is 'md5:0+', not sha256:<64 hex digits>",
    ),
    (
        "upper-hex-checksum",
        _set_file(ARRAYS, "checksum", "sha256:" + "A" * 64),
        None,
        r"not sha256:<64 hex digits>",
    ),
    (
        "short-checksum",
        _set_file(ARRAYS, "checksum", "sha256:" + "0" * 63),
        None,
        r"not sha256:<64 hex digits>",
    ),
    (
        "non-hex-checksum",
        _set_file(ARRAYS, "checksum", "sha256:" + "g" * 64),
        None,
        r"not sha256:<64 hex digits>",
    ),
    (
        "checksum-with-newline",
        _set_file(ARRAYS, "checksum", "sha256:" + "0" * 64 + "\n"),
        None,
        r"not sha256:<64 hex digits>",
    ),
    (
        "xxh3-checksum-of-sha256-length",
        _set_file(ARRAYS, "checksum", "xxh3_128:" + "0" * 64),
        None,
        r"not sha256:<64 hex digits>",
    ),
    ("empty-checksum", _set_file(ARRAYS, "checksum", ""), None, r"not sha256:<64 hex"),
    ("number-checksum", _set_file(ARRAYS, "checksum", 5), None, r"not sha256:<64 hex"),
    ("duplicate-step", _duplicate_step, None, r"step 1 is listed twice"),
    ("nan-created", _set("created", value=RAW), "NaN", r"not valid JSON .*NaN"),
    ("infinity-metric", _set("metrics", value={"loss": RAW}), "Infinity", r"not valid JSON"),
    ("minus-infinity-size", _set_file(ARRAYS, "size", RAW), "-Infinity", r"not valid JSON"),
    ("huge-int-literal", _set("created", value=RAW), "9" * 5000, r"not valid JSON"),
    ("huge-int-created", _set("created", value=RAW), "9" * 400, r"created"),
    ("huge-float-created", _set("created", value=RAW), "1e400", r"created"),
    ("huge-int-metric", _set("metrics", value={"loss": RAW}), "9" * 400, r"loss"),
    (
        "deep-metadata",
        _set("metadata", value={"a": RAW}),
        "[" * DEEP + "]" * DEEP,
        r"not valid JSON|nested too deeply",
    ),
    (
        "deep-metadata-within-json-limit",
        _set("metadata", value={"a": RAW}),
        "[" * 900 + "]" * 900,
        r"nested too deeply",
    ),
    ("metadata-array-tag", _set("metadata", value={"a": {"$array": "w"}}), None, r"metadata"),
]


@pytest.mark.parametrize(
    ("change", "raw", "pattern"),
    [c[1:] for c in MANIFEST_CASES],
    ids=[c[0] for c in MANIFEST_CASES],
)
def test_hostile_manifest_is_refused_naming_it(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], raw: str | None, pattern: str
) -> None:
    """A malformed manifest raises StoreFormatError naming manifest.json, on read and on load."""
    store = _store(tmp_path)
    doc = _manifest_doc(store)
    change(doc)
    _write_manifest(store, doc, raw)
    for call in (store.records, store.load, lambda: store.verify(2)):
        message = _raises(StoreFormatError, call)
        assert str(store.manifest_path) in message
        assert _search(pattern, message)
    with pytest.raises(StoreFormatError):
        CheckpointStore(store.root)


@pytest.mark.parametrize("name", [ARRAYS, STATE_JSON])
def test_huge_listed_size_is_refused_without_allocating_it(tmp_path: Path, name: str) -> None:
    """A file listed with a size of 2**64 bytes is refused as corrupt, never read into memory."""
    store = _store(tmp_path)
    doc = _manifest_doc(store)
    _set_file(name, "size", 2**64)(doc)
    _write_manifest(store, doc)
    path = _step_dir(store) / name
    for call in (lambda: store.load(1), lambda: store.load(1, verify=False)):
        message = _raises(CorruptCheckpointError, call)
        assert str(path) in message and str(2**64) in message
    assert str(path) in _raises(CorruptCheckpointError, lambda: store.verify(1))


def test_manifest_over_the_cap_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest larger than MAX_MANIFEST_BYTES raises StoreFormatError with path, size, cap."""
    store = _store(tmp_path)
    size = store.manifest_path.stat().st_size
    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", size - 1)
    for call in (store.records, store.load, lambda: CheckpointStore(store.root)):
        message = _raises(StoreFormatError, call)
        assert str(store.manifest_path) in message and str(size) in message and "cap" in message
    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", size)
    assert [r.step for r in store.records()] == [1, 2]


def test_state_json_listed_over_the_cap_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state.json whose listed size is over MAX_STATE_JSON_BYTES raises CorruptCheckpointError."""
    store = _store(tmp_path)
    path = _step_dir(store) / STATE_JSON
    size = path.stat().st_size
    monkeypatch.setattr(_reader, "MAX_STATE_JSON_BYTES", size - 1)
    for verify in (True, False):
        message = _raises(CorruptCheckpointError, functools.partial(store.load, 1, verify=verify))
        assert str(path) in message and str(size) in message and "cap" in message
    monkeypatch.setattr(_reader, "MAX_STATE_JSON_BYTES", size)
    assert_same_state(STATE, store.load(1))


def test_state_listed_at_a_huge_size_hits_the_cap_not_memory(tmp_path: Path) -> None:
    """A state.json listed at 2**62 bytes is refused by the cap (the real file is small)."""
    store = _store(tmp_path)
    doc = _manifest_doc(store)
    _set_file(STATE_JSON, "size", 2**62)(doc)
    _write_manifest(store, doc)
    message = _raises(CorruptCheckpointError, lambda: store.load(1))
    assert str(_step_dir(store) / STATE_JSON) in message and "cap" in message


# -- symlinks, FIFOs and directories ---------------------------------------------------------

_IN_ACCESS, _IN_OPEN = 0x1, 0x20


class _OpenWatch:
    """Names of the files opened or read in one directory while watched (Linux inotify).

    ``names()`` is None where inotify is unavailable; tests then rely on the bytes and the
    refusal alone.
    """

    def __init__(self, directory: Path) -> None:
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        if add(fd, os.fsencode(directory), _IN_ACCESS | _IN_OPEN) < 0:
            os.close(fd)
            return
        self._fd = fd

    def names(self) -> set[str] | None:
        if self._fd < 0:
            return None
        seen: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                if name:
                    seen.add(os.fsdecode(name))
                offset += 16 + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory beside the store, outside it."""
    path = tmp_path / "outside"
    path.mkdir()
    yield path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _every_read(store: CheckpointStore, step: int) -> list[Callable[[], object]]:
    return [
        lambda: store.load(step),
        lambda: store.load(step, verify=False),
        lambda: store.verify(step),
    ]


def test_symlinked_checkpoint_directory_is_refused_and_never_opened(
    tmp_path: Path, outside: Path
) -> None:
    """A step directory that is a symlink out of the store is refused; its target is not opened."""
    store = _store(tmp_path)
    link = _step_dir(store, 2)
    target = outside / link.name
    shutil.move(link, target)
    link.symlink_to(target, target_is_directory=True)
    before = _snapshot(target)
    watch = _OpenWatch(target)
    try:
        for call in _every_read(store, 2):
            message = _raises(CorruptCheckpointError, call)
            assert str(link) in message and _search(REFUSED_FILE, message)
        with pytest.warns(FallbackWarning, match=r"skipping corrupt step 2: .*symlink"):
            assert_same_state(STATE, store.load(fallback=True))
        opened = watch.names()
        after = _snapshot(target)  # reads every file there: the watch must see that
        witnessed = watch.names()
    finally:
        watch.close()
    assert opened in (None, set()), f"files outside the store were opened: {opened}"
    assert witnessed is None or witnessed == set(before), f"the watch saw only {witnessed}"
    assert after == before


@pytest.mark.parametrize("name", [ARRAYS, STATE_JSON])
def test_symlinked_checkpoint_file_is_refused_and_never_opened(
    tmp_path: Path, outside: Path, name: str
) -> None:
    """A listed file that is a symlink to an identical file outside the store is refused."""
    store = _store(tmp_path)
    link = _step_dir(store) / name
    target = outside / name
    shutil.move(link, target)
    link.symlink_to(target)
    before = _snapshot(outside)
    watch = _OpenWatch(outside)
    try:
        for call in _every_read(store, 1):
            message = _raises(CorruptCheckpointError, call)
            assert str(link) in message and _search(REFUSED_FILE, message)
        opened = watch.names()
        after = _snapshot(outside)  # reads every file there: the watch must see that
        witnessed = watch.names()
    finally:
        watch.close()
    assert opened in (None, set()), f"files outside the store were opened: {opened}"
    assert witnessed is None or witnessed == set(before), f"the watch saw only {witnessed}"
    assert after == before


def test_symlinked_manifest_is_refused(tmp_path: Path, outside: Path) -> None:
    """A manifest.json that is a symlink raises StoreFormatError mentioning the symlink."""
    store = _store(tmp_path)
    target = outside / "manifest.json"
    shutil.move(store.manifest_path, target)
    store.manifest_path.symlink_to(target)
    for call in (store.records, store.load):
        message = _raises(StoreFormatError, call)
        assert str(store.manifest_path) in message and "symlink" in message


@pytest.mark.parametrize("name", [ARRAYS, STATE_JSON])
def test_directory_in_place_of_a_file_is_refused(tmp_path: Path, name: str) -> None:
    """A directory where a listed file should be is refused as not a regular file."""
    store = _store(tmp_path)
    path = _step_dir(store) / name
    path.unlink()
    path.mkdir()
    for call in _every_read(store, 1):
        message = _raises(CorruptCheckpointError, call)
        assert str(path) in message and _search(REFUSED_FILE, message)


_FIFO_PROBE = textwrap.dedent(
    """
    import sys
    from ckptkit import CheckpointStore, CkptkitError

    store = CheckpointStore(sys.argv[1])
    calls = {
        "load": lambda: store.load(1),
        "load-unverified": lambda: store.load(1, verify=False),
        "verify": lambda: store.verify(1),
    }
    for what, call in calls.items():
        try:
            call()
        except CkptkitError as e:
            print(what, type(e).__name__, str(e).replace("\\n", " "), sep="|", flush=True)
        else:
            print(what, "returned", "", sep="|", flush=True)
    """
)


@pytest.mark.parametrize("name", [ARRAYS, STATE_JSON])
def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    """A FIFO where a listed file should be is refused at once, in a process that may not hang."""
    store = _store(tmp_path)
    path = _step_dir(store) / name
    path.unlink()
    os.mkfifo(path)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _FIFO_PROBE, str(store.root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"reading a store with a FIFO as {name} blocked: {e.stdout!r}")
    assert proc.returncode == 0, proc.stderr
    results = [line.split("|", 2) for line in proc.stdout.splitlines()]
    assert [r[0] for r in results] == ["load", "load-unverified", "verify"]
    for what, error, message in results:
        assert error == "CorruptCheckpointError", (what, error, message)
        assert str(path) in message and _search(REFUSED_FILE, message)


def _symlink_step_out(store: CheckpointStore, step: int, outside: Path) -> tuple[Path, Path]:
    link = _step_dir(store, step)
    target = outside / link.name
    shutil.move(link, target)
    link.symlink_to(target, target_is_directory=True)
    return link, target


def _retention_save(store: CheckpointStore) -> None:
    with CheckpointStore(store.root, keep_last=1) as other:  # close waits for the deletion
        other.save(3, STATE)


def _retention_prune(store: CheckpointStore) -> None:
    CheckpointStore(store.root, keep_last=1).prune()


def _overwrite(store: CheckpointStore) -> None:
    store.save(1, STATE, overwrite=True)


@pytest.mark.parametrize(
    "delete",
    [_retention_save, _retention_prune, _overwrite],
    ids=["retention-on-save", "prune", "overwrite"],
)
def test_deleting_a_symlinked_checkpoint_removes_only_the_link(
    tmp_path: Path, outside: Path, delete: Callable[[CheckpointStore], None]
) -> None:
    """Retention, prune and overwrite remove a symlinked step's link, never its target's files."""
    store = _store(tmp_path)
    link, target = _symlink_step_out(store, 1, outside)
    before = _snapshot(target)
    delete(store)
    store.wait()  # retention's deletion runs on after save returns
    assert _snapshot(target) == before
    assert not os.path.lexists(link)
    assert link.name not in {r.directory for r in store.records()}


def test_sweep_leaves_files_behind_an_unlisted_symlinked_step(
    tmp_path: Path, outside: Path
) -> None:
    """Opening a store never deletes the files behind an unlisted step_* symlink."""
    store = _store(tmp_path)
    target = outside / "step_000000000009"
    shutil.copytree(_step_dir(store), target)
    (store.root / target.name).symlink_to(target, target_is_directory=True)
    before = _snapshot(target)
    CheckpointStore(store.root).save(4, STATE)
    assert _snapshot(target) == before


# -- state keys are never paths --------------------------------------------------------------

PATHLIKE_KEYS = ["/", "\\", "..", "\x00", ".", "../../outside", "a/b", "..\\..\\x", "/etc/passwd"]


def test_path_like_state_keys_round_trip_and_create_no_files(tmp_path: Path) -> None:
    """Keys with '/', '\\', '..', NUL and '.' load back exactly and never become file names."""
    state = {
        "arrays": {key: np.full(2, i, np.int16) for i, key in enumerate(PATHLIKE_KEYS)},
        "nested": {key: {key: [key, (key,)]} for key in PATHLIKE_KEYS},
        **{key: np.float32(i) for i, key in enumerate(PATHLIKE_KEYS)},
    }
    store = CheckpointStore(tmp_path / "store")
    store.save(1, state)
    assert_same_state(state, store.load(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert sorted(p.name for p in store.root.iterdir()) == [
        ".ckptkit.lock",
        "manifest.json",
        "step_000000000001",
    ]
    assert sorted(p.name for p in _step_dir(store).iterdir()) == [ARRAYS, STATE_JSON]
