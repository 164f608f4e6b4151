"""Torch tests run torch on one thread.

Their models are tiny, and on a busy machine torch's thread pool spins waiting for cores it
shares with other processes: the resume matrix took 133 s with the default pool and 27 s on one
thread on a loaded 2-core machine. No result depends on it: every test compares runs made in
the same setting.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Set torch's intra-op threads to 1 for the session, then put the count back."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
