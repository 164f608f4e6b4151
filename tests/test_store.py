"""CheckpointStore: the API, the manifest as the source of truth, retention, integrity, errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from ckptkit import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointStore,
    CkptkitError,
    CorruptCheckpointError,
    FallbackWarning,
    LockTimeoutError,
    ReadOnlyStoreError,
    StoreFormatError,
    UnsupportedStateError,
)
from ckptkit._manifest import FORMAT_VERSION
from tests.strategies import assert_same_state, state_trees


def state_for(step: int) -> dict[str, object]:
    return {"w": np.arange(4, dtype=np.float32) + step, "meta": {"step": step, "t": (1, 2.5)}}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """What save wrote, load returns: arrays exact, tuples stay tuples, metrics and metadata kept."""
    store = CheckpointStore(tmp_path)
    rec = store.save(
        3, state_for(3), metrics={"val_loss": 0.25, "bad": math.nan}, metadata={"note": "x"}
    )
    assert rec.step == 3 and rec.metrics["val_loss"] == 0.25 and math.isnan(rec.metrics["bad"])
    assert rec.metadata == {"note": "x"}
    assert {f.name for f in rec.files} == {"arrays.safetensors", "state.json"}
    assert all(f.checksum.startswith("xxh3_128:") and f.size > 0 for f in rec.files)
    loaded = store.load(3)
    assert loaded["meta"] == {"step": 3, "t": (1, 2.5)}
    np.testing.assert_array_equal(loaded["w"], state_for(3)["w"])
    assert loaded["w"].dtype == np.float32
    assert 3 in store and 4 not in store and len(store) == 1


def test_a_second_store_object_sees_what_the_first_committed(tmp_path: Path) -> None:
    """The manifest on disk, not process memory, is the source of truth."""
    a = CheckpointStore(tmp_path)
    b = CheckpointStore(tmp_path)
    a.save(1, state_for(1))
    assert [r.step for r in b.records()] == [1]
    b.save(2, state_for(2))
    assert [r.step for r in a.records()] == [1, 2]
    assert a.latest() is not None and a.latest().step == 2


def test_manifest_is_deterministic_json_without_bare_nan(tmp_path: Path) -> None:
    """The manifest has an integer format_version, sorted keys and no NaN/Infinity tokens."""
    store = CheckpointStore(tmp_path)
    store.save(1, {}, metrics={"a": math.inf, "b": -math.inf, "c": math.nan, "d": 1.5})
    text = store.manifest_path.read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in manifest"))
    # Version 3 is written only for stores with sharded checkpoints.
    assert doc["format_version"] == 2 and FORMAT_VERSION == 3
    assert doc["checkpoints"][0]["metrics"] == {
        "a": "Infinity",
        "b": "-Infinity",
        "c": "NaN",
        "d": 1.5,
    }
    assert list(doc) == ["checkpoints", "format_version"]
    assert list(doc["checkpoints"][0]) == sorted(doc["checkpoints"][0])
    assert text == json.dumps(doc, indent=1) + "\n"


def test_saving_an_existing_step_raises_unless_overwrite(tmp_path: Path) -> None:
    """A committed step is never replaced by accident; overwrite=True replaces it atomically."""
    store = CheckpointStore(tmp_path)
    first = store.save(5, state_for(5))
    with pytest.raises(
        CheckpointExistsError, match=r"step 5 is already committed .*overwrite=True"
    ):
        store.save(5, state_for(6))
    assert store.load(5)["meta"]["step"] == 5
    second = store.save(5, state_for(6), overwrite=True)
    assert second.directory != first.directory
    assert store.load(5)["meta"]["step"] == 6
    store.wait()  # the replaced checkpoint is deleted after save returns
    assert not (tmp_path / first.directory).exists()


def test_missing_step_lists_the_steps_that_exist(tmp_path: Path) -> None:
    """Asking for a step that is not there names the steps that are."""
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints yet"):
        store.load()
    for s in (1, 4):
        store.save(s, {})
    with pytest.raises(
        CheckpointNotFoundError, match=r"no checkpoint for step 2; the store has steps \[1, 4\]"
    ) as e:
        store.load(2)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, CkptkitError)


def test_best_and_load_best(tmp_path: Path) -> None:
    """best() ranks by the monitor and mode; NaN is never best; ties go to the earlier step."""
    store = CheckpointStore(tmp_path, monitor="val_acc")
    assert store.mode == "max"
    for step, acc in enumerate([0.5, math.nan, 0.9, 0.9, 0.1]):
        store.save(step, state_for(step), metrics={"val_acc": acc})
    best = store.best()
    assert best is not None and best.step == 2
    assert store.load("best")["meta"]["step"] == 2
    with pytest.raises(ValueError, match="has no monitor"):
        CheckpointStore(tmp_path).best()


def test_retention_keeps_last_best_every_and_pinned(tmp_path: Path) -> None:
    """Retention runs after each save and deletes only what no rule keeps, files included."""
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=1, monitor="loss", keep_every=5)
    losses = [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    for step, loss in enumerate(losses):
        store.save(step, state_for(step), metrics={"loss": loss})
        if step == 3:
            store.pin(3)
    steps = [r.step for r in store.records()]
    assert steps == [0, 1, 3, 5, 6, 7]
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert on_disk == sorted(r.directory for r in store.records())
    store.unpin(3)
    plan = store.prune(dry_run=True)
    assert 3 in plan.delete and 3 in store
    store.prune()
    assert [r.step for r in store.records()] == [0, 1, 5, 6, 7]


def test_protected_step_survives_retention(tmp_path: Path) -> None:
    """A step protected by this process (the one it resumed from) is not deleted."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(0, {})
    store.protect(0)
    store.save(1, {})
    store.save(2, {})
    assert [r.step for r in store.records()] == [0, 2]
    store.unprotect(0)
    store.save(3, {})
    assert [r.step for r in store.records()] == [3]


