"""Sharded checkpoints in the core: the shards.json index, reading them whole, and their files.

The checkpoints are written as two ranks write them (``tests/helpers/sharded.py``), without
torch: the replicated state goes to the usual files, each rank's rows of the sharded tensors to
its shard file, and the index to ``shards.json``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from ckptkit import CheckpointStore, CorruptCheckpointError, FallbackWarning, TensorNotFoundError
from ckptkit._fsio import TEMP_PREFIX
from ckptkit._manifest import SHARD_INDEX, shard_file_name
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._safetensors import write_safetensors
from ckptkit._sharded import decode_index, encode_index
from ckptkit._storage import CheckpointWriter
from tests.helpers.backends import Backend
from tests.helpers.sharded import (
    Tensors,
    index_of,
    rank_pieces,
    save_sharded,
    shard_files,
    without,
    write_file,
    write_shard,
)
from tests.strategies import assert_same_state

REPO = Path(__file__).resolve().parent.parent
SHARD_0, SHARD_1 = shard_file_name(0), shard_file_name(1)
SHARDED_PATHS: tuple[tuple[str | int, ...], ...] = (("model", "w"), ("model", "b"), ("layers", 0))


def sharded_state(step: int) -> dict[str, Any]:
    """A state whose ``model`` arrays and first layer are sharded; the rest is replicated."""
    return {
        "model": {
            "w": np.arange(20, dtype=np.float32).reshape(5, 4) + step,
            "b": np.arange(3, dtype=np.int64) - step,
        },
        "layers": [np.full((3, 2), step, dtype=np.float16), np.arange(2, dtype=np.uint8)],
        "step": step,
        "note": None,
    }


def tensors_of(state: Any) -> Tensors:
    """The sharded tensors of :func:`sharded_state`, by path."""
    out = {}
    for path in SHARDED_PATHS:
        node = state
        for part in path:
            node = node[part]
        out[path] = node
    return out


def save(store: CheckpointStore, step: int, **kwargs: Any) -> dict[str, Any]:
    """Save :func:`sharded_state` of ``step`` sharded across two ranks; return the state."""
    state = sharded_state(step)
    save_sharded(store, step, state, tensors_of(state), **kwargs)
    return state


def _manifest(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "manifest.json").read_bytes())
    return doc


def _replace_file(root: Path, record: CheckpointRecord, name: str, data: bytes) -> None:
    """Put ``data`` in place of a checkpoint's file, and list it in the manifest as it is.

    The result verifies: what is wrong is in the content, which only the parsers catch.
    """
    (root / record.directory / name).write_bytes(data)
    doc = _manifest(root)
    (entry,) = [
        f
        for c in doc["checkpoints"]
        if c["step"] == record.step
        for f in c["files"]
        if f["name"] == name
    ]
    entry["size"] = len(data)
    entry["checksum"] = f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"
    (root / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n", "ascii")


def _safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    write_safetensors(out, arrays)
    return out.getvalue()


# -- decode_index refuses what a correct writer would not write -----------------------------------


def _index_doc() -> dict[str, Any]:
    """The index of :func:`sharded_state` split across two ranks, as parsed JSON."""
    doc: dict[str, Any] = json.loads(encode_index(index_of(tensors_of(sharded_state(1)), 2)))
    return doc


def _change(change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = _index_doc()
    change(doc)
    return json.dumps(doc).encode()


def _w(doc: dict[str, Any]) -> dict[str, Any]:
    tensor: dict[str, Any] = doc["tensors"]["model.w"]
    return tensor


def _set_chunk(i: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _w(doc)["chunks"][i].update(fields)

    return change


W = "tensor 'model.w'"

#: (id, the index's bytes, what the message says after the file's name).
MALFORMED: list[tuple[str, bytes, str]] = [
    ("truncated-json", encode_index(index_of({}, 2))[:-1], "not valid JSON"),
    ("nan-token", b'{"format_version": NaN}', "not valid JSON"),
    (
        "duplicate-key",
        b'{"format_version": 1, "format_version": 1, "world_size": 1, "tensors": {}}',
        "not valid JSON",
    ),
    ("not-an-object", b"[]", "the index must be a JSON object"),
    (
        "newer-format-version",
        _change(lambda d: d.update(format_version=2)),
        "index format_version 2 is not one this ckptkit reads (1); upgrade ckptkit-ml",
    ),
    (
        "no-format-version",
        _change(lambda d: d.pop("format_version")),
        "index format_version None is not one this ckptkit reads (1)",
    ),
    (
        "string-format-version",
        _change(lambda d: d.update(format_version="1")),
        "index format_version '1' is not one this ckptkit reads (1)",
    ),
    (
        "zero-world-size",
        _change(lambda d: d.update(world_size=0)),
        "world_size 0 is not a positive integer",
    ),
    (
        "no-tensors",
        _change(lambda d: d.pop("tensors")),
        "a required field is missing: 'tensors'",
    ),
    ("tensors-list", _change(lambda d: d.update(tensors=[])), "'tensors' must be an object"),
    (
        "tensor-not-an-object",
        _change(lambda d: d["tensors"].update({"model.w": []})),
        "tensor 'model.w': expected an object",
    ),
    (
        "no-chunks",
        _change(lambda d: _w(d).pop("chunks")),
        "a required field is missing: 'chunks'",
    ),
    (
        "chunks-object",
        _change(lambda d: _w(d).update(chunks={})),
        f"{W}: 'chunks' must be a list",
    ),
    (
        "chunk-not-an-object",
        _change(lambda d: _w(d)["chunks"].append(1)),
        f"{W}: chunk 2 is not an object",
    ),
    (
        "empty-path",
        _change(lambda d: _w(d).update(path=[])),
        f"{W}: path [] is not a list of keys and indexes",
    ),
    (
        "negative-index-in-path",
        _change(lambda d: _w(d).update(path=["model", -1])),
        f"{W}: path ['model', -1] is not a list of keys and indexes",
    ),
    (
        "unknown-dtype",
        _change(lambda d: _w(d).update(dtype="F128")),
        f"{W}: dtype 'F128' is not a safetensors dtype",
    ),
    (
        "negative-shape",
        _change(lambda d: _w(d).update(shape=[-5, 4])),
        f"{W}: shape [-5, 4] is not a list of non-negative integers",
    ),
    (
        "bool-offset",
        _change(_set_chunk(0, offsets=[False, 0])),
        f"{W}: chunk 0 offsets [False, 0] is not a list of non-negative integers",
    ),
    (
        "float-size",
        _change(_set_chunk(1, sizes=[2.0, 4])),
        f"{W}: chunk 1 sizes [2.0, 4] is not a list of non-negative integers",
    ),
    (
        "chunk-of-other-rank",
        _change(_set_chunk(1, offsets=[3], sizes=[2])),
        f"{W}: chunk 1 has not the tensor's 2 dimensions",
    ),
    (
        "chunk-outside-the-shape",
        _change(_set_chunk(1, offsets=[4, 0])),
        f"{W}: chunk 1 (4, 0)+(2, 4) lies outside shape (5, 4)",
    ),
    (
        "chunk-past-the-last-column",
        _change(_set_chunk(1, offsets=[3, 1])),
        f"{W}: chunk 1 (3, 1)+(2, 4) lies outside shape (5, 4)",
    ),
    (
        "a-chunk-missing",
        _change(lambda d: _w(d)["chunks"].pop()),
        f"{W}: its chunks hold 12 elements, its shape (5, 4) has 20",
    ),
    (
        "a-chunk-twice",
        _change(lambda d: _w(d)["chunks"].append(_w(d)["chunks"][1])),
        f"{W}: chunks 1 and 2 overlap",
    ),
    (
        "overlapping-chunks-that-make-up-the-count",
        _change(_set_chunk(1, offsets=[1, 0])),
        f"{W}: chunks 0 and 1 overlap",
    ),
    (
        "file-outside-the-checkpoint",
        _change(_set_chunk(0, file="../step_000000000002/shard_00000.safetensors")),
        f"{W}: chunk 0 names file '../step_000000000002/shard_00000.safetensors', not a shard file",
    ),
    (
        "file-not-a-shard",
        _change(_set_chunk(0, file="arrays.safetensors")),
        f"{W}: chunk 0 names file 'arrays.safetensors', not a shard file",
    ),
    (
        "short-shard-number",
        _change(_set_chunk(0, file="shard_0.safetensors")),
        f"{W}: chunk 0 names file 'shard_0.safetensors', not a shard file",
    ),
    (
        "name-not-a-string",
        _change(_set_chunk(0, name=7)),
        f"{W}: chunk 0 name 7 is not a string",
    ),
]


@pytest.mark.parametrize(
    ("data", "problem"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_index_is_refused_naming_the_file_and_the_problem(
    data: bytes, problem: str
) -> None:
    """decode_index refuses each kind of malformed index with the file's name and what is wrong."""
    source = "run/step_000000000001/shards.json"
    with pytest.raises(CorruptCheckpointError) as info:
        decode_index(data, source=source)
    message = str(info.value)
    assert message.startswith(f"{source}: "), message
    assert problem in message


