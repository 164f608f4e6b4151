"""The on-disk format: golden stores still load exactly, the writer still writes the same bytes.

Each ``tests/data/format_v<N>/`` was written by ``tests/data/make_golden.py`` from
``GOLDEN_BUILDERS[N]`` when format version N was introduced, and is never edited. The read-side
tests run on every golden directory; the writer is compared with the current version's. If a test
that compares bytes with it fails, the format changed: bump ``FORMAT_VERSION``, add a builder for
the new version and a new golden directory, and keep every old one loading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import ml_dtypes
import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from ckptkit import (
    CheckpointRecord,
    CheckpointStore,
    CorruptCheckpointError,
    FileEntry,
    StoreFormatError,
)
from ckptkit._fsio import CHECKSUM_ALGORITHM, new_hasher
from ckptkit._fsread import file_checksum, read_verified
from ckptkit._manifest import _PLAIN_FORMAT_VERSION as PLAIN_FORMAT_VERSION
from ckptkit._manifest import (
    CHECKSUM_FORMS,
    FORMAT_VERSION,
    SHARD_INDEX,
    dumps,
    loads,
    shard_file_name,
)
from ckptkit._safetensors import _CODE_TO_NAME, numpy_dtype
from ckptkit._safetensors_read import parse_safetensors
from ckptkit._tree import flatten_state
from tests.helpers.sharded import Tensors, save_sharded
from tests.strategies import assert_same_state, floats_any_bits, keys, state_trees

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
#: Every golden store, by format version: tests/data/format_v<N>/.
GOLDEN_DIRS = {
    int(p.name.removeprefix("format_v")): p
    for p in sorted(DATA.glob("format_v*"), key=lambda p: int(p.name.removeprefix("format_v")))
}
GOLDEN_V1 = GOLDEN_DIRS[1]
GOLDEN_CURRENT = GOLDEN_DIRS.get(FORMAT_VERSION, DATA / f"format_v{FORMAT_VERSION}")
#: The checksum algorithm each format version's writer used for every file.
GOLDEN_CHECKSUM_ALGORITHMS = {1: "sha256", 2: "xxh3_128", 3: "xxh3_128"}
MANIFEST_SCHEMA = json.loads((REPO / "docs" / "manifest.schema.json").read_text("utf-8"))
STATE_SCHEMA = json.loads((REPO / "docs" / "state.schema.json").read_text("utf-8"))
CHECKPOINT_FILES = ("arrays.safetensors", "state.json")
#: The files a golden sharded checkpoint has besides those: two ranks' shards and the index.
SHARDED_FILES = (shard_file_name(0), shard_file_name(1), SHARD_INDEX)

# -- the inputs of the golden stores (frozen: the golden bytes depend on them) ----------------------

GOLDEN_STEPS = (0, 7, 10**12)

#: Every dtype code of format_versions 1 and 2, in a fixed order.
GOLDEN_DTYPE_CODES = (
    "BOOL",
    "U8",
    "I8",
    "U16",
    "I16",
    "U32",
    "I32",
    "U64",
    "I64",
    "F16",
    "F32",
    "F64",
    "C64",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
)


def _float(bits: str) -> float:
    """The Python float with these 64 bits (big-endian hex), NaN payloads included."""
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


def _from_bits(words: list[int], uint: Any, dtype: Any) -> np.ndarray:
    """An array of ``dtype`` with exactly these bit patterns (no float conversion involved)."""
    return np.array(words, dtype=uint).view(dtype)


def _pattern(code: str, step: int) -> np.ndarray:
    """A 2x3 array of ``code`` whose bytes follow a fixed pattern, reaching odd bit patterns."""
    dtype = numpy_dtype(code)
    raw = bytes((i * 37 + 11 * step + 5) % 256 for i in range(6 * dtype.itemsize))
    if code == "BOOL":
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dtype).reshape(2, 3).copy()


def golden_state(step: int) -> dict[str, Any]:
    """The state saved at ``step`` in the golden store; the same call always builds the same tree."""
    nan_payload = _float("7ff800000000dead")
    return {
        "step": step,
        "dtypes": {code.lower(): _pattern(code, step) for code in GOLDEN_DTYPE_CODES},
        "special": {
            "f64": np.array([nan_payload, -0.0, math.inf, -math.inf, 5e-324, 1.5 + step]),
            "f32": _from_bits(
                [0x7FC00123, 0x80000000, 0x7F800000, 0xFF800000], np.uint32, np.float32
            ),
            "bf16": _from_bits(
                [0x3F80, 0xC020, 0x7F80, 0x7FC1, 0x8000], np.uint16, ml_dtypes.bfloat16
            ),
            "f8": _from_bits([0x30, 0xFE, 0x7F, 0x80], np.uint8, ml_dtypes.float8_e4m3fn),
        },
        "shapes": {
            "zero_d": np.array(3.25 + step),
            "zero_d_int8": np.array(-7, dtype=np.int8),
            "empty": np.zeros((0,), dtype=np.float32),
            "empty_3d": np.zeros((2, 0, 3), dtype=ml_dtypes.bfloat16),
            "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[::2, 1::2],
            "transposed": np.arange(6, dtype=np.float64).reshape(2, 3).T,
            "reversed": np.arange(5, dtype=np.int16)[::-1],
        },
        "scalars": (
            np.float32(1.5),
            np.float64(nan_payload),
            np.float16(-0.0),
            np.int64(-5 - step),
            np.uint64(2**64 - 1),
            np.bool_(True),
            np.complex64(1 - 2j),
            _from_bits([0x4040], np.uint16, ml_dtypes.bfloat16)[0],
            _from_bits([0x7C], np.uint8, ml_dtypes.float8_e5m2)[0],
            np.uint8(step % 256),
        ),
        "floats": [nan_payload, _float("fff0000000000001"), -0.0, 0.0, math.inf, -math.inf, 0.1],
        "ints": [0, -1, 2**63, -(2**64) - 1, 2**1999, 2**2000, -(3**1500), 7**999 + step],
        "sequences": ((), [], (1, [2, (3,)]), [(), [()]], ("a", np.arange(2, dtype=np.int64))),
        "keys": {
            "$x": 1,
            "$$y": 2,
            "$": 3,
            "$tuple": [4],
            "$array": "not an array",
            "$float": np.zeros(1, dtype=np.float32),
            "a.b": np.ones(2, dtype=np.float32),
            "a": {"b": np.full(2, 2.0, dtype=np.float32)},
            "": None,
            "0": "zero",
            "é": np.arange(3, dtype=np.uint16),
            "\u6f22\u5b57": "\u5024",
            "\U0001f600": {"ok": True},
            "\ud800": np.ones(1, dtype=np.int8),
        },
        "strings": [
            "",
            'quote " and \\',
            "tab\t newline\n",
            "\x00",
            "ünïcödé \u6f22\u5b57 \U0001f600",
        ],
        "order": {"z": 1, "a": 2, "m": [None, True, False]},
        "__metadata__": np.ones(1, dtype=np.uint8),
    }


GOLDEN_METRICS: dict[int, dict[str, float]] = {
    0: {"loss": 2.5, "val_loss": math.nan, "acc": 0.0},
    7: {"loss": math.inf, "val_loss": 1.25},
    10**12: {"loss": -math.inf, "val_loss": 0.5, "acc": 1.0},
}


def golden_metadata(step: int) -> dict[str, Any]:
    """The metadata saved with ``step`` in the golden store."""
    return {
        "tag": ("run", step),
        "nested": {"lr": 0.1, "schedule": {"warmup": 5, "$x": True, "pair": [1, (2, 3)]}},
        "nonfinite": [math.inf, _float("7ff800000000beef")],
        "big": 2**2001 + step,
        "np": np.float32(0.5),
        "unicode é": "\u6f22\u5b57",
    }


#: The paths of the tensors a golden sharded checkpoint splits across two ranks' files.
GOLDEN_SHARDED_PATHS: tuple[tuple[str | int, ...], ...] = (
    ("sharded", "w"),
    ("sharded", "layers", 0, "bias"),
    ("sharded", "layers", 1),
    ("sharded", "a.b"),
    ("sharded", "mask"),
    ("sharded", "empty"),
)


def golden_sharded_state(step: int) -> dict[str, Any]:
    """The state saved at ``step`` in a sharded golden checkpoint: the golden state and more.

    The ``sharded`` subtree's arrays are split along dim 0 across two ranks: 5 rows as 3 and 2,
    4 as 2 and 2, 1 as 1 and none, 0 rows as no chunk at all.
    """
    state = golden_state(step)
    state["sharded"] = {
        "w": (np.arange(15, dtype=np.float32).reshape(5, 3) - 7.5) * (step + 1),
        "layers": [
            {"bias": _from_bits([0x3F80, 0xC020, 0x7FC1, 0x8000], np.uint16, ml_dtypes.bfloat16)},
            np.array([[step, -(2**62)]], dtype=np.int64),
        ],
        "a.b": np.arange(12, dtype=np.uint8).reshape(3, 2, 2) + step % 7,
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }
    return state


def _at(tree: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def golden_sharded_tensors(state: Any) -> Tensors:
    """The sharded tensors of a golden sharded state, by path."""
    return {path: _at(state, path) for path in GOLDEN_SHARDED_PATHS}


def build_golden_store(root: Path) -> CheckpointStore:
    """Write the golden store's checkpoints into ``root``, in a fixed order of operations."""
    store = CheckpointStore(root)
    store.save(0, golden_state(0), metrics=GOLDEN_METRICS[0], metadata=golden_metadata(0))
    store.save(7, {"draft": True}, metrics={"loss": 9.0})  # overwritten below: step_...7.1
    store.save(
        7, golden_state(7), metrics=GOLDEN_METRICS[7], metadata=golden_metadata(7), overwrite=True
    )
    step = GOLDEN_STEPS[2]
    store.save(
        step, golden_state(step), metrics=GOLDEN_METRICS[step], metadata=golden_metadata(step)
    )
    store.pin(0)
    return store