def test_best_k_over_two_processes(tmp_path: Path) -> None:
    """A second store object continuing a run keeps the true best-k over both runs."""
    losses = [0.5, 0.1, 0.9, 0.2, 0.8, 0.95, 0.3, 0.05, 0.7]
    first = CheckpointStore(tmp_path, keep_last=1, keep_best=2, monitor="loss")
    for step in range(5):
        first.save(step, {}, metrics={"loss": losses[step]})
    second = CheckpointStore(tmp_path, keep_last=1, keep_best=2, monitor="loss")
    for step in range(5, 9):
        second.save(step, {}, metrics={"loss": losses[step]})
    assert [r.step for r in second.records()] == [1, 7, 8]


def test_corruption_is_detected_on_load_and_verify(tmp_path: Path) -> None:
    """A flipped bit or a truncated file raises CorruptCheckpointError naming the file."""
    store = CheckpointStore(tmp_path)
    rec = store.save(1, {"w": np.ones(1000)})
    path = tmp_path / rec.directory / "arrays.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        CorruptCheckpointError, match=r"arrays\.safetensors: checksum does not match"
    ):
        store.load(1)
    with pytest.raises(CorruptCheckpointError, match=r"arrays\.safetensors: checksum of step 1"):
        store.verify(1)
    # Skipping verification reads the (wrong) bytes without complaint: that is what it is for.
    assert store.load(1, verify=False)["w"].sum() != 1000
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(CorruptCheckpointError, match="size is"):
        store.load(1, verify=False)
    os.unlink(path)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        store.load(1)