def test_the_index_the_writer_writes_decodes_to_itself() -> None:
    """An index survives encode_index and decode_index unchanged, with deterministic bytes."""
    index = index_of(tensors_of(sharded_state(3)), 3)
    data = encode_index(index)
    assert decode_index(data, source="shards.json") == index
    assert encode_index(decode_index(data, source="shards.json")) == data


def test_chunks_of_a_grid_and_empty_chunks_decode() -> None:
    """Chunks split along two dims, and chunks with a zero size, are an exact cover too."""
    doc = _index_doc()
    _w(doc)["chunks"] = [
        {"offsets": [0, 0], "sizes": [5, 2], "file": SHARD_0, "name": "a"},
        {"offsets": [0, 2], "sizes": [3, 2], "file": SHARD_1, "name": "b"},
        {"offsets": [3, 2], "sizes": [2, 2], "file": SHARD_1, "name": "c"},
        {"offsets": [5, 0], "sizes": [0, 4], "file": SHARD_1, "name": "d"},
    ]
    index = decode_index(json.dumps(doc).encode(), source="shards.json")
    assert [c.name for c in index.tensors["model.w"].chunks] == ["a", "b", "c", "d"]


def test_two_chunks_of_a_scalar_overlap() -> None:
    """A 0-d tensor has one element: two chunks of it overlap, and are refused."""
    doc = _index_doc()
    chunk = {"offsets": [], "sizes": [], "file": SHARD_0, "name": "s"}
    doc["tensors"]["s"] = {"path": ["s"], "dtype": "F32", "shape": [], "chunks": [chunk, chunk]}
    with pytest.raises(CorruptCheckpointError, match=r"tensor 's': chunks 0 and 1 overlap"):
        decode_index(json.dumps(doc).encode(), source="shards.json")