def build_sharded_golden_store(root: Path) -> CheckpointStore:
    """:func:`build_golden_store`, with steps 7 and 10**12 saved sharded across two ranks.

    The shard files and ``shards.json`` are written through the save's ``extra`` hook as a
    distributed save writes them (rank 1 joins the checkpoint), with the core alone.
    """
    store = CheckpointStore(root)
    store.save(0, golden_state(0), metrics=GOLDEN_METRICS[0], metadata=golden_metadata(0))
    store.save(7, {"draft": True}, metrics={"loss": 9.0})  # overwritten below: step_...7.1
    for step in GOLDEN_STEPS[1:]:
        state = golden_sharded_state(step)
        save_sharded(
            store,
            step,
            state,
            golden_sharded_tensors(state),
            metrics=GOLDEN_METRICS[step],
            metadata=golden_metadata(step),
            overwrite=step == 7,
        )
    store.pin(0)
    return store


#: The builder of each format version's golden store, for tests/data/make_golden.py. Version 2
#: changed only the checksum algorithm, so it saves the same checkpoints as version 1; version 3
#: added sharded checkpoints, and saves two of the three sharded.
GOLDEN_BUILDERS: dict[int, Callable[[Path], CheckpointStore]] = {
    1: build_golden_store,
    2: build_golden_store,
    3: build_sharded_golden_store,
}
#: The sharded steps of each format version's golden store.
GOLDEN_SHARDED_STEPS: dict[int, tuple[int, ...]] = {1: (), 2: (), 3: GOLDEN_STEPS[1:]}


