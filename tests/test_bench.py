"""The benchmark suite runs end to end; its figures are never checked (benchmarks are not tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SAVES = {"raw write+fsync", "ckptkit save", "torch.save+fsync", "safetensors save_file+fsync"}
LOADS = {
    "raw read",
    "ckptkit load",
    "ckptkit load verify=False",
    "ckptkit load mmap=True",
    "torch.load mmap",
    "safetensors load_file",
}
KEYS = {"ckptkit read_arrays", "safetensors safe_open"}
ASYNC = {"copy into reused buffers", "ckptkit save_async blocked", "ckptkit save_async durable"}
SMALL = {"ckptkit save", "safetensors save_file+fsync+commit"}
#: Rows whose store feature may not have landed yet: they may say "not available".
OPTIONAL = {"ckptkit load mmap=True", "ckptkit read_arrays"} | ASYNC - {"copy into reused buffers"}
FIELDS = {"method", "section", "status", "samples", "median", "min", "max", "ratio", "ratio_to"}
FIELDS |= {"ratio_of_medians", "extra_bytes", "copies", "target", "verdict", "mib_per_s"}


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptkit.bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_quick_run_reports_every_method_with_ratios(tmp_path: Path) -> None:
    """--quick prints the table and writes JSON with every method, its ratio and its verdict."""
    for library in ("torch", "safetensors"):
        assert importlib.util.find_spec(library) is not None, f"CI installs {library}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = _bench("--quick", "--s3", "--out", "tmp", "--dir", str(scratch), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

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
    doc = json.loads((tmp_path / "tmp" / "results.json").read_text())
    assert (tmp_path / "tmp" / "results.txt").read_text().startswith("machine: ")
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
    verdicts = {(t["group"].split(",")[0], t["method"]): t["verdict"] for t in doc["targets"]}
    assert len(verdicts) == 5
    for verdict in verdicts.values():
        assert verdict == "PASS" or verdict.startswith("MISS") or verdict == "not available"
    # Every save measured its memory in a fresh process.
    assert all(r["extra_bytes"] is not None for r in doc["rows"] if r["section"] == "save")
    assert list(scratch.iterdir()) == [], "the benchmark left files in --dir"


def test_refuses_a_dir_without_room_for_the_sizes(tmp_path: Path) -> None:
    """Sizes larger than the free space of --dir are refused before anything is written."""
    proc = _bench("--sizes", "100000g", "--dir", str(tmp_path), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "free, but sizes 100000g need about" in proc.stderr
    assert list(tmp_path.iterdir()) == []
