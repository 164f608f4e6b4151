"""``python -m ckptkit.bench --sharded`` runs end to end on two ranks; its figures are never checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)

SAVES = ["ckptkit sharded save", "dcp.save FileSystemWriter", "raw write+fsync"]
LOADS = ["ckptkit resume", "dcp.load FileSystemReader", "raw read"]


def test_sharded_run_prints_every_save_and_load_with_its_ratio_to_dcp(tmp_path: Path) -> None:
    """--sharded at 4m for 1 round prints both groups, every method with its ratio and memory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = ["--sharded", "--sharded-size", "4m", "--rounds", "1", "--dir", str(scratch)]
    proc = subprocess.run(
        [sys.executable, "-m", "ckptkit.bench", *args, "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    out = proc.stdout
    assert out.startswith("machine: ")
    assert (
        "== sharded save, 4.0 MiB (4 x Linear(512, 512) float32 parameters), FSDP2 on 2 ranks"
        in out
    )
    assert "== sharded load, 4.0 MiB" in out
    header = next(line for line in out.splitlines() if line.startswith("method "))
    columns = ["method", "median", "min", "-", "max", "GiB/s", "ratio", "peak", "MiB", "growth"]
    assert header.split() == [*columns, "MiB"]
    for name in SAVES + LOADS:
        (line,) = [line for line in out.splitlines() if line.startswith(name + "  ")]
        assert "x dcp" in line, line
        assert line.count(" / ") == 2, line  # peak and growth, rank 0 / rank 1
    assert "(ru_maxrss): rank 0 " in out and ", rank 1 " in out
    assert list(scratch.iterdir()) == [], "the benchmark deletes what it wrote under --dir"

    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(r["section"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {("sharded save", m) for m in SAVES} | {("sharded load", m) for m in LOADS}
    for row in rows.values():
        assert len(row["samples"]) == 1 and row["ratio_to"] == "dcp"
    assert [r["rank"] for r in doc["config"]["ranks"]] == [0, 1]
