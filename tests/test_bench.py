"""The benchmark suite runs end to end; its figures are never checked (benchmarks are not tests)."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

SAVES = {
    "raw write+fsync",
    "ckptkit save",
    "ckptkit save keep_last=1",
    "torch.save+fsync",
    "safetensors save_file+fsync",
}
LOADS = {
    "raw read",
    "ckptkit load",
    "ckptkit load verify=False",
    "ckptkit load mmap=True",
    "torch.load mmap",
    "safetensors load_file",
}
KEYS = {"ckptkit read_arrays", "safetensors safe_open"}
DCP = {"DCP async_save blocked", "DCP async_save durable"}
ASYNC = {
    "copy into reused buffers",
    "ckptkit save_async blocked",
    "ckptkit save (sync, same rounds)",
    "ckptkit save_async durable",
    "ckptkit save_async durable, loop busy",
}
ASYNC |= DCP
SMALL = {"ckptkit save", "safetensors save_file+fsync+commit"}
#: Rows whose store feature may not have landed yet: they may say "not available".
OPTIONAL = {"ckptkit load mmap=True", "ckptkit read_arrays"}
OPTIONAL |= ASYNC - {"copy into reused buffers"} - DCP
FIELDS = {"method", "section", "status", "samples", "median", "min", "max", "ratio", "ratio_to"}
FIELDS |= {"ratio_of_medians", "extra_bytes", "copies", "target", "verdict", "mib_per_s"}
#: Each row with a target, by section and method.
TARGETS = {
    ("save", "ckptkit save"): "<=1.05x raw, <=32 MiB",
    ("save", "ckptkit save keep_last=1"): "<=1.10x raw",
    ("load cold", "ckptkit load"): "<=1.1x st, <=1 copy",
    ("small save", "ckptkit save"): "<=2x st+commit",
    ("async", "ckptkit save_async blocked"): "<=1.5x copy",
    ("async", "ckptkit save_async durable"): "<=1.2x save",
    ("async", "ckptkit save_async durable, loop busy"): "<=1.2x save",
    ("observe", "StoppingPolicy.observe"): "<20 us",
}
#: The charts of `--quick --s3`: one per group, named for its section and size.
CHARTS = [
    "results-save-4m.png",
    "results-load-cold-4m.png",
    "results-load-warm-4m.png",
    "results-keys-cold-4m.png",
    "results-keys-warm-4m.png",
    "results-async-4m.png",
    "results-s3-save-4m.png",
    "results-s3-load-4m.png",
    "results-small-save-small.png",
    "results-observe.png",
]


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptkit.bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@dataclass(frozen=True)
class Run:
    """One `--quick --s3` run: its process, its --out folder and its --dir folder."""

    proc: subprocess.CompletedProcess[str]
    out: Path
    scratch: Path

    def doc(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads((self.out / "results.json").read_text()))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The benchmark run once in --quick mode, with S3, for the tests of this module."""
    for library in ("torch", "safetensors"):
        assert importlib.util.find_spec(library) is not None, f"CI installs {library}"
    tmp_path = tmp_path_factory.mktemp("bench")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = _bench("--quick", "--s3", "--out", "tmp", "--dir", str(scratch), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return Run(proc, tmp_path / "tmp", scratch)


def test_quick_run_reports_every_method_with_ratios(quick: Run) -> None:
    """--quick prints the table and writes JSON with every method, its ratio and its verdict."""
    proc = quick.proc
    assert proc.stdout.startswith("machine: ")
    for text in (
        "== save, 4 MiB",
        "== load cold",
        "== small save",
        "== S3 save",
        "ratio",
        "result",
    ):
        assert text in proc.stdout, text
    doc = quick.doc()
    assert (quick.out / "results.txt").read_text().startswith("machine: ")
    assert {"cpu_count", "python", "numpy", "torch", "dir_fstype", "dir_free_bytes"} <= set(
        doc["machine"]
    )
    found: dict[str, set[str]] = {}
    for row in doc["rows"]:
        assert set(row) >= FIELDS, row["method"]
        found.setdefault(row["section"], set()).add(row["method"])
        if row["method"] in OPTIONAL and row["status"] == "not available":
            continue
        assert row["status"] == "ok", (row["section"], row["method"], row["status"])
        assert row["samples"] and row["median"] is not None
        if row["section"] != "observe":
            assert row["ratio"] is not None and row["ratio_to"], (row["section"], row["method"])
    assert found == {
        "save": SAVES,
        "load cold": LOADS,
        "load warm": LOADS,
        "keys cold": KEYS,
        "keys warm": KEYS,
        "async": ASYNC,
        "small save": SMALL,
        "observe": {"StoppingPolicy.observe"},
        "s3 save": {"boto3 upload_file", "ckptkit save"},
        "s3 load": {"boto3 download_file", "ckptkit load"},
    }
    # ckptkit's S3 rows carry the memory its save and load used (tracemalloc's peak).
    s3 = [r for r in doc["rows"] if r["section"].startswith("s3") and r["method"].startswith("ck")]
    assert all(r["extra_bytes"] and r["extra_bytes"] > 0 for r in s3), s3
    # Every save but keep_last=1 (which needs a step saved before) measured its memory in a
    # fresh process.
    saves = [r for r in doc["rows"] if r["section"] == "save"]
    assert all(
        r["extra_bytes"] is not None for r in saves if r["method"] != "ckptkit save keep_last=1"
    )
    assert list(quick.scratch.iterdir()) == [], "the benchmark left files in --dir"


def test_quick_run_judges_every_target(quick: Run) -> None:
    """Each target is set on its row with a verdict, and the JSON lists the same targets."""
    doc = quick.doc()
    targets = {(r["section"], r["method"]): r for r in doc["rows"] if r["target"] is not None}
    assert {key: r["target"] for key, r in targets.items()} == TARGETS
    for key, row in targets.items():
        verdict = row["verdict"]
        assert verdict == "PASS" or verdict.startswith("MISS") or verdict == "not available", key
        assert row["target"] in quick.proc.stdout
    assert [(t["method"], t["target"]) for t in doc["targets"]] == [
        (r["method"], r["target"]) for r in targets.values()
    ]


def test_quick_run_measures_async_saves_against_the_sync_save_and_dcp(quick: Run) -> None:
    """The durable async rows are ratios to the sync save (raw's in the note); DCP's run."""
    rows = {r["method"]: r for r in quick.doc()["rows"] if r["section"] == "async"}
    for name in DCP:
        assert rows[name]["status"] == "ok", rows[name]["status"]
    assert rows["DCP async_save blocked"]["ratio_to"] == "copy"
    assert "the first call" in rows["DCP async_save blocked"]["note"]
    assert rows["DCP async_save durable"]["ratio_to"] == "save"
    assert ".metadata" in rows["DCP async_save durable"]["note"]
    durable = rows["ckptkit save_async durable"]
    if durable["status"] == "ok":
        assert durable["ratio_to"] == "save"
        assert "x raw" in durable["note"]
    busy = rows["ckptkit save_async durable, loop busy"]
    assert busy["status"] == "ok" and busy["ratio_to"] == "save"
    assert "pure-Python loop" in busy["note"] and "x raw" in busy["note"]


def test_quick_run_draws_one_chart_per_group_at_column_width(quick: Run) -> None:
    """One PNG per group, named for its section and size, at most 800 pixels wide, is written
    and listed in the JSON and the printed output."""
    assert quick.doc()["charts"] == CHARTS
    assert not (quick.out / "results.png").exists()
    for name in CHARTS:
        assert name in quick.proc.stdout, name
        head = (quick.out / name).read_bytes()[:24]
        # The PNG signature, then the IHDR chunk: width and height, big-endian.
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", name
        width, height = struct.unpack(">II", head[16:24])
        assert 0 < width <= 800 and height > 0, (name, width, height)


def test_refuses_a_dir_without_room_for_the_sizes(tmp_path: Path) -> None:
    """Sizes larger than the free space of --dir are refused before anything is written."""
    proc = _bench("--sizes", "100000g", "--dir", str(tmp_path), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "free, but sizes 100000g need about" in proc.stderr
    assert list(tmp_path.iterdir()) == []
