"""The manifest's encoding: the same bytes with its caches, and records never shared with callers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit import CheckpointStore
from ckptkit._manifest import dumps, loads
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._tree import encode_json_value

_metric = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-(10**6), 10**6).map(float),
)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _records(draw: st.DrawFn) -> list[CheckpointRecord]:
    steps = draw(st.lists(st.integers(0, 10**13), unique=True, max_size=6))
    return [
        CheckpointRecord(
            step=step,
            metrics=draw(st.dictionaries(st.text(max_size=5), _metric, max_size=3)),
            metadata=draw(st.dictionaries(st.text(max_size=5), _json, max_size=3)),
            created=draw(st.floats(0, 2e9)),
            directory=f"step_{step:012d}",
            files=(
                FileEntry(
                    name="arrays.safetensors",
                    size=draw(st.integers(0, 2**40)),
                    checksum="xxh3_128:" + "0" * 32,
                ),
                FileEntry(name="state.json", size=3, checksum="sha256:" + "f" * 64),
            ),
            pinned=draw(st.booleans()),
        )
        for step in steps
    ]


def _reference(records: list[CheckpointRecord]) -> bytes:
    """The manifest as ``json.dumps(doc, indent=1)`` writes it, with no cache."""

    def metric(v: float) -> Any:
        if math.isnan(v):
            return "NaN"
        return v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")

    doc = {
        "checkpoints": [
            {
                "created": r.created,
                "directory": r.directory,
                "files": [
                    {"checksum": f.checksum, "name": f.name, "size": f.size} for f in r.files
                ],
                "metadata": encode_json_value(dict(r.metadata), what="metadata"),
                "metrics": {k: metric(v) for k, v in r.metrics.items()},
                "pinned": r.pinned,
                "step": r.step,
            }
            for r in sorted(records, key=lambda r: r.step)
        ],
        "format_version": 2,
    }
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("ascii")


@settings(max_examples=80, deadline=None)
@given(_records(), st.randoms(use_true_random=False))
def test_the_cached_encoding_writes_the_bytes_of_json_dumps_indent_1(
    records: list[CheckpointRecord], rng: Any
) -> None:
    """Fresh records, records met before and a mix give json.dumps(doc, indent=1)'s bytes."""
    expected = _reference(records)
    assert dumps(records) == expected
    shuffled = list(records)
    rng.shuffle(shuffled)
    assert dumps(shuffled) == expected  # every record's text now comes from the cache
    parsed = loads(expected, path="manifest.json", cached=True)
    assert dumps(parsed) == expected
    assert dumps(parsed[: len(parsed) // 2]) == _reference(parsed[: len(parsed) // 2])


def test_uncached_reads_give_new_records_every_time() -> None:
    """Outside a change, each read parses again: no two callers share a record object."""
    record = CheckpointRecord(step=1, created=0.0, directory="step_000000000001")
    data = dumps([record])
    first, second = loads(data, path="m"), loads(data, path="m")
    assert first == second and first[0] is not second[0]
    cached = loads(data, path="m", cached=True)
    assert cached[0] is record  # the change that wrote these bytes gets its records back


def test_a_record_handed_out_is_the_callers_own(tmp_path: Path) -> None:
    """Changing the metadata of a record save or pin returned changes nothing the store writes."""
    store = CheckpointStore(tmp_path)
    saved = store.save(0, {"w": np.zeros(2)}, metadata={"tags": ["a"]})
    saved.metadata["tags"].append("changed by the caller")
    pinned = store.pin(0)
    pinned.metadata["tags"].append("again")
    store.save(1, {"w": np.zeros(2)})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["checkpoints"][0]["metadata"] == {"tags": ["a"]}
    assert CheckpointStore(tmp_path).record(0).metadata == {"tags": ["a"]}
