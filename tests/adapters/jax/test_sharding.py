"""Sharded arrays restore onto their shardings over 4 forced host devices (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

WORKER = Path(__file__).parent / "workers" / "sharding_worker.py"


def test_sharded_leaves_restore_on_the_same_or_the_requested_sharding(tmp_path: Path) -> None:
    """Leaves sharded over a 2x2 mesh restore sharded the same way by default, onto a given
    sharding or per-leaf pytree when asked, and a sharding that cannot fit changes nothing."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