# -- a sharded checkpoint on disk --------------------------------------------------------------------


def test_a_sharded_checkpoint_loads_whole(tmp_path: Path) -> None:
    """load() puts each sharded tensor together from both ranks' files, at its place in the tree."""
    store = CheckpointStore(tmp_path)
    state = save(store, 1)
    record = store.record(1)
    assert record.sharded
    assert [f.name for f in record.files] == [
        "arrays.safetensors",
        "state.json",
        SHARD_0,
        SHARD_1,
        SHARD_INDEX,
    ]
    assert sorted(os.listdir(tmp_path / record.directory)) == sorted(f.name for f in record.files)
    reopened = CheckpointStore(tmp_path)
    assert_same_state(state, reopened.load(1))
    assert_same_state(state, reopened.load(1, mmap=True))
    assert_same_state(state, reopened.load(1, verify=False))
    assert reopened.verify(1) == record


def test_read_arrays_and_tensor_info_serve_the_sharded_tensors(tmp_path: Path) -> None:
    """read_arrays and tensor_info list the sharded tensors beside the replicated ones."""
    store = CheckpointStore(tmp_path)
    state = save(store, 1)
    info = store.tensor_info(1)
    assert list(info) == ["layers.0", "layers.1", "model.b", "model.w"]
    w = info["model.w"]
    assert (w.dtype, w.shape, w.nbytes) == ("F32", (5, 4), 80)
    assert (info["layers.1"].dtype, info["layers.1"].shape) == ("U8", (2,))
    for verify in (False, True):
        arrays = store.read_arrays(1, verify=verify)
        assert sorted(arrays) == sorted(info)
        for path, array in tensors_of(state).items():
            assert_same_state(array, arrays[".".join(map(str, path))])
    some = store.read_arrays(1, ["model.w", "layers.1"])
    assert list(some) == ["model.w", "layers.1"]
    assert_same_state(state["model"]["w"], some["model.w"])
    assert_same_state(state["layers"][1], some["layers.1"])
    assert_same_state(state["model"]["b"], store.read_arrays(1, "model.b")["model.b"])
    with pytest.raises(TensorNotFoundError, match=r"no tensor 'model\.x'; it has \[layers\.0, "):
        store.read_arrays(1, ["model.x"])


