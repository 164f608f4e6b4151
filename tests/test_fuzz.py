"""Fuzzing the loader with mutated real checkpoints: only CkptkitError subclasses ever escape.

Each example restores a real store, damages one file (bit flips, overwritten, inserted or
deleted bytes, truncation, extension, edits of the safetensors header or of the JSON of
state.json and manifest.json, a file swapped, removed or replaced by a directory or a symlink),
sometimes patches the manifest's size and checksum so the parsers meet the damage, then loads,
verifies and lists. The parsers are also fuzzed on their own.

By default (600 store examples, 1200 per parser test) the file takes about half a minute. A
long run (about 13 ms per store example and 4 ms per parser example on 2 cores: roughly two and
a half hours), with the tally of examples and of errors by type printed at the end:

    CKPTKIT_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_fuzz.py -s

A failure prints the Hypothesis blob that reproduces it under ``HYPOTHESIS_PROFILE=ci`` (as CI
sets); ``--hypothesis-seed=N`` replays a whole run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit import (
    CheckpointStore,
    CkptkitError,
    CorruptCheckpointError,
    FallbackWarning,
    StoreFormatError,
    UnsupportedStateError,
)
from ckptkit._manifest import dumps, loads
from ckptkit._safetensors import numpy_dtype
from ckptkit._safetensors_read import parse_safetensors
from tests.strategies import DTYPE_CODES, assert_same_state

#: Examples of the store fuzz test; the parser tests run ``PARSER_FACTOR`` times as many.
EXAMPLES = int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "600"))
PARSER_FACTOR = 2
#: One example that runs longer than this has hung (a FIFO open, a retry loop).
EXAMPLE_TIME_LIMIT_S = 30

#: (test, call, outcome) -> count; outcome is "ok" or the error's class name.
TALLY: Counter[tuple[str, str, str]] = Counter()
RUNS: Counter[str] = Counter()

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
FUZZ_PARSER = settings(FUZZ, max_examples=EXAMPLES * PARSER_FACTOR)

MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
STATE_JSON = "state.json"


@pytest.fixture(scope="module", autouse=True)
def _print_tally() -> Iterator[None]:
    """Print how many examples ran and what each call returned or raised, after the module."""
    yield
    lines = [f"\ntest_fuzz: {sum(RUNS.values())} examples"]
    for test in sorted(RUNS):
        lines.append(f"  {test}: {RUNS[test]} examples")
        calls = sorted({call for t, call, _ in TALLY if t == test})
        for call in calls:
            outcomes = {o: n for (t, c, o), n in TALLY.items() if (t, c) == (test, call)}
            shown = ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items()))
            lines.append(f"    {call}: {shown}")
    print("\n".join(lines))


def _attempt(test: str, call: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; count its outcome. A CkptkitError is returned; anything else propagates."""
    try:
        value = fn()
    except CkptkitError as e:
        TALLY[test, call, type(e).__name__] += 1
        return e
    TALLY[test, call, "ok"] += 1
    return value


class _Hung(AssertionError):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Fail (rather than hang the run) when the body takes longer than ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise _Hung(f"one fuzz example ran for more than {seconds} s: a read blocked or looped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _walk(state: object) -> None:
    """Touch every node of a loaded state; every array's bytes are read (out-of-bounds crash)."""
    stack = [state]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            assert all(type(k) is str for k in node), list(node)
            stack.extend(node.values())
        elif type(node) in (list, tuple):
            stack.extend(node)  # type: ignore[arg-type]
        elif isinstance(node, (np.ndarray, np.generic)):
            assert node.dtype.kind in "biufcV" and node.nbytes == len(node.tobytes())
        else:
            assert node is None or type(node) in (bool, int, float, str), type(node)


# -- the seed stores ---------------------------------------------------------------------------


def _nested(step: int) -> dict[str, Any]:
    return {
        "model": {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3) + step,
            "b": np.array([1.5, -0.0, np.nan], np.float16),
            "mask": np.array([True, False, True]),
            "empty": np.zeros((0, 3), np.float32),
        },
        "optimizer": {
            "step": np.array(step, np.int64),
            "state": [{"exp_avg": np.full(2, step, np.float32)}, (np.int64(7), np.float16(0.5))],
        },
        "epoch": step,
        "history": [0.5, math.nan, math.inf, -0.0],
        "big": 10**700 + step,
        "pair": (1, "x", None, True),
        "$escaped": {"$array": "not a tag"},
    }