def test_fallback_loads_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    """With fallback=True, a corrupt latest checkpoint is skipped with a warning."""
    store = CheckpointStore(tmp_path)
    for s in range(3):
        store.save(s, state_for(s))
    for s in (2, 1):
        path = tmp_path / store.record(s).directory / "state.json"
        path.write_bytes(path.read_bytes().replace(b"step", b"stop"))
    with pytest.warns(FallbackWarning) as warned:
        got = store.load_checkpoint(fallback=True)
    assert got.record.step == 0 and got.state["meta"]["step"] == 0
    assert len(warned) == 2 and "skipping corrupt step 2" in str(warned[0].message)
    for s in range(3):
        (tmp_path / store.record(s).directory / "state.json").write_bytes(b"{}")
    with (
        pytest.warns(FallbackWarning),
        pytest.raises(CorruptCheckpointError, match="no checkpoint verifies"),
    ):
        store.load(fallback=True)


def test_unsupported_leaf_raises_type_error_and_writes_nothing(tmp_path: Path) -> None:
    """A leaf ckptkit cannot save raises at save time, naming its key path; nothing is written."""
    store = CheckpointStore(tmp_path)
    with pytest.raises(UnsupportedStateError, match=r"opt.*lr") as e:
        store.save(1, {"opt": {"lr": {1, 2}}})
    assert isinstance(e.value, TypeError)
    assert len(store) == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"step": -1}, ValueError, "step must be an int >= 0, got -1"),
        ({"step": 1.5}, TypeError, "step must be an int >= 0"),
        ({"step": True}, TypeError, "step must be an int >= 0"),
        ({"metrics": {"loss": "low"}}, TypeError, "metric 'loss' of step 1 must be a real number"),
        ({"metrics": {"ok": True}}, TypeError, "metric 'ok' of step 1 must be a real number"),
        ({"metrics": [1.0]}, TypeError, "metrics of step 1 must be a mapping"),
        ({"metadata": {"x": np.ones(2)}}, UnsupportedStateError, "metadata of step 1"),
    ],
)
def test_bad_save_arguments(
    tmp_path: Path, kwargs: dict[str, object], error: type, message: str
) -> None:
    """Bad steps, metrics and metadata raise errors that say what and where, and commit nothing."""
    store = CheckpointStore(tmp_path)
    args: dict[str, object] = {"step": 1, "state": {}, **kwargs}
    with pytest.raises(error, match=message):
        store.save(**args)  # type: ignore[arg-type]
    assert len(store) == 0


def test_bad_store_arguments(tmp_path: Path) -> None:
    """Constructor arguments are checked with messages naming the argument."""
    with pytest.raises(ValueError, match="cannot tell whether 'score'"):
        CheckpointStore(tmp_path, monitor="score")
    with pytest.raises(ValueError, match="lock_timeout"):
        CheckpointStore(tmp_path, lock_timeout=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="must be a directory"):
        CheckpointStore(tmp_path / "file")


def test_newer_manifest_format_is_refused(tmp_path: Path) -> None:
    """A manifest from a newer format version is not misread."""
    store = CheckpointStore(tmp_path)
    store.save(1, {})
    doc = json.loads(store.manifest_path.read_text())
    doc["format_version"] = 99
    store.manifest_path.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match=r"format_version 99 is newer .* upgrade ckptkit-ml"):
        store.records()


def test_the_first_change_sweeps_crash_leftovers_but_nothing_else(tmp_path: Path) -> None:
    """Temporaries and unlisted step directories go at the first change; other files stay."""
    store = CheckpointStore(tmp_path)
    rec = store.save(1, {"w": np.zeros(2)})
    (tmp_path / ".ckptkit-tmp-0123456789abcdef").mkdir()
    (tmp_path / ".ckptkit-tmp-0123456789abcdef" / "arrays.safetensors").write_bytes(b"x")
    (tmp_path / ".ckptkit-tmp-fedcba9876543210.json").write_text("{}")
    orphan = tmp_path / "step_000000000002"
    orphan.mkdir()
    (orphan / "state.json").write_text("{}")
    mine = tmp_path / "step_000000000003"
    mine.mkdir()
    (mine / "state.json").write_text("{}")
    (mine / "notes.txt").write_text("user file")
    (tmp_path / "README.txt").write_text("user file")
    (tmp_path / rec.directory / "extra.txt").write_text("user file")
    before = sorted(p.name for p in tmp_path.iterdir())
    reopened = CheckpointStore(tmp_path)
    assert reopened.load(1)["w"].shape == (2,)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == before
    )  # opening and loading change nothing
    reopened.pin(1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        ".ckptkit.lock",
        "README.txt",
        "manifest.json",
        rec.directory,
        "step_000000000003",
    ]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert store.load(1)["w"].shape == (2,)