def test_a_tensor_split_unevenly_or_held_by_one_rank_loads(tmp_path: Path) -> None:
    """Ranks holding rows of different counts, or no rows at all, make up the tensor exactly."""
    store = CheckpointStore(tmp_path)
    state = {
        "one_row": np.arange(3, dtype=np.int32).reshape(1, 3),
        "no_rows": np.zeros((0, 2), dtype=np.float64),
        "seven": np.arange(7, dtype=np.float32),
    }
    tensors: Tensors = {(key,): value for key, value in state.items()}
    save_sharded(store, 1, state, tensors, world_size=3)
    assert_same_state(state, store.load(1))
    assert set(store.read_arrays(1)) == set(state)


def _shards_of(store: CheckpointStore, step: int) -> Path:
    assert isinstance(store.root, Path)
    return store.root / store.record(step).directory


def test_a_chunk_in_a_file_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    """An index naming a shard file the manifest does not list is refused, naming the index."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    record = store.record(1)
    doc = json.loads((tmp_path / record.directory / SHARD_INDEX).read_bytes())
    doc["tensors"]["model.w"]["chunks"][1]["file"] = shard_file_name(2)
    _replace_file(tmp_path, record, SHARD_INDEX, json.dumps(doc).encode())
    message = (
        f"{tmp_path / record.directory}/shards.json: tensor 'model.w' has a chunk in "
        "shard_00002.safetensors, which the manifest does not list for step 1"
    )
    for read in (lambda: store.load(1), lambda: store.read_arrays(1), lambda: store.tensor_info(1)):
        with pytest.raises(CorruptCheckpointError) as info:
            read()
        assert str(info.value) == message


def test_a_malformed_index_on_disk_is_refused_with_its_path(tmp_path: Path) -> None:
    """A shards.json that verifies but does not parse is refused by load, naming its path."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    record = store.record(1)
    _replace_file(tmp_path, record, SHARD_INDEX, b"[]")
    store.verify(1)
    with pytest.raises(CorruptCheckpointError) as info:
        store.load(1)
    assert str(info.value) == (
        f"{tmp_path / record.directory}/shards.json: the index must be a JSON object"
    )