def golden_loaded_state(version: int, step: int) -> dict[str, Any]:
    """The tree that ``step`` of the golden store of ``version`` loads as."""
    if step in GOLDEN_SHARDED_STEPS[version]:
        return golden_sharded_state(step)
    return golden_state(step)


# -- helpers ------------------------------------------------------------------------------------


def _validate(schema: dict[str, Any], doc: object) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)


def _is_valid(schema: dict[str, Any], doc: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(doc)


def _without_created(manifest: bytes) -> bytes:
    return re.sub(rb'"created": [-+.0-9eE]+', b'"created": 0', manifest)


def _checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _version(golden_dir: Path) -> int:
    return int(golden_dir.name.removeprefix("format_v"))


def _golden_files(version: int, step: int) -> tuple[str, ...]:
    """The files, in the manifest's order, of ``step`` in the golden store of ``version``."""
    sharded = step in GOLDEN_SHARDED_STEPS[version]
    return CHECKPOINT_FILES + (SHARDED_FILES if sharded else ())


def _manifest_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for record in manifest["checkpoints"] for entry in record["files"]]


#: Parametrizes a test over every golden directory (the directory itself: do not write to it).
every_golden_dir = pytest.mark.parametrize(
    "golden_dir", list(GOLDEN_DIRS.values()), ids=[p.name for p in GOLDEN_DIRS.values()]
)


@pytest.fixture(params=list(GOLDEN_DIRS.values()), ids=[p.name for p in GOLDEN_DIRS.values()])
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of each golden store: opening a store sweeps and creates its lock file."""
    source: Path = request.param
    return Path(shutil.copytree(source, tmp_path / source.name))


# -- the golden stores -----------------------------------------------------------------------------


def test_every_format_version_has_a_golden_store_and_a_builder() -> None:
    """Each format version up to the current one has its golden directory and its builder."""
    versions = list(range(1, FORMAT_VERSION + 1))
    assert list(GOLDEN_DIRS) == versions
    assert sorted(GOLDEN_BUILDERS) == versions
    assert sorted(CHECKSUM_FORMS) == versions
    assert CHECKSUM_ALGORITHM in CHECKSUM_FORMS[FORMAT_VERSION], "the writer's own checksums"


@every_golden_dir
def test_golden_store_holds_only_committed_files_and_is_small(golden_dir: Path) -> None:
    """The golden directory has the manifest and three checkpoints of their files, no lock, < 100 KB.

    Each checkpoint has the two fixed files, and a sharded one two shard files and the index.
    """
    version = _version(golden_dir)
    names = sorted(str(p.relative_to(golden_dir)) for p in golden_dir.rglob("*"))
    dirs = ["step_000000000000", "step_000000000007.1", "step_1000000000000"]
    expected = ["manifest.json"] + [
        f"{d}{suffix}"
        for d, step in zip(dirs, GOLDEN_STEPS, strict=True)
        for suffix in ("", *(f"/{f}" for f in _golden_files(version, step)))
    ]
    assert names == sorted(expected)
    assert sum(p.stat().st_size for p in golden_dir.rglob("*") if p.is_file()) < 100_000


def test_golden_checkpoints_load_exactly(golden: Path) -> None:
    """Every golden step loads to the tree it was saved from: types, dtypes, shapes, bits."""
    store = CheckpointStore(golden)
    for step in GOLDEN_STEPS:
        assert_same_state(golden_loaded_state(_version(golden), step), store.load(step))


def test_golden_records_keep_steps_pins_metrics_and_metadata(golden: Path) -> None:
    """The golden manifest reads back as the records the store committed, NaN metrics included."""
    version = _version(golden)
    records = CheckpointStore(golden).records()
    assert [r.step for r in records] == list(GOLDEN_STEPS)
    assert [r.directory for r in records] == [
        "step_000000000000",
        "step_000000000007.1",
        "step_1000000000000",
    ]
    assert [r.pinned for r in records] == [True, False, False]
    for record in records:
        want = GOLDEN_METRICS[record.step]
        assert list(record.metrics) == list(want)
        for name, value in want.items():
            got = record.metrics[name]
            assert struct.pack("<d", got) == struct.pack("<d", value), (record.step, name)
        assert_same_state(golden_metadata(record.step), dict(record.metadata))
        assert [f.name for f in record.files] == list(_golden_files(version, record.step))
        assert record.sharded is (record.step in GOLDEN_SHARDED_STEPS[version])
        assert isinstance(record.created, float) and record.created > 0


def test_golden_checkpoints_verify(golden: Path) -> None:
    """Every golden checkpoint's files match the sizes and checksums in its manifest."""
    store = CheckpointStore(golden)
    for step in GOLDEN_STEPS:
        assert store.verify(step).step == step