@contextlib.contextmanager
def _held_elsewhere(lock: Any) -> Iterator[None]:
    """Hold a lock from another thread through its own file description, like another process."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_lock_timeout_raises_a_clear_error(tmp_path: Path) -> None:
    """A save that cannot get the lock in time raises LockTimeoutError naming the lock file."""
    import filelock

    store = CheckpointStore(tmp_path, lock_timeout=0.05)
    holder = filelock.FileLock(tmp_path / ".ckptkit.lock", thread_local=False, is_singleton=False)
    with (
        _held_elsewhere(holder),
        pytest.raises(LockTimeoutError, match=r"held the store's lock .*lock_timeout=0.05"),
    ):
        store.save(1, {})
    store.save(1, {})
    assert 1 in store


def test_protections_nest(tmp_path: Path) -> None:
    """A step protected for two reasons stays protected until both are withdrawn."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(0, {})
    store.protect(0)
    store.protect(0)
    store.unprotect(0)
    store.save(1, {})
    assert 0 in store
    store.unprotect(0)
    store.save(2, {})
    assert [r.step for r in store.records()] == [2]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=state_trees(), metadata=state_trees(with_arrays=False, max_leaves=8))
def test_any_tree_round_trips_through_the_store(
    tmp_path: Path, tree: object, metadata: object
) -> None:
    """Whatever tree save accepts, load returns exactly: types, dtypes, shapes, bytes, float bits."""
    store = CheckpointStore(tmp_path / "hyp", keep_last=1)
    step = (store.latest().step + 1) if store.latest() is not None else 0
    meta = {"m": metadata}
    store.save(step, tree, metadata=meta)
    assert_same_state(tree, store.load(step))
    assert_same_state(meta, dict(store.record(step).metadata))
    assert_same_state(meta, dict(CheckpointStore(tmp_path / "hyp").record(step).metadata))


def test_the_sweep_without_a_manifest_keeps_checkpoint_directories(tmp_path: Path) -> None:
    """With manifest.json missing, the sweep deletes no step_* directory (nothing says they are leftovers)."""
    store = CheckpointStore(tmp_path)
    rec = store.save(0, {"w": np.ones(2)})
    store.manifest_path.unlink()
    (tmp_path / ".ckptkit-tmp-00112233445566aa").mkdir()
    CheckpointStore(tmp_path).prune()
    assert sorted(p.name for p in (tmp_path / rec.directory).iterdir()) == [
        "arrays.safetensors",
        "state.json",
    ]
    assert not (tmp_path / ".ckptkit-tmp-00112233445566aa").exists()


def test_opening_does_not_wait_for_a_busy_lock(tmp_path: Path) -> None:
    """A reader opens and reads while a writer holds the lock; the writer's files are left alone."""
    import filelock

    CheckpointStore(tmp_path).save(0, {})
    leftover = tmp_path / ".ckptkit-tmp-0123456789abcdef"
    leftover.mkdir()
    holder = filelock.FileLock(tmp_path / ".ckptkit.lock", thread_local=False, is_singleton=False)
    with _held_elsewhere(holder):
        reader = CheckpointStore(tmp_path, lock_timeout=0)
        assert [r.step for r in reader.records()] == [0]
        assert leftover.exists()  # the writer may be using it
    CheckpointStore(tmp_path).save(1, {})  # the next change, under the lock, sweeps it
    assert not leftover.exists()