def test_overlapping_chunks_are_refused_instead_of_loading_uninitialised_rows(
    tmp_path: Path,
) -> None:
    """Chunks that overlap yet hold the tensor's element count leave rows unread: refused."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    record = store.record(1)
    doc = json.loads((tmp_path / record.directory / SHARD_INDEX).read_bytes())
    # Rank 1's rows 3..4 claimed as rows 1..2: 12 + 8 elements, as many as the 5x4 tensor has.
    doc["tensors"]["model.w"]["chunks"][1]["offsets"] = [1, 0]
    _replace_file(tmp_path, record, SHARD_INDEX, json.dumps(doc).encode())
    for read in (lambda: store.load(1), lambda: store.read_arrays(1, ["model.w"])):
        with pytest.raises(CorruptCheckpointError) as info:
            read()
        assert str(info.value) == (
            f"{tmp_path / record.directory}/shards.json: tensor 'model.w': chunks 0 and 1 overlap"
        )


def test_a_shard_file_of_another_dtype_than_the_index_is_refused(tmp_path: Path) -> None:
    """A chunk stored with another dtype than the index's is refused, naming file and tensor."""
    store = CheckpointStore(tmp_path)
    state = save(store, 1)
    pieces = rank_pieces(tensors_of(state), 1, 2)
    pieces["model.w@3,0"] = pieces["model.w@3,0"].astype(np.float64)
    _replace_file(tmp_path, store.record(1), SHARD_1, _safetensors(pieces))
    with pytest.raises(CorruptCheckpointError) as info:
        store.load(1)
    assert str(info.value) == (
        f"{_shards_of(store, 1)}/{SHARD_1}: tensor 'model.w@3,0' is float64 (2, 4); the index "
        "says F32 (2, 4)"
    )


def test_a_shard_file_without_a_chunk_the_index_names_is_refused(tmp_path: Path) -> None:
    """A chunk missing from its shard file is refused, naming the file, the chunk and the tensor."""
    store = CheckpointStore(tmp_path)
    state = save(store, 1)
    pieces = rank_pieces(tensors_of(state), 1, 2)
    del pieces["model.b@2"]
    _replace_file(tmp_path, store.record(1), SHARD_1, _safetensors(pieces))
    message = (
        f"{_shards_of(store, 1)}/{SHARD_1}: has no tensor 'model.b@2', a chunk of 'model.b' in "
        "the index"
    )
    with pytest.raises(CorruptCheckpointError) as info:
        store.load(1)
    assert str(info.value) == message
    with pytest.raises(CorruptCheckpointError) as info:
        store.read_arrays(1, ["model.b"])
    assert str(info.value) == message
    assert list(store.read_arrays(1, ["model.w"])) == ["model.w"]


def test_a_sharded_tensor_whose_path_is_not_a_null_is_refused(tmp_path: Path) -> None:
    """An index path that does not lead to a null of state.json is refused, naming it."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    record = store.record(1)
    doc = json.loads((tmp_path / record.directory / SHARD_INDEX).read_bytes())
    for path in (["step"], ["model", "missing"], ["layers", 1], ["layers", "0"], ["note", "x"]):
        doc["tensors"]["model.w"]["path"] = path
        _replace_file(tmp_path, record, SHARD_INDEX, json.dumps(doc).encode())
        with pytest.raises(CorruptCheckpointError) as info:
            store.load(1)
        assert str(info.value) == (
            f"{tmp_path / record.directory}/state.json: sharded tensor 'model.w' has path "
            f"{path}, which is not a null in the state's tree"
        )


def test_a_damaged_shard_file_fails_verify_and_load_falls_back(tmp_path: Path) -> None:
    """One changed byte in a shard file fails verify and load; fallback loads the step before."""
    store = CheckpointStore(tmp_path)
    first = save(store, 1)
    save(store, 2)
    path = _shards_of(store, 2) / SHARD_1
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_1}: checksum of step 2"):
        store.verify(2)
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_1}: checksum"):
        store.load(2)
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_1}: checksum"):
        store.read_arrays(2, ["model.w"], verify=True)
    with pytest.warns(FallbackWarning, match=rf"skipping corrupt step 2: .*{SHARD_1}"):
        checkpoint = store.load_checkpoint(fallback=True)
    assert checkpoint.record.step == 1
    assert_same_state(first, checkpoint.state)
    with pytest.warns(FallbackWarning):
        assert_same_state(first, store.load(fallback=True))


def test_a_missing_shard_file_is_reported_as_missing(tmp_path: Path) -> None:
    """A shard file gone from a listed checkpoint fails verify and load, naming it."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    directory = _shards_of(store, 1)
    (directory / SHARD_0).unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_0}: file of step 1 is missing"):
        store.verify(1)
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_0}: listed in the manifest"):
        store.load(1)