def _build(root: Path, states: dict[int, Any], pin: int | None = None) -> None:
    store = CheckpointStore(root, monitor="val_loss")
    for step, state in states.items():
        store.save(
            step,
            state,
            metrics={"val_loss": 1.0 / (step + 1), "acc": math.nan},
            metadata={"run": "fuzz", "cfg": {"lr": 1e-3, "layers": (2, 3)}},
        )
    if pin is not None:
        store.pin(pin)


@dataclass(frozen=True, repr=False)
class Seed:
    name: str
    root: Path
    states: dict[int, Any]
    files: dict[str, bytes]  # path relative to root -> bytes, the manifest included
    listed: dict[str, tuple[int, str]]  # relative path of each listed file -> (step, name)

    def __repr__(self) -> str:
        return f"Seed({self.name!r})"


SEED_STATES: dict[str, tuple[dict[int, Any], int | None]] = {
    "nested": ({1: _nested(1), 2: _nested(2), 3: _nested(3)}, 2),
    "flat": (
        {
            0: {},
            5: [None, True, 1, "s", 2**3000, -(2**2001), (), []],
            7: {"x": np.linspace(-1, 1, 256).reshape(16, 16), "n": np.uint8(3)},
        },
        None,
    ),
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    """The seed stores, written once per module with the real writer."""
    base = tmp_path_factory.mktemp("fuzz-seeds")
    out = {}
    for name, (states, pin) in SEED_STATES.items():
        root = base / name
        _build(root, states, pin)
        files = {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        listed = {
            f"{r.directory}/{f.name}": (r.step, f.name)
            for r in CheckpointStore(root).records()
            for f in r.files
        }
        out[name] = Seed(name=name, root=root, states=states, files=files, listed=listed)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each seed store is copied, and restored before each example."""
    return tmp_path_factory.mktemp("fuzz-work")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _restore(seed: Seed, root: Path) -> None:
    """Make ``root`` hold exactly the seed's files again (much cheaper than a fresh copy)."""
    wanted = {*seed.files, *(str(Path(p).parent) for p in seed.files), ".ckptkit.lock"}
    if root.is_dir():
        for path in sorted(root.rglob("*"), reverse=True):  # children before their directory
            rel = str(path.relative_to(root))
            is_dir = path.is_dir() and not path.is_symlink()
            if rel not in wanted or is_dir != (rel not in seed.files and rel != ".ckptkit.lock"):
                _remove(path)
    for rel, data in seed.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.is_symlink() or path.read_bytes() != data:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            path.write_bytes(data)


# -- mutations ---------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**31, 2**32, 2**53 + 1]
INTERESTING_INTS += [2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63), 10**400]
INTERESTING_VALUES = [
    *INTERESTING_INTS,
    -(10**400),
    1e308,
    5e-324,
    -0.0,
    0.5,
    None,
    True,
    "",
    [],
    {},
]
INTERESTING_STRINGS = [*DTYPE_CODES, "F4", "F128", "", "w", "model.w", "__metadata__"]
INTERESTING_STRINGS += ["step_000000000001", "step_000000000002.1", "../x", "/", ".", "NaN"]
INTERESTING_STRINGS += ["Infinity", ARRAYS, STATE_JSON, "sha256:" + "0" * 64, "0x1f", "-0x0"]
INTERESTING_STRINGS += ["7ff8000000000001", "$array", "$tuple", "$$x", "\x00", "\ud800"]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(INTERESTING_INTS),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(INTERESTING_STRINGS),
)
json_keys = st.one_of(st.text(max_size=6), st.sampled_from(INTERESTING_STRINGS))
TAGS = ["$array", "$float", "$int", "$tuple", "$scalar", "$set", "$", "$$x"]