def test_golden_checkpoints_load_exactly_when_memory_mapped(golden: Path) -> None:
    """A memory-mapped load checks each golden file's checksum with its own algorithm too."""
    store = CheckpointStore(golden)
    for step in GOLDEN_STEPS:
        assert_same_state(golden_loaded_state(_version(golden), step), store.load(step, mmap=True))
        assert set(store.read_arrays(step, verify=True)) == set(store.tensor_info(step))


@every_golden_dir
def test_golden_checksums_are_their_versions_algorithm_over_the_whole_file(
    golden_dir: Path,
) -> None:
    """Each golden checksum is the writer's algorithm of its time, over the file's bytes."""
    version = _version(golden_dir)
    algorithm = GOLDEN_CHECKSUM_ALGORITHMS[version]
    independent = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}[algorithm]
    manifest = json.loads((golden_dir / "manifest.json").read_bytes())
    assert manifest["format_version"] == version
    for record in manifest["checkpoints"]:
        for entry in record["files"]:
            data = (golden_dir / record["directory"] / entry["name"]).read_bytes()
            assert entry["checksum"] == f"{algorithm}:{independent(data).hexdigest()}"


@every_golden_dir
def test_golden_store_covers_every_dtype_and_every_tag(golden_dir: Path) -> None:
    """The golden arrays use every dtype ckptkit writes; its JSON uses every tag and an escaped key."""
    codes: set[str] = set()
    texts = [(golden_dir / "manifest.json").read_text("ascii")]
    for directory in _checkpoint_dirs(golden_dir):
        arrays, _ = parse_safetensors((directory / "arrays.safetensors").read_bytes(), source="")
        codes |= {
            code
            for code, name in _CODE_TO_NAME.items()
            for a in arrays.values()
            if a.dtype == numpy_dtype(code)
        }
        texts.append((directory / "state.json").read_text("ascii"))
    # A new dtype is a format change: old readers cannot read it, so it needs a new golden store.
    assert codes == set(_CODE_TO_NAME)
    for tag in ('"$float"', '"$int"', '"$tuple"', '"$array"', '"$scalar"', '"$$x"', '"$$$y"'):
        assert any(tag in text for text in texts), tag


def test_newer_format_version_is_refused_with_an_upgrade_message(golden: Path) -> None:
    """A manifest from a newer format is refused on open, saying which versions and what to do."""
    path = golden / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(doc), "ascii")
    with pytest.raises(
        StoreFormatError, match=r"newer than this ckptkit reads.*upgrade ckptkit-ml"
    ):
        CheckpointStore(golden)


# -- stores of older format versions --------------------------------------------------------------


def _v1_store(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GOLDEN_V1, tmp_path / "store"))


def test_saving_into_a_v1_store_writes_v2_and_keeps_the_old_sha256_checksums(
    tmp_path: Path,
) -> None:
    """A v1 store saved into gets a v2 manifest; its old records keep sha256 and still load.

    Version 2 is the newest a store without sharded checkpoints is written as.
    """
    root = _v1_store(tmp_path)
    old = json.loads((root / "manifest.json").read_bytes())
    store = CheckpointStore(root)
    added = GOLDEN_STEPS[-1] + 1
    new = store.save(added, {"w": np.arange(3, dtype=np.float32)}, metrics={"loss": 0.5})
    assert all(f.checksum.startswith(f"{CHECKSUM_ALGORITHM}:") for f in new.files)

    manifest = json.loads((root / "manifest.json").read_bytes())
    assert manifest["format_version"] == PLAIN_FORMAT_VERSION
    _validate(MANIFEST_SCHEMA, manifest)
    assert manifest["checkpoints"][:-1] == old["checkpoints"]
    assert all(e["checksum"].startswith("sha256:") for e in _manifest_files(old))

    reopened = CheckpointStore(root)
    assert [r.step for r in reopened.records()] == [*GOLDEN_STEPS, added]
    for step in GOLDEN_STEPS:
        assert reopened.verify(step).step == step
        assert_same_state(golden_state(step), reopened.load(step))
        assert_same_state(golden_state(step), reopened.load(step, mmap=True))
    reopened.verify(added)
    np.testing.assert_array_equal(reopened.load(added)["w"], np.arange(3, dtype=np.float32))


