"""Fault injection: each file-system call of a save fails in turn; nothing committed is harmed."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import CheckpointStore, StoreWriteError

CALLS = ("write", "fsync", "rename", "replace", "mkdir", "open")


class Injector:
    """Wraps os functions; the n-th call (counted over all of them) raises the given error."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int, err: int) -> None:
        self.count = 0
        self.failed: str | None = None
        self.succeeded: list[str] = []
        for name in CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name), fail_at, err))

    def _wrap(
        self, name: str, fn: Callable[..., Any], fail_at: int, err: int
    ) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count == fail_at:
                self.failed = name
                raise OSError(err, f"injected {os.strerror(err)} in os.{name}")
            result = fn(*args, **kwargs)
            self.succeeded.append(name)
            return result

        return wrapped


def fill(store: CheckpointStore) -> None:
    for step in range(3):
        store.save(
            step, {"w": np.full(1000, step, dtype=np.float64)}, metrics={"loss": 1.0 / (step + 1)}
        )


def save_new(store: CheckpointStore) -> None:
    store.save(3, {"w": np.full(1000, 3.0)}, metrics={"loss": 0.1})


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_each_failing_call_leaves_the_store_as_it_was(tmp_path: Path, err: int) -> None:
    """For every n, failing the n-th call of a save raises it, keeps old checkpoints, lists nothing new."""
    counting = CheckpointStore(tmp_path / "count", keep_last=2)
    fill(counting)
    with pytest.MonkeyPatch.context() as mp:
        counter = Injector(mp, 0, err)
        save_new(counting)
    total = counter.count
    assert total > 10
    covered: set[str] = set()
    for n in range(1, total + 1):
        root = tmp_path / f"{err}-{n}"
        store = CheckpointStore(root, keep_last=2)
        fill(store)
        before = store.manifest_path.read_bytes()
        kept_before = [r.step for r in store.records()]
        with pytest.MonkeyPatch.context() as mp:
            injector = Injector(mp, n, err)
            try:
                save_new(store)
            except OSError as e:
                assert e.errno == err and "injected" in str(e)
                raised = True
            else:
                raised = False  # the failing call was retried (the lock's open is)
        reopened = CheckpointStore(root, keep_last=2)
        if raised:
            covered.add(injector.failed or "")
        if not raised or "replace" in injector.succeeded:
            # Either the save went through, or the failure came after os.replace of the
            # manifest, the commit point: the new checkpoint is listed and whole.
            assert 3 in reopened and reopened.load(3)["w"][0] == 3.0
        else:
            assert store.manifest_path.read_bytes() == before, f"call {n} ({injector.failed})"
            assert [r.step for r in reopened.records()] == kept_before
        for r in reopened.records():
            assert reopened.load(r.step)["w"][0] == r.step
        # No temporary space stays behind after the failed call.
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".ckptkit-tmp-")]
        assert leftovers == [], f"call {n} ({injector.failed}) left {leftovers}"
    assert {"write", "fsync", "rename", "replace", "mkdir", "open"} <= covered, covered


def test_failure_while_deleting_retention_victims_keeps_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If deleting a dropped checkpoint fails, the save's commit stands and the next change cleans up."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(0, {"w": np.zeros(3)})

    real_unlink = os.unlink

    def failing_unlink(path: Any, *a: Any, **k: Any) -> None:
        # A victim's files are unlinked relative to its directory's descriptor.
        if "step_000000000000" in str(path) or k.get("dir_fd") is not None:
            raise OSError(errno.EIO, "injected EIO in os.unlink")
        real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(StoreWriteError, match=r"saving step 1 was committed, but .*injected") as e:
        store.save(1, {"w": np.ones(3)})
    assert e.value.errno == errno.EIO
    monkeypatch.setattr(os, "unlink", real_unlink)
    reopened = CheckpointStore(tmp_path, keep_last=1)
    assert [r.step for r in reopened.records()] == [1]
    assert (tmp_path / "step_000000000000").exists()  # opening changes nothing
    reopened.save(2, {"w": np.ones(3)})
    assert not (tmp_path / "step_000000000000").exists()