def _json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """JSON values of any shape, with tag-like objects ({"$scalar": ...}) among them."""
    return st.recursive(
        json_scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(json_keys, children, max_size=4),
            st.builds(lambda tag, body: {tag: body}, st.sampled_from(TAGS), children),
            st.builds(
                lambda code, v: {"$scalar": [code, v]}, st.sampled_from(DTYPE_CODES), children
            ),
        ),
        max_leaves=max_leaves,
    )


json_values = _json_values()


def _position(draw: st.DrawFn, size: int) -> int:
    # Half the positions fall in the first 64 bytes: the length field and the JSON header.
    return draw(st.one_of(st.integers(0, min(size, 64)), st.integers(0, size)))


def _mutate_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """One byte-level mutation of ``data``."""
    kinds = ["extend", "insert"] + (["flip", "overwrite", "truncate", "delete"] if data else [])
    kind = draw(st.sampled_from(kinds))
    buf = bytearray(data)
    if kind == "flip":
        pos = min(_position(draw, len(buf)), len(buf) - 1)
        buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        pos = min(_position(draw, len(buf)), len(buf) - 1)
        new = draw(st.binary(min_size=1, max_size=8))
        buf[pos : pos + len(new)] = new
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "extend":
        buf += draw(st.binary(min_size=1, max_size=16))
    elif kind == "insert":
        pos = _position(draw, len(buf))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:
        pos = min(_position(draw, len(buf)), len(buf) - 1)
        del buf[pos : pos + draw(st.integers(1, 16))]
    return bytes(buf)