def test_a_damaged_file_of_a_sha256_record_is_still_caught_in_a_v2_store(tmp_path: Path) -> None:
    """After a v1 store moves to v2, its sha256 records still catch a changed byte."""
    root = _v1_store(tmp_path)
    store = CheckpointStore(root)
    store.unpin(0)  # rewrites the manifest as version 2, the newest without sharded records
    doc = json.loads((root / "manifest.json").read_bytes())
    assert doc["format_version"] == PLAIN_FORMAT_VERSION
    path = root / "step_000000000007.1" / "arrays.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    for check in (
        lambda: store.verify(7),
        lambda: store.load(7),
        lambda: store.load(7, mmap=True),
    ):
        with pytest.raises(CorruptCheckpointError, match=r"arrays\.safetensors: checksum"):
            check()


def _golden_manifest(version: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GOLDEN_DIRS[version] / "manifest.json").read_bytes())
    return doc


def test_a_v1_manifest_with_an_xxh3_checksum_is_refused() -> None:
    """Format version 1 had only sha256: an xxh3_128 checksum in it is refused, naming the form."""
    doc = _golden_manifest(1)
    doc["checkpoints"][1]["files"][0]["checksum"] = "xxh3_128:" + "0" * 32
    with pytest.raises(
        StoreFormatError,
        match=r"manifest.json: checkpoints\[1\] is malformed: step 7: checksum of "
        r"arrays\.safetensors is 'xxh3_128:0{32}', not sha256:<64 hex digits> "
        r"\(what manifest format_version 1 accepts\)$",
    ):
        loads(json.dumps(doc).encode(), path="manifest.json")


def test_a_v2_manifest_reads_both_checksum_forms() -> None:
    """Format version 2 reads sha256 and xxh3_128 checksums, side by side in one record."""
    doc = _golden_manifest(2)
    files = doc["checkpoints"][0]["files"]
    files[0]["checksum"] = "sha256:" + "ab" * 32
    (record, *_) = loads(json.dumps(doc).encode(), path="manifest.json")
    assert [f.checksum.partition(":")[0] for f in record.files] == ["sha256", "xxh3_128"]


@pytest.mark.parametrize(
    "checksum",
    [
        "md5:" + "0" * 32,
        "blake3:" + "0" * 64,
        "xxh3_64:" + "0" * 16,
        "XXH3_128:" + "0" * 32,
        "xxh3_128:" + "0" * 64,
        "sha256:" + "0" * 32,
    ],
)
def test_an_unknown_checksum_algorithm_or_length_is_refused(checksum: str) -> None:
    """A checksum of another algorithm or length is refused, and the message lists the forms."""
    doc = _golden_manifest(FORMAT_VERSION)
    doc["checkpoints"][0]["files"][1]["checksum"] = checksum
    with pytest.raises(StoreFormatError) as info:
        loads(json.dumps(doc).encode(), path="manifest.json")
    assert str(info.value).endswith(
        f"checksum of state.json is {checksum!r}, not sha256:<64 hex digits> or "
        f"xxh3_128:<32 hex digits> (what manifest format_version {FORMAT_VERSION} accepts)"
    )


def test_hashing_an_unknown_algorithm_raises_a_clear_value_error(tmp_path: Path) -> None:
    """The file primitives refuse an algorithm they do not know, and hash with either they do."""
    (tmp_path / "state.json").write_bytes(b"{}")
    message = r"checksum algorithm 'md5' is not one ckptkit knows \(sha256, xxh3_128\)"
    with pytest.raises(ValueError, match=message):
        new_hasher("md5")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match=message):
            file_checksum("state.json", dir_fd=fd, algorithm="md5")
        with pytest.raises(ValueError, match=message):
            read_verified("state.json", dir_fd=fd, size=2, checksum="md5:" + "0" * 32)
        for algorithm, digest in (
            ("sha256", hashlib.sha256(b"{}").hexdigest()),
            ("xxh3_128", xxhash.xxh3_128(b"{}").hexdigest()),
        ):
            assert file_checksum("state.json", dir_fd=fd, algorithm=algorithm) == (
                2,
                f"{algorithm}:{digest}",
            )
    finally:
        os.close(fd)


# -- the writer still writes the golden bytes ---------------------------------------------------------


def test_writer_reproduces_the_golden_manifest_except_created(tmp_path: Path) -> None:
    """The same saves give a manifest byte-identical to the golden one but for ``created``."""
    GOLDEN_BUILDERS[FORMAT_VERSION](tmp_path)
    written = (tmp_path / "manifest.json").read_bytes()
    golden = (GOLDEN_CURRENT / "manifest.json").read_bytes()
    assert written != _without_created(written), "no created value was masked"
    assert _without_created(written) == _without_created(golden)