def test_saving_an_earlier_step_keeps_it_until_the_next_save(tmp_path: Path) -> None:
    """A save never returns the record of a checkpoint its own retention deleted."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(10, {})
    rec = store.save(5, {})
    assert rec.step in store
    assert [r.step for r in store.records()] == [5, 10]
    store.save(11, {})
    assert [r.step for r in store.records()] == [11]


def test_numpy_integer_steps_work_everywhere(tmp_path: Path) -> None:
    """A numpy integer step saves, loads, verifies and pins like an int."""
    store = CheckpointStore(tmp_path)
    store.save(np.int64(3), {"a": 1})
    assert store.load(np.int64(3)) == {"a": 1}
    assert store.verify(np.int64(3)).step == 3
    assert store.pin(np.int64(3)).pinned
    with pytest.raises(
        ValueError, match="step must be an int, None, 'latest' or 'best', got 'newest'"
    ):
        store.load("newest")  # type: ignore[arg-type]


def test_bad_numbers_get_clear_errors(tmp_path: Path) -> None:
    """A metric too large for a float and a non-numeric lock_timeout are refused with the reason."""
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match=r"metric 'n' of step 0 is 1000.*too large for a float"):
        store.save(0, {}, metrics={"n": 10**400})
    with pytest.raises(ValueError, match="lock_timeout must be a number of seconds"):
        CheckpointStore(tmp_path, lock_timeout="5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.__setitem__(1, {**c[1], "directory": c[0]["directory"]}),
            "not a checkpoint directory name of this step",
        ),
        (
            lambda c: c.__setitem__(0, {**c[0], "files": c[0]["files"] * 2}),
            "a file is listed twice",
        ),
        (
            lambda c: c.__setitem__(1, {**c[1], "step": 0, "directory": "step_000000000000.1"}),
            "step 0 is listed twice",
        ),
        (lambda c: c.__setitem__(0, {**c[0], "metrics": {"x": "nan"}}), "metric 'x'"),
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    """A manifest that would let two records share files, or that misnames a value, is refused."""
    store = CheckpointStore(tmp_path)
    store.save(0, {})
    store.save(1, {})
    doc = json.loads(store.manifest_path.read_text())
    edit(doc["checkpoints"])
    store.manifest_path.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match=message):
        store.records()


def test_a_checkpoint_overwritten_during_a_load_is_read_again_not_half_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another process replaces a step between reading the manifest and its files, load reads the new one."""
    import ckptkit._store_read as store_module

    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    other = CheckpointStore(tmp_path)
    real_read = store_module.read_state
    reads = []

    def read_after_overwrite(root: Path, record: Any, **kwargs: Any) -> Any:
        reads.append(record.directory)
        if len(reads) == 1:
            other.save(0, {"w": np.ones(3)}, overwrite=True)
            other.wait()  # the replaced checkpoint is deleted after save returns
        return real_read(root, record, **kwargs)

    monkeypatch.setattr(store_module, "read_state", read_after_overwrite)
    assert store.load(0)["w"].tolist() == [1.0, 1.0, 1.0]
    assert reads == ["step_000000000000", "step_000000000000.1"]