def _paths(doc: Any) -> list[tuple[Any, ...]]:
    """The path (keys and indices) of every node of a JSON document, the root first."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        out.append(path)
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in enumerate(node))
    return out


def _mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """Replace, delete or add one node, chosen uniformly, of a parsed JSON document."""
    doc = json.loads(json.dumps(doc))  # a private copy
    path = draw(st.sampled_from(_paths(doc)))
    parent: Any = None
    node = doc
    for key in path:
        parent, node = node, node[key]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "add" and isinstance(node, (dict, list)):
        value = draw(json_values)
        if isinstance(node, dict):
            node[draw(json_keys)] = value
        else:
            node.insert(draw(st.integers(0, len(node))), value)
        return doc
    if action == "delete" and parent is not None:
        del parent[path[-1]]
        return doc
    value = draw(st.one_of(st.sampled_from(INTERESTING_VALUES), json_values))
    if parent is None:
        return value
    parent[path[-1]] = value
    return doc


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _mutate_header(draw: st.DrawFn, data: bytes) -> bytes:
    """Edit the JSON header of a safetensors file (text or structure) and re-pack its length."""
    (n,) = struct.unpack("<Q", data[:8])
    header, rest = data[8 : 8 + n], data[8 + n :]
    if draw(st.booleans()):
        header = _mutate_bytes(draw, header)
    else:
        header = _dump(_mutate_json(draw, json.loads(header)))
        if draw(st.booleans()):
            header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + rest


@st.composite
def mutated_files(draw: st.DrawFn, data: bytes, name: str) -> bytes:
    """One mutation of a checkpoint file or the manifest, by kind of file."""
    kinds = ["bytes"]
    if name == ARRAYS:
        kinds.append("header")
    if name in (STATE_JSON, MANIFEST):
        kinds.append("json")
    kind = draw(st.sampled_from(kinds))
    if kind == "header":
        return _mutate_header(draw, data)
    if kind == "json":
        return _dump(_mutate_json(draw, json.loads(data)))
    return _mutate_bytes(draw, data)


def _patch_manifest(manifest: bytes, step: int, name: str, data: bytes) -> bytes:
    doc = json.loads(manifest)
    (record,) = (r for r in doc["checkpoints"] if r["step"] == step)
    (entry,) = (f for f in record["files"] if f["name"] == name)
    entry["size"] = len(data)
    entry["checksum"] = "sha256:" + hashlib.sha256(data).hexdigest()
    return json.dumps(doc, indent=1).encode()


# -- the store under mutation ------------------------------------------------------------------


@dataclass
class Damage:
    target: str  # path relative to the store's root
    node: str  # "bytes", or what replaced the file: "missing", "directory", "symlink"
    data: bytes | None
    patched: bool

    def changed_listed_file(self, seed: Seed) -> bool:
        if self.target not in seed.listed:
            return False
        return self.node != "bytes" or self.data != seed.files[self.target]


@st.composite
def damages(draw: st.DrawFn, seed: Seed) -> Damage:
    target = draw(st.sampled_from(sorted(seed.files)))
    original = seed.files[target]
    name = Path(target).name
    patched = target in seed.listed and draw(st.booleans())
    node = "bytes"
    if target in seed.listed:
        node = draw(st.sampled_from(["bytes"] * 12 + ["transplant", "missing", "directory"]))
        node = draw(st.sampled_from([node, node, "symlink"])) if node == "bytes" else node
    if node == "transplant":
        donors = sorted(p for p in seed.files if p != target)
        return Damage(target, "bytes", seed.files[draw(st.sampled_from(donors))], patched)
    if node != "bytes":
        return Damage(target, node, None, False)
    return Damage(target, "bytes", draw(mutated_files(original, name)), patched)


def _apply(seed: Seed, damage: Damage, root: Path) -> None:
    path = root / damage.target
    if damage.node == "bytes":
        assert damage.data is not None
        path.write_bytes(damage.data)
        if damage.patched:
            step, name = seed.listed[damage.target]
            manifest = root / MANIFEST
            manifest.write_bytes(_patch_manifest(manifest.read_bytes(), step, name, damage.data))
        return
    path.unlink()
    if damage.node == "directory":
        path.mkdir()
    elif damage.node == "symlink":
        # A link to an identical copy: only the refusal to follow links can catch it.
        copy = root.parent / "outside-copy"
        copy.write_bytes(seed.files[damage.target])
        path.symlink_to(copy)


def _check_store(seed: Seed, damage: Damage, root: Path) -> None:
    test = "store"
    manifest_intact = damage.target != MANIFEST
    damaged_step = seed.listed[damage.target][0] if damage.target in seed.listed else None
    # Unpatched changed bytes, or a file that is no longer a regular file, must be caught.
    detectable = damage.changed_listed_file(seed) and not damage.patched
    size_changed = damage.node != "bytes" or len(damage.data or b"") != len(
        seed.files[damage.target]
    )

    store = _attempt(test, "open", lambda: CheckpointStore(root, monitor="val_loss"))
    if isinstance(store, CkptkitError):
        assert not manifest_intact, f"an intact manifest did not open: {store}"
        assert isinstance(store, StoreFormatError), store
        return
    records = _attempt(test, "records", store.records)
    if manifest_intact:
        assert not isinstance(records, CkptkitError), records
        assert [r.step for r in records] == sorted(seed.states)
    else:
        assert isinstance(records, (list, StoreFormatError)), records

    # Every step loads verified; the damaged (or newest) step is also read every other way.
    focus = damaged_step if damaged_step is not None else max(seed.states)
    for step in sorted(seed.states):
        for verify in (True, False) if step == focus else (True,):
            got = _attempt(
                test,
                f"load(verify={verify})",
                lambda s=step, v=verify: store.load(s, verify=v),  # type: ignore[misc]
            )
            if not isinstance(got, CkptkitError):
                _walk(got)
            if step == damaged_step and detectable and (verify or size_changed):
                assert isinstance(got, CorruptCheckpointError), (
                    f"step {step} loaded (verify={verify}) with {damage.target} damaged"
                )
            elif manifest_intact and step != damaged_step:
                assert not isinstance(got, CkptkitError), got
                assert_same_state(seed.states[step], got)
        if step != focus:
            continue
        checked = _attempt(test, "verify", lambda s=step: store.verify(s))  # type: ignore[misc]
        if step == damaged_step and detectable:
            assert isinstance(checked, CorruptCheckpointError), f"verify passed step {step}"
        elif manifest_intact and step != damaged_step:
            assert not isinstance(checked, CkptkitError), checked

    for selector in (None, "best"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _attempt(
                test,
                f"load({selector!r}, fallback=True)",
                lambda sel=selector: store.load_checkpoint(sel, fallback=True),  # type: ignore[misc]
            )
        assert all(issubclass(w.category, FallbackWarning) for w in caught), [
            str(w.message) for w in caught
        ]
        if isinstance(got, CkptkitError):
            continue
        _walk(got.state)
        if detectable:
            assert got.record.step != damaged_step, "fallback returned the damaged step"
        if manifest_intact and got.record.step != damaged_step:
            assert_same_state(seed.states[got.record.step], got.state)


@FUZZ
@given(data=st.data(), seed_name=st.sampled_from(sorted(SEED_STATES)))
def test_mutated_store_raises_only_ckptkit_errors(
    seeds: dict[str, Seed], workdir: Path, data: st.DataObject, seed_name: str
) -> None:
    """Loading, verifying and listing a damaged store raises CkptkitError or returns a valid tree.

    Damage to a listed file's bytes that the manifest does not know of is always caught by a
    verified load and by verify(); undamaged checkpoints still load exactly.
    """
    RUNS["store"] += 1
    seed = seeds[seed_name]
    damage = data.draw(damages(seed), label="damage")
    root = workdir / seed.name / "store"
    _restore(seed, root)
    _apply(seed, damage, root)
    with _time_limit(EXAMPLE_TIME_LIMIT_S):
        _check_store(seed, damage, root)


# -- the parsers alone -------------------------------------------------------------------------


def _check_parse(test: str, buf: bytes) -> None:
    got = _attempt(test, "parse_safetensors", lambda: parse_safetensors(buf, source="f"))
    if isinstance(got, CkptkitError):
        assert isinstance(got, (CorruptCheckpointError, UnsupportedStateError)), got
        assert str(got).startswith("f: "), got
        return
    arrays, metadata = got
    assert all(type(k) is str and type(v) is str for k, v in metadata.items())
    (n,) = struct.unpack("<Q", buf[:8])
    covered = 0
    for array in arrays.values():
        _walk(array)
        covered += array.nbytes
    assert covered == len(buf) - 8 - n, "the tensors do not exactly cover the data area"


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*DTYPE_CODES, "F4", "F128"]), json_scalars),
        "shape": st.one_of(
            st.lists(st.one_of(st.integers(0, 4), json_scalars), max_size=4), json_values
        ),
        "data_offsets": st.one_of(
            st.lists(st.one_of(st.integers(0, 64), json_scalars), max_size=3), json_values
        ),
    }
)


@st.composite
def safetensors_like(draw: st.DrawFn) -> bytes:
    """Files whose header is JSON shaped like a safetensors header, with odd values inside."""
    header: dict[str, Any] = draw(
        st.dictionaries(json_keys, st.one_of(tensor_entries, json_values), max_size=4)
    )
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    text = _dump(header)
    n = draw(st.one_of(st.just(len(text)), st.sampled_from(INTERESTING_INTS).map(abs)))
    length = struct.pack("<Q", min(n, 2**64 - 1))
    return length + text + bytes(draw(st.integers(0, 96)))


ODD_DIMS = [0, 1, 2, 2**31, 2**32, 2**62, 2**63, 2**64, -1]
shapes = st.one_of(
    st.lists(st.integers(0, 3), max_size=3),
    st.lists(st.sampled_from(ODD_DIMS), max_size=4),
    st.integers(60, 70).map(lambda n: [1] * n),
    json_values,
)


def _nbytes(code: object, shape: object) -> int | None:
    if code not in DTYPE_CODES or not isinstance(shape, list):
        return None
    if not all(type(d) is int and d >= 0 for d in shape):
        return None
    return math.prod(shape) * numpy_dtype(str(code)).itemsize


@st.composite
def near_valid_safetensors(draw: st.DrawFn) -> bytes:
    """Files whose tensors tile the data area exactly, with odd dtypes, shapes or offsets."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        code = draw(st.one_of(st.sampled_from(DTYPE_CODES), st.sampled_from(["F4", "F128"])))
        shape = draw(shapes)
        size = _nbytes(code, shape)
        size = draw(st.integers(0, 16)) if size is None or size > 4096 else size
        offsets: Any = [offset, offset + size]
        if draw(st.integers(0, 4)) == 0:
            offsets = draw(st.one_of(json_values, st.lists(st.sampled_from(INTERESTING_INTS))))
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": offsets}
        offset += size
    if draw(st.integers(0, 3)) == 0:
        header["__metadata__"] = draw(st.one_of(st.dictionaries(json_keys, st.text()), json_values))
    text = _dump(header)
    text += b" " * draw(st.sampled_from([0, -len(text) % 8]))
    return struct.pack("<Q", len(text)) + text + bytes(offset + draw(st.sampled_from([0, 0, 1])))


