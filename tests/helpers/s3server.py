"""Fixtures: moto's S3 server in a subprocess on 127.0.0.1, and a fresh bucket per test.

The server runs in its own process so that a test measuring the client's memory sees only the
client, and so that a test's threads race over real HTTP. It listens on a port the system
picks (``-p 0``); the fixture reads the port from the server's log line.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_READY = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Bucket:
    """An empty bucket on the test server, and a boto3 client to look at it directly."""

    endpoint: str
    name: str
    client: Any

    @property
    def options(self) -> dict[str, Any]:
        """storage_options for S3Storage pointing at this server."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def url(self, prefix: str = "store") -> str:
        return f"s3://{self.name}/{prefix}"


def _wait_for_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto's server exited ({proc.returncode}):\n{log.read_text()}")
        match = _READY.search(log.read_text(errors="replace"))
        if match:
            port = int(match.group(1))
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port
        time.sleep(0.05)  # a bounded poll for the server's start, not synchronisation
    raise RuntimeError(f"moto's server did not start in {_START_TIMEOUT} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1, started once for the session."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'moto[server]')")
    pytest.importorskip("boto3", reason="needs boto3 (pip install 'ckptkit-ml[s3]')")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{_wait_for_port(proc, log)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> S3Bucket:
    """A new, empty bucket on the session's server."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(endpoint=s3_endpoint, name=name, client=client)