# -- the store's files: retention, the sweep, the manifest's version ------------------------------


def test_retention_deletes_every_file_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    """A sharded checkpoint that retention or an overwrite drops goes with every file it had."""
    store = CheckpointStore(tmp_path, keep_last=1)
    save(store, 1)
    old = store.record(1).directory
    save(store, 2)
    assert not (tmp_path / old).exists()
    save(store, 2, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == [
        store.record(2).directory
    ]


def test_the_sweep_removes_an_unlisted_sharded_checkpoint_but_not_a_foreign_file(
    tmp_path: Path,
) -> None:
    """A crash's unlisted sharded checkpoint goes with its shard files; a file of yours stays."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    listed = tmp_path / store.record(1).directory
    bare = tmp_path / "step_000000000005"
    kept = tmp_path / "step_000000000006"
    temp = tmp_path / f"{TEMP_PREFIX}0123456789abcdef"
    for copy in (bare, kept, temp):
        copy.mkdir()
        for f in listed.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
    (kept / "notes.txt").write_text("mine")
    (kept / "shard_7.safetensors").write_text("not a name the store writes")
    CheckpointStore(tmp_path).save(2, {"x": np.zeros(1)})
    assert not bare.exists() and not temp.exists()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "shard_7.safetensors"]
    assert sorted(os.listdir(listed)) == sorted(f.name for f in store.record(1).files)


def test_the_manifest_is_version_3_exactly_while_a_record_is_sharded(tmp_path: Path) -> None:
    """Manifests with sharded records are format_version 3; without, they stay 2."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(1, {"x": np.zeros(1)})
    assert _manifest(tmp_path)["format_version"] == 2
    save(store, 2)
    assert _manifest(tmp_path)["format_version"] == 3
    store.save(3, {"x": np.zeros(1)})  # retention drops the sharded step 2
    assert [r.step for r in store.records()] == [3]
    assert _manifest(tmp_path)["format_version"] == 2


def _no_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((TEMP_PREFIX, "step_")))


@pytest.mark.parametrize("where", ["rank 0", "rank 1", "after both ranks"])
def test_a_failure_inside_extra_leaves_the_store_unchanged(tmp_path: Path, where: str) -> None:
    """An error while the ranks write their shards commits nothing and removes the temp directory."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    before = (tmp_path / "manifest.json").read_bytes()
    dirs = _no_leftovers(tmp_path)
    tensors = tensors_of(sharded_state(2))
    writes = shard_files(store._storage, tensors)

    def extra(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
        if where == "rank 0":
            write_file(writer, SHARD_0, lambda out: out.write(b"partial"))
        elif where == "rank 1":
            joined = store._storage.join_checkpoint(writer.name)
            sink = joined.create(SHARD_1)
            sink.write(memoryview(b"partial"))
            sink.abort()
            joined.abort()
        else:
            writes(writer)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store._save_with_files(2, {"x": None}, None, None, extra)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert _no_leftovers(tmp_path) == dirs
    assert [r.step for r in store.records()] == [1]
    save(store, 2)  # the store works on
    assert [r.step for r in CheckpointStore(tmp_path).records()] == [1, 2]


# -- ranks join the checkpoint being written --------------------------------------------------------


def test_a_rank_in_another_thread_writes_into_the_committed_checkpoint(backend: Backend) -> None:
    """Files a joined writer of another store object writes, in a thread, are committed with it."""
    store = backend.store()
    other = backend.store()
    state = sharded_state(4)
    tensors = tensors_of(state)
    written: list[FileEntry] = []

    def extra(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
        pieces = rank_pieces(tensors, 0, 2)
        own = write_file(writer, SHARD_0, lambda out: write_safetensors(out, pieces))
        rank1 = threading.Thread(
            target=lambda: written.append(
                write_shard(other._storage, writer.name, 1, rank_pieces(tensors, 1, 2))
            )
        )
        rank1.start()
        rank1.join()
        data = encode_index(index_of(tensors, 2))
        index = write_file(writer, SHARD_INDEX, lambda out: out.write(data))
        return (own, *written, index)

    record = store._save_with_files(4, without(state, tensors), None, None, extra)
    assert len(written) == 1 and written[0] in record.files
    reopened = backend.store()
    assert_same_state(state, reopened.load(4))
    assert reopened.verify(4) == record
    assert backend.checkpoint_names() == [record.directory]


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from ckptkit._storage_local import LocalStorage
from tests.helpers.sharded import write_shard

root, name = sys.argv[1], sys.argv[2]
pieces = {"w@2": np.arange(2, 4, dtype=np.float32)}
entry = write_shard(LocalStorage(Path(root)), name, 1, pieces)
print(json.dumps({"name": entry.name, "size": entry.size, "checksum": entry.checksum}))
"""