@FUZZ_PARSER
@given(
    buf=st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda n, body: struct.pack("<Q", n) + body, st.integers(0, 80), st.binary(max_size=80)
        ),
        safetensors_like(),
        near_valid_safetensors(),
    )
)
def test_parse_safetensors_raises_only_ckptkit_errors_on_any_bytes(buf: bytes) -> None:
    """Arbitrary bytes and odd headers parse to covering arrays or raise a CkptkitError."""
    RUNS["parse-any"] += 1
    _check_parse("parse-any", buf)


@FUZZ_PARSER
@given(data=st.data(), seed_name=st.sampled_from(sorted(SEED_STATES)))
def test_parse_safetensors_raises_only_ckptkit_errors_on_mutated_files(
    seeds: dict[str, Seed], data: st.DataObject, seed_name: str
) -> None:
    """Mutations of real arrays files parse to covering arrays or raise a CkptkitError."""
    RUNS["parse-mutated"] += 1
    seed = seeds[seed_name]
    name = data.draw(st.sampled_from(sorted(p for p in seed.files if p.endswith(ARRAYS))))
    buf = data.draw(mutated_files(seed.files[name], ARRAYS), label="file")
    _check_parse("parse-mutated", buf)


def _check_manifest(test: str, raw: bytes) -> None:
    got = _attempt(test, "manifest.loads", lambda: loads(raw, path="m.json"))
    if isinstance(got, CkptkitError):
        assert isinstance(got, StoreFormatError), got
        assert str(got).startswith("m.json: "), got
        return
    # What the reader accepts, the writer writes back and the reader reads again unchanged.
    text = dumps(got)
    assert dumps(loads(text, path="m.json")) == text


@FUZZ_PARSER
@given(
    raw=st.one_of(
        st.binary(max_size=64),
        json_values.map(_dump),
        st.fixed_dictionaries(
            {"format_version": st.one_of(st.just(1), json_scalars), "checkpoints": json_values}
        ).map(_dump),
    )
)
def test_manifest_loads_raises_only_store_format_errors_on_any_json(raw: bytes) -> None:
    """Any bytes or JSON value either reads as records that round-trip, or StoreFormatError."""
    RUNS["manifest-any"] += 1
    _check_manifest("manifest-any", raw)


@FUZZ_PARSER
@given(data=st.data(), seed_name=st.sampled_from(sorted(SEED_STATES)))
def test_manifest_loads_raises_only_store_format_errors_on_edited_manifests(
    seeds: dict[str, Seed], data: st.DataObject, seed_name: str
) -> None:
    """Edits of a real manifest's JSON read as round-tripping records or raise StoreFormatError."""
    RUNS["manifest-edited"] += 1
    raw = data.draw(mutated_files(seeds[seed_name].files[MANIFEST], MANIFEST), label="manifest")
    _check_manifest("manifest-edited", raw)