def test_a_load_gives_up_with_a_clear_error_if_its_checkpoint_keeps_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step overwritten before every read attempt ends in CheckpointNotFoundError, not a hang."""
    import ckptkit._store_read as store_module

    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(3)})
    other = CheckpointStore(tmp_path)
    real_read = store_module.read_state

    def read_after_overwrite(root: Path, record: Any, **kwargs: Any) -> Any:
        other.save(0, {"w": np.ones(3)}, overwrite=True)
        other.wait()  # the replaced checkpoint is deleted after save returns
        return real_read(root, record, **kwargs)

    monkeypatch.setattr(store_module, "read_state", read_after_overwrite)
    with pytest.raises(CheckpointNotFoundError, match=r"kept replacing .* step=0 .*20 attempts"):
        store.load(0)
    monkeypatch.undo()
    assert store.load(0)["w"][0] == 1.0


# -- read-only stores ----------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time, to tell any change."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _store_with_leftovers(root: Path) -> CheckpointStore:
    """A store of steps 0-3 with a crash's leftovers in it and no lock file."""
    store = CheckpointStore(root, keep_last=2)
    for step in range(4):
        store.save(step, {"w": np.full(3, float(step))}, metrics={"loss": 1.0 / (step + 1)})
    store.wait()  # retention's last deletion runs on after save returns
    (root / ".ckptkit-tmp-0123456789abcdef").mkdir()
    (root / "step_000000000009").mkdir()
    (root / ".ckptkit.lock").unlink()
    return store


def test_a_read_only_store_reads_everything_and_changes_nothing(tmp_path: Path) -> None:
    """read_only=True lists, loads, verifies and plans a prune without a lock file or a sweep."""
    _store_with_leftovers(tmp_path)
    before = snapshot(tmp_path)
    store = CheckpointStore(tmp_path, read_only=True, keep_last=1, monitor="loss")
    assert store.read_only and "read_only=True" in repr(store)
    assert [r.step for r in store.records()] == [2, 3]
    assert store.load()["w"].tolist() == [3.0, 3.0, 3.0]
    assert store.load("best")["w"].tolist() == [3.0, 3.0, 3.0]
    assert store.verify(2).step == 2
    assert store.read_arrays(2, ["w"])["w"].tolist() == [2.0, 2.0, 2.0]
    assert list(store.tensor_info(3)) == ["w"]
    assert store.prune(dry_run=True).delete == (2,)
    assert snapshot(tmp_path) == before


def test_a_read_only_store_refuses_every_change(tmp_path: Path) -> None:
    """save, save_async, pin, unpin and prune raise ReadOnlyStoreError and change nothing."""
    _store_with_leftovers(tmp_path)
    before = snapshot(tmp_path)
    store = CheckpointStore(tmp_path, read_only=True, keep_last=1)
    changes = {
        "save step 4": lambda: store.save(4, {"w": np.zeros(3)}),
        "save step 5": lambda: store.save_async(5, {"w": np.zeros(3)}),
        "pin step 2": lambda: store.pin(2),
        "unpin step 2": lambda: store.unpin(2),
        "prune": store.prune,
    }
    for action, change in changes.items():
        with pytest.raises(ReadOnlyStoreError) as e:
            change()
        assert str(e.value) == (
            f"{tmp_path}: cannot {action}: the store was opened with read_only=True; open it "
            "as CheckpointStore(root) to change it"
        )
        assert isinstance(e.value, PermissionError)
    assert snapshot(tmp_path) == before


def test_a_read_only_store_is_never_created(tmp_path: Path) -> None:
    """Opening a missing root read-only raises CheckpointNotFoundError and creates nothing."""
    with pytest.raises(CheckpointNotFoundError, match="a read-only store is never created"):
        CheckpointStore(tmp_path / "missing" / "run", read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_opening_and_reading_a_store_changes_nothing(tmp_path: Path) -> None:
    """A default (writable) store makes no lock file and sweeps nothing until its first change."""
    _store_with_leftovers(tmp_path)
    before = snapshot(tmp_path)
    store = CheckpointStore(tmp_path, keep_last=2)
    store.load()
    store.verify()
    store.prune(dry_run=True)
    assert snapshot(tmp_path) == before
    store.save(4, {"w": np.zeros(3)})
    store.wait()  # retention's deletion runs on after save returns
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ckptkit.lock",
        "manifest.json",
        "step_000000000003",
        "step_000000000004",
    ]