def test_a_rank_in_another_process_writes_into_the_committed_checkpoint(tmp_path: Path) -> None:
    """A rank in a separate process joins the local checkpoint by name; its file is committed."""
    store = CheckpointStore(tmp_path / "store")
    w = np.arange(4, dtype=np.float32)
    tensors: Tensors = {("w",): w}

    def extra(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
        own = write_file(writer, SHARD_0, lambda out: write_safetensors(out, {"w@0": w[:2]}))
        done = subprocess.run(
            [sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "store"), writer.name],
            capture_output=True,
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
        )
        rank1 = FileEntry(**json.loads(done.stdout))
        data = encode_index(index_of(tensors, 2))
        return (own, rank1, write_file(writer, SHARD_INDEX, lambda out: out.write(data)))

    record = store._save_with_files(1, {"w": None, "step": 1}, None, None, extra)
    assert [f.name for f in record.files][2:] == [SHARD_0, SHARD_1, SHARD_INDEX]
    loaded = CheckpointStore(tmp_path / "store").load(1)
    assert_same_state({"w": w, "step": 1}, loaded)


@pytest.mark.parametrize(
    "name",
    ["", "..", "../step_000000000001", "manifest.json", "step_1", "step_000000000001/x", "/tmp"],
)
def test_joining_a_checkpoint_by_a_bad_name_raises_value_error(backend: Backend, name: str) -> None:
    """join_checkpoint refuses a name new_checkpoint never makes, before writing anything."""
    store = backend.store()
    with pytest.raises(ValueError, match="checkpoint"):
        store._storage.join_checkpoint(name)


# -- every backend ------------------------------------------------------------------------------------


def test_a_sharded_checkpoint_round_trips_on_every_backend(backend: Backend) -> None:
    """Save, load, read_arrays, tensor_info and verify of a sharded checkpoint, on each storage."""
    store = backend.store(keep_last=1)
    first = save(store, 1)
    assert_same_state(first, backend.store().load(1))
    state = save(store, 2)
    reopened = backend.store()
    assert_same_state(state, reopened.load(2))
    assert set(reopened.read_arrays(2, verify=True)) == set(reopened.tensor_info(2))
    assert reopened.verify(2).sharded
    assert backend.checkpoint_names() == [reopened.record(2).directory]


def test_a_damaged_shard_is_caught_on_every_backend(backend: Backend) -> None:
    """A changed byte in a shard file fails verify on each storage, and fallback skips it."""
    store = backend.store()
    first = save(store, 1)
    save(store, 2)
    backend.corrupt(store.record(2).directory, SHARD_0)
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD_0}: checksum of step 2"):
        store.verify(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_state(first, store.load(fallback=True))
    assert [type(w.message) for w in caught] == [FallbackWarning]


def test_a_failure_after_the_ranks_wrote_leaves_no_files_on_any_backend(backend: Backend) -> None:
    """A save whose extra fails after every rank wrote its shard leaves no checkpoint behind."""
    store = backend.store()
    save(store, 1)
    names = backend.checkpoint_names()
    writes = shard_files(store._storage, tensors_of(sharded_state(2)))

    def extra(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
        writes(writer)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store._save_with_files(2, {"x": None}, None, None, extra)
    assert backend.checkpoint_names() == names
    assert [r.step for r in backend.store().records()] == [1]
