"""Peak extra resident memory of one method, measured in a fresh Python process.

The child builds what the method starts from (the state, for a save; nothing, for a load),
imports the method's library, then resets the kernel's high-water mark (VmHWM) to the current
resident size and runs the method once. Extra memory = VmHWM after - VmRSS before. A fresh
process per method means no allocator cache from an earlier method hides or adds anything.
The page cache is not resident memory of the process, so a write's cached pages do not count;
a memory-mapped load's touched pages do.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ckptkit.bench import _machine, _methods


@dataclass(frozen=True, kw_only=True)
class Memory:
    """The measured extra bytes, or why there is no figure."""

    extra_bytes: int | None
    note: str | None = None


def measure(kind: str, method: str, size: _methods.Size, path: Path, timeout: float) -> Memory:
    """Run ``method`` once in a child process; ``path`` is written (save) or read (load)."""
    spec = {
        "kind": kind,
        "method": method,
        "size": size.label,
        "path": str(path),
    }
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ckptkit.bench._memprobe", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Memory(extra_bytes=None, note=f"memory probe timed out after {timeout:.0f} s")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return Memory(extra_bytes=None, note=f"memory probe failed: {last}")
    result = json.loads(lines[-1])
    if result.get("peak") is None or result.get("baseline") is None:
        return Memory(extra_bytes=None, note="no /proc/self/status here: memory not measured")
    note = None if result["reset"] else "VmHWM could not be reset: figure may be low"
    return Memory(extra_bytes=max(0, int(result["peak"]) - int(result["baseline"])), note=note)


def _child(spec: dict[str, str]) -> dict[str, object]:
    method = _methods.ALL[spec["method"]]
    size = _methods.parse_size(spec["size"])
    path = Path(spec["path"])
    if method.needs is not None:
        __import__(method.needs)
    if method.needs == "torch":
        import torch

        torch.set_num_threads(1)
    state = _methods.build_state(size) if spec["kind"] == "save" else None
    gc.collect()
    reset = _machine.reset_peak()
    baseline = _machine.status_bytes("VmRSS" if reset else "VmHWM")
    if state is not None:
        method.run(state, path)
    else:
        _methods.touch(method.run(path, size))
    return {"baseline": baseline, "peak": _machine.status_bytes("VmHWM"), "reset": reset}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
