"""Fault injection: each storage operation of a change fails in turn; nothing committed is harmed.

Faults come through a storage that fails its n-th operation (``tests/helpers/faulty_storage.py``),
so the same tests hold the commit protocol to account on every backend. What a local disk does
when it really fills up is in ``test_diskfull.py``.
"""

from __future__ import annotations

import errno
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from ckptkit import CheckpointStore, StoreWriteError
from ckptkit._storage import ManifestConflict, ManifestVersion
from ckptkit._storage_local import LocalStorage
from ckptkit._storage_memory import MemoryStorage
from tests.helpers.faulty_storage import FaultyStorage

#: Every operation a save with retention makes; each must be failed at least once below.
OPERATIONS = {
    "new_checkpoint",
    "create arrays.safetensors",
    "write arrays.safetensors",
    "commit arrays.safetensors",
    "create state.json",
    "write state.json",
    "commit state.json",
    "finish",
    "commit_manifest",
    "after commit_manifest",
    "delete_checkpoint",
}


def fill(store: CheckpointStore) -> None:
    for step in range(3):
        store.save(
            step, {"w": np.full(1000, step, dtype=np.float64)}, metrics={"loss": 1.0 / (step + 1)}
        )


def save_new(store: CheckpointStore) -> None:
    store.save(3, {"w": np.full(1000, 3.0)}, metrics={"loss": 0.1})


def leftovers(root: Path, store: CheckpointStore) -> list[str]:
    """What is in the store's directory besides the manifest, the lock and listed checkpoints."""
    listed = {r.directory for r in store.records()}
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name not in listed and p.name not in ("manifest.json", ".ckptkit.lock")
    )


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_each_failing_operation_leaves_the_store_as_it_was(tmp_path: Path, err: int) -> None:
    """For every n, failing the n-th operation of a save keeps old checkpoints and lists nothing new.

    A failure after the manifest's commit keeps the new checkpoint, listed and whole, and says so;
    one while deleting what retention dropped (after save has returned) is logged, not raised.
    """
    counting = FaultyStorage(LocalStorage(tmp_path / "count"))
    counting.create()
    with CheckpointStore(counting, keep_last=2) as filled:  # close waits for its deletions
        fill(filled)
    counting.arm(0)
    store = CheckpointStore(counting, keep_last=2)
    save_new(store)
    store.wait()
    total = counting.count
    assert set(counting.done) == OPERATIONS, counting.done
    failed: set[str] = set()
    for n in range(1, total + 1):
        root = tmp_path / f"{err}-{n}"
        faulty = FaultyStorage(LocalStorage(root))
        faulty.create()
        store = CheckpointStore(faulty, keep_last=2)
        fill(store)
        store.wait()
        before = (root / "manifest.json").read_bytes()
        kept_before = [r.step for r in store.records()]
        faulty.arm(n, err)
        try:
            save_new(store)
        except StoreWriteError as e:
            raised = e
        else:
            # Only the deletion after the commit may fail without raising: it runs after
            # save has returned, and is logged.
            store.wait()
            assert faulty.failed == "delete_checkpoint", n
            failed.add(faulty.failed)
            reopened = CheckpointStore(root, keep_last=2)
            assert 3 in reopened and reopened.load(3)["w"][0] == 3.0
            reopened.prune()
            assert leftovers(root, reopened) == [], f"operation {n} ({faulty.failed})"
            continue
        assert raised.errno == err and "injected" in str(raised)
        assert faulty.failed is not None and faulty.failed != "delete_checkpoint"
        failed.add(faulty.failed)
        reopened = CheckpointStore(root, keep_last=2)
        committed = faulty.failed == "after commit_manifest"
        if committed:
            # Past the commit point: the new checkpoint is listed and whole, and the message
            # says the save was committed.
            assert "saving step 3 was committed" in str(raised), raised
            assert 3 in reopened and reopened.load(3)["w"][0] == 3.0
        else:
            assert "nothing was committed" in str(raised), raised
            assert (root / "manifest.json").read_bytes() == before, f"operation {n}"
            assert [r.step for r in reopened.records()] == kept_before
            # Nothing the failed save wrote stays behind.
            assert leftovers(root, reopened) == [], f"operation {n} ({faulty.failed})"
        for r in reopened.records():
            assert reopened.load(r.step)["w"][0] == r.step
        # The next change sweeps whatever a failure past the commit point left.
        reopened.prune()
        assert leftovers(root, reopened) == [], f"operation {n} ({faulty.failed})"
    assert failed == OPERATIONS, OPERATIONS - failed


def test_failure_while_deleting_retention_victims_keeps_the_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If deleting a dropped checkpoint fails, the save's commit stands and the next change cleans up."""
    faulty = FaultyStorage(LocalStorage(tmp_path))
    faulty.create()
    store = CheckpointStore(faulty, keep_last=1)
    store.save(0, {"w": np.zeros(3)})
    # Step 1: start, 2 files x (create, write, commit), finish, commit (twice), then delete,
    # after save has returned: the failure is logged, not raised.
    faulty.arm(11)
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        assert store.save(1, {"w": np.ones(3)}).step == 1
        store.wait()
    assert faulty.failed == "delete_checkpoint"
    assert "could not delete step_000000000000" in caplog.text
    assert "injected Input/output error" in caplog.text
    reopened = CheckpointStore(tmp_path, keep_last=1)
    assert [r.step for r in reopened.records()] == [1]
    assert (tmp_path / "step_000000000000").exists()  # opening changes nothing
    reopened.save(2, {"w": np.ones(3)})
    assert not (tmp_path / "step_000000000000").exists()


class _LostAnswer(MemoryStorage):
    """Commits, lets another writer commit on top, then answers as if the commit had lost."""

    def __init__(self, url: str, other: CheckpointStore) -> None:
        super().__init__(url)
        self.other = other
        self.armed = True

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        super().commit_manifest(data, expected=expected, new_checkpoint=new_checkpoint)
        if self.armed and new_checkpoint is not None:
            self.armed = False
            self.other.save(2, {"w": np.full(3, 2.0)})
            raise ManifestConflict("the retried PUT met its own first try")


def test_a_commit_whose_answer_was_lost_is_kept_though_another_writer_followed() -> None:
    """A conflict after a commit that landed must not delete the checkpoint it committed."""
    url = f"memory://lost-answer-{uuid.uuid4().hex}"
    other = CheckpointStore(url)
    other.save(0, {"w": np.zeros(3)})
    store = CheckpointStore(_LostAnswer(url, other))
    record = store.save(1, {"w": np.ones(3)})
    reopened = CheckpointStore(url)
    assert [r.step for r in reopened.records()] == [0, 1, 2]
    assert reopened.record(1).directory == record.directory
    assert reopened.load(1)["w"].tolist() == [1.0, 1.0, 1.0]