def test_writer_reproduces_the_golden_checkpoint_files_byte_for_byte(tmp_path: Path) -> None:
    """The same states give checkpoint files (shards and index included) identical to the golden ones."""
    GOLDEN_BUILDERS[FORMAT_VERSION](tmp_path)
    written, golden = _checkpoint_dirs(tmp_path), _checkpoint_dirs(GOLDEN_CURRENT)
    assert [d.name for d in written] == [d.name for d in golden]
    for new, old in zip(written, golden, strict=True):
        names = sorted(p.name for p in old.iterdir())
        assert sorted(p.name for p in new.iterdir()) == names
        for name in names:
            assert (new / name).read_bytes() == (old / name).read_bytes(), f"{old.name}/{name}"


def _load_make_golden() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_golden_writes_a_golden_store_once_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """The generator writes the golden layout without a lock file, then refuses to write it again."""
    make_golden = _load_make_golden()
    target = make_golden.main(tmp_path)
    assert target == tmp_path / f"format_v{FORMAT_VERSION}"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        p.name for p in GOLDEN_CURRENT.iterdir()
    )
    before = (target / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="only ever added"):
        make_golden.main(tmp_path)
    assert (target / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# -- the schemas ------------------------------------------------------------------------------------


def test_schemas_are_valid_draft_2020_12() -> None:
    """Both schemas are themselves valid JSON Schema 2020-12 documents."""
    jsonschema.Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(STATE_SCHEMA)


def test_state_schema_shares_the_tag_definitions_of_the_manifest_schema() -> None:
    """state.schema.json defines tags as the manifest schema does, plus the array tag."""
    shared = {k: v for k, v in STATE_SCHEMA["$defs"].items() if k not in ("value", "arrayTag")}
    assert shared == {k: MANIFEST_SCHEMA["$defs"][k] for k in shared}
    value = STATE_SCHEMA["$defs"]["value"]["anyOf"]
    assert value == [*MANIFEST_SCHEMA["$defs"]["value"]["anyOf"], {"$ref": "#/$defs/arrayTag"}]


@every_golden_dir
def test_golden_files_match_the_schemas(golden_dir: Path) -> None:
    """The golden manifest and every golden state.json validate against the documented schemas."""
    _validate(MANIFEST_SCHEMA, json.loads((golden_dir / "manifest.json").read_bytes()))
    for directory in _checkpoint_dirs(golden_dir):
        _validate(STATE_SCHEMA, json.loads((directory / "state.json").read_bytes()))


def _store_golden(root: Path) -> None:
    build_golden_store(root)


def _store_golden_sharded(root: Path) -> None:
    build_sharded_golden_store(root)


def _store_with_retention(root: Path) -> None:
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="val_loss", keep_every=4)
    for step in range(9):
        store.save(
            step,
            {"w": np.full(3, step, dtype=np.float32)},
            metrics={"val_loss": 1 / (1 + step % 3)},
        )
        if step == 1:
            store.pin(1)


def _store_of_a_bare_array(root: Path) -> None:
    CheckpointStore(root).save(5, np.arange(4, dtype=np.int64))


def _store_of_an_empty_state(root: Path) -> None:
    store = CheckpointStore(root)
    store.save(0, {}, metrics={"m": math.nan}, metadata={})
    store.save(0, [], overwrite=True)
    store.save(2, None, metadata={"$": {"$tuple": ()}})


@pytest.mark.parametrize(
    "make",
    [
        _store_golden,
        _store_golden_sharded,
        _store_with_retention,
        _store_of_a_bare_array,
        _store_of_an_empty_state,
    ],
    ids=lambda f: f.__name__.removeprefix("_store_"),
)
def test_written_stores_match_the_schemas(tmp_path: Path, make: Callable[[Path], None]) -> None:
    """Manifests and state files the current writer produces validate against the schemas."""
    make(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_bytes())
    _validate(MANIFEST_SCHEMA, manifest)
    assert manifest["checkpoints"], "the store should list checkpoints"
    for record in manifest["checkpoints"]:
        _validate(
            STATE_SCHEMA, json.loads((tmp_path / record["directory"] / "state.json").read_bytes())
        )


def test_manifest_of_no_checkpoints_matches_the_schema() -> None:
    """The manifest of a store whose checkpoints were all dropped validates too."""
    _validate(MANIFEST_SCHEMA, json.loads(dumps([])))


def _schema_keys(definition: dict[str, Any]) -> set[str]:
    return set(definition["properties"])


def test_schema_names_exactly_the_keys_the_writer_writes(tmp_path: Path) -> None:
    """Every key the writer writes is described in the schema, and every described key is written."""
    build_sharded_golden_store(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_bytes())
    defs = MANIFEST_SCHEMA["$defs"]
    assert set(manifest) == _schema_keys(MANIFEST_SCHEMA)
    for record in manifest["checkpoints"]:
        assert set(record) == _schema_keys(defs["checkpoint"])
        for entry in record["files"]:
            assert set(entry) == _schema_keys(defs["file"])


_metadata = st.dictionaries(keys(), state_trees(with_arrays=False, max_leaves=10), max_size=4)


