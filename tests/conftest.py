"""Suite-wide settings: in CI, a skipped test is a failure (every framework is installed there)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CKPTKIT_NO_SKIP") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in a run that forbids skips (CKPTKIT_NO_SKIP=1): {report.longrepr}"
        )


#: moto's S3 server and fake-gcs-server (session-scoped, on 127.0.0.1), a fresh bucket per test.
pytest_plugins = ["tests.helpers.s3server", "tests.helpers.gcsserver"]


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A fresh store location on each storage backend (see tests/helpers/backends.py)."""
    from tests.helpers.backends import GCSBackend, LocalBackend, MemoryBackend, S3Backend

    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    if request.param == "gcs":
        return GCSBackend(request.getfixturevalue("gcs_bucket"))
    if request.param == "s3":
        return S3Backend(request.getfixturevalue("s3_bucket"))
    return MemoryBackend()