_checksums = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.binary(min_size=16, max_size=16).map(lambda b: "xxh3_128:" + b.hex()),
)


@given(
    steps=st.lists(st.integers(0, 10**15), unique=True, max_size=4),
    metrics=st.dictionaries(st.text(max_size=5), floats_any_bits(), max_size=3),
    metadata=_metadata,
    pinned=st.booleans(),
    checksum=_checksums,
)
def test_any_records_dump_to_a_manifest_the_schema_accepts(
    steps: list[int],
    metrics: dict[str, float],
    metadata: dict[str, Any],
    pinned: bool,
    checksum: str,
) -> None:
    """Whatever records the writer is given, its manifest validates and reads back as the same."""
    records = [
        CheckpointRecord(
            step=step,
            directory=f"step_{step:012d}.{i}" if i else f"step_{step:012d}",
            created=1.5e9 + i,
            pinned=pinned,
            metrics=metrics,
            metadata=metadata,
            files=(FileEntry(name="state.json", size=i, checksum=checksum),),
        )
        for i, step in enumerate(steps)
    ]
    data = dumps(records)
    _validate(MANIFEST_SCHEMA, json.loads(data))
    read = loads(data, path="manifest.json")
    assert [r.step for r in read] == sorted(steps)
    assert all(f.checksum == checksum for r in read for f in r.files)


@given(state_trees())
def test_any_state_flattens_to_a_state_file_the_schema_accepts(state: object) -> None:
    """The skeleton of any savable state tree validates against state.schema.json."""
    skeleton, _ = flatten_state(state)
    _validate(STATE_SCHEMA, json.loads(json.dumps({"format_version": 1, "tree": skeleton})))


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return mutate


def _then(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for change in changes:
            change(doc)

    return mutate


def _sha256_everywhere(doc: dict[str, Any]) -> None:
    for entry in _manifest_files(doc):
        entry["checksum"] = "sha256:" + hashlib.sha256(entry["checksum"].encode()).hexdigest()


def _unsharded(doc: dict[str, Any]) -> None:
    """Drop the shard files and index from every record, as if no checkpoint were sharded."""
    for record in doc["checkpoints"]:
        record["files"] = [f for f in record["files"] if f["name"] in CHECKPOINT_FILES]


def _without_files(record: int, drop: Callable[[str], bool]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        files = doc["checkpoints"][record]["files"]
        doc["checkpoints"][record]["files"] = [f for f in files if not drop(f["name"])]

    return mutate


def _rename_file(record: int, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for entry in doc["checkpoints"][record]["files"]:
            if entry["name"] == old:
                entry["name"] = new

    return mutate


_RECORD = ("checkpoints", 1)
_FILE = (*_RECORD, "files", 0)
_META = (*_RECORD, "metadata")
_CHECKSUM = (*_FILE, "checksum")
_VERSION_1 = _set(("format_version",), 1)
_VERSION_2 = _set(("format_version",), 2)
_SHARD_0 = shard_file_name(0)

#: (id, change to the golden manifest, whether the reader accepts the result).
MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], bool]] = [
    ("unknown-top-level-key", _set(("comment",), "x"), True),
    ("unknown-record-key", _set((*_RECORD, "note"), 1), True),
    ("unknown-file-key", _set((*_FILE, "mtime"), 1), True),
    ("pinned-absent", _delete((*_RECORD, "pinned")), True),
    ("metrics-absent", _delete((*_RECORD, "metrics")), True),
    ("metadata-absent", _delete(_META), True),
    ("integer-metric", _set((*_RECORD, "metrics", "loss"), 3), True),
    ("integer-created", _set((*_RECORD, "created"), 1700000000), True),
    ("escaped-metadata-key", _set(_META, {"$$a": 1}), True),
    ("finite-float-tag", _set(_META, {"a": {"$float": "3ff0000000000000"}}), True),
    ("int-scalar", _set(_META, {"a": {"$scalar": ["U8", 255]}}), True),
    ("hex-f32-scalar", _set(_META, {"a": {"$scalar": ["F32", "0000c07f"]}}), True),
    ("long-directory", _set((*_RECORD, "directory"), "step_0000000000007.12"), True),
    ("newer-version", _set(("format_version",), FORMAT_VERSION + 1), False),
    ("version-zero", _set(("format_version",), 0), False),
    ("string-version", _set(("format_version",), "1"), False),
    ("no-version", _delete(("format_version",)), False),
    ("no-checkpoints", _delete(("checkpoints",)), False),
    ("checkpoints-object", _set(("checkpoints",), {}), False),
    ("negative-step", _set((*_RECORD, "step"), -1), False),
    ("bool-step", _set((*_RECORD, "step"), True), False),
    ("no-step", _delete((*_RECORD, "step")), False),
    ("short-directory", _set((*_RECORD, "directory"), "step_7"), False),
    ("escaping-directory", _set((*_RECORD, "directory"), "../step_000000000007"), False),
    ("no-directory", _delete((*_RECORD, "directory")), False),
    ("string-created", _set((*_RECORD, "created"), "now"), False),
    ("no-created", _delete((*_RECORD, "created")), False),
    ("string-pinned", _set((*_RECORD, "pinned"), "yes"), False),
    ("lowercase-nan-metric", _set((*_RECORD, "metrics", "loss"), "nan"), False),
    ("null-metric", _set((*_RECORD, "metrics", "loss"), None), False),
    ("bool-metric", _set((*_RECORD, "metrics", "loss"), False), False),
    ("metadata-list", _set(_META, []), False),
    ("metadata-tag", _set(_META, {"$tuple": []}), False),
    ("unescaped-dollar-key", _set(_META, {"a": 1, "$b": 2}), False),
    ("bad-float-tag", _set(_META, {"a": {"$float": "zz"}}), False),
    ("bad-int-tag", _set(_META, {"a": {"$int": "12"}}), False),
    ("array-tag", _set(_META, {"a": {"$array": "w"}}), False),
    ("unknown-tag", _set(_META, {"a": {"$set": []}}), False),
    ("short-hex-scalar", _set(_META, {"a": {"$scalar": ["F32", "00"]}}), False),
    ("int-bool-scalar", _set(_META, {"a": {"$scalar": ["BOOL", 1]}}), False),
    ("float-complex-scalar", _set(_META, {"a": {"$scalar": ["C64", 1.5]}}), False),
    ("unknown-dtype-scalar", _set(_META, {"a": {"$scalar": ["F128", 1.5]}}), False),
    ("unknown-file", _set((*_FILE, "name"), "model.bin"), False),
    ("negative-size", _set((*_FILE, "size"), -1), False),
    ("sha256-checksum", _set(_CHECKSUM, "sha256:" + "0" * 64), True),
    ("version-1-all-sha256", _then(_VERSION_1, _unsharded, _sha256_everywhere), True),
    ("version-1-with-xxh3", _then(_VERSION_1, _unsharded), False),
    (
        "version-1-one-xxh3",
        _then(_VERSION_1, _unsharded, _sha256_everywhere, _set(_CHECKSUM, "xxh3_128:" + "0" * 32)),
        False,
    ),
    ("version-1-with-shard-files", _then(_VERSION_1, _sha256_everywhere), False),
    ("version-2-unsharded", _then(_VERSION_2, _unsharded), True),
    ("version-2-with-shard-files", _VERSION_2, False),
    (
        "version-2-with-only-an-index",
        _then(_VERSION_2, _without_files(1, lambda name: name.startswith("shard_"))),
        False,
    ),
    ("version-3-unsharded", _unsharded, True),
    ("index-without-shard-files", _without_files(1, lambda name: name.startswith("shard_")), True),
    ("shard-files-without-index", _without_files(1, lambda name: name == SHARD_INDEX), False),
    ("one-shard-file", _without_files(1, lambda name: name == _SHARD_0), True),
    ("long-shard-number", _rename_file(1, _SHARD_0, "shard_012345.safetensors"), True),
    ("short-shard-number", _rename_file(1, _SHARD_0, "shard_0000.safetensors"), False),
    ("shard-file-of-another-kind", _rename_file(1, _SHARD_0, "shard_00000.bin"), False),
    ("signed-shard-number", _rename_file(1, _SHARD_0, "shard_-0001.safetensors"), False),
    ("index-of-another-name", _rename_file(1, SHARD_INDEX, "shards.index.json"), False),
    ("md5-checksum", _set(_CHECKSUM, "md5:" + "0" * 32), False),
    ("xxh3_64-checksum", _set(_CHECKSUM, "xxh3_64:" + "0" * 16), False),
    ("uppercase-checksum", _set(_CHECKSUM, "sha256:" + "A" * 64), False),
    ("uppercase-xxh3-checksum", _set(_CHECKSUM, "xxh3_128:" + "A" * 32), False),
    ("uppercase-algorithm", _set(_CHECKSUM, "XXH3_128:" + "0" * 32), False),
    ("short-xxh3-checksum", _set(_CHECKSUM, "xxh3_128:" + "0" * 31), False),
    ("long-xxh3-checksum", _set(_CHECKSUM, "xxh3_128:" + "0" * 64), False),
    ("short-sha256-checksum", _set(_CHECKSUM, "sha256:" + "0" * 32), False),
    ("two-checksums", _set(_CHECKSUM, "sha256:" + "0" * 64 + "xxh3_128:" + "0" * 32), False),
    ("bare-digest", _set(_CHECKSUM, "0" * 32), False),
    ("no-files", _delete((*_RECORD, "files")), False),
]


@pytest.mark.parametrize(
    ("change", "accepted"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_schema_and_reader_agree(change: Callable[[dict[str, Any]], None], accepted: bool) -> None:
    """A changed manifest passes the schema exactly when ckptkit's reader accepts it."""
    doc = _golden_manifest(FORMAT_VERSION)
    change(doc)
    data = json.dumps(doc).encode("ascii")
    if accepted:
        loads(data, path="manifest.json")
    else:
        with pytest.raises(StoreFormatError):
            loads(data, path="manifest.json")
    assert _is_valid(MANIFEST_SCHEMA, doc) is accepted
