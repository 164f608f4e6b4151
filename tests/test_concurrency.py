r"""Concurrency: processes saving, loading and pruning one store at once; the store's lock; readers
of memory-mapped files; a checkpoint deleted or replaced by another process while it is read.

The stress test runs its workers for CKPTKIT_STRESS_SECONDS (default 2) with
CKPTKIT_STRESS_PROCS savers, loaders and pruners (default "3,2,1"). A long run:

    CKPTKIT_STRESS_SECONDS=600 CKPTKIT_STRESS_PROCS=4,4,2 \
        .venv/bin/python -m pytest tests/test_concurrency.py -k stress -s
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import (
    CheckpointNotFoundError,
    CheckpointRecord,
    CheckpointStore,
    CorruptCheckpointError,
    FileEntry,
    LockTimeoutError,
    RetentionPolicy,
    _manifest,
)
from ckptkit._manifest import CHECKPOINT_FILES
from ckptkit._safetensors_read import parse_safetensors
from ckptkit._store import LOCK_NAME
from tests.helpers.stress_worker import check_state, expected_loss, expected_state, record_to_json

WORKER = str(Path(__file__).parent / "helpers" / "stress_worker.py")
REPO = str(Path(__file__).parent.parent)
ENV = {**os.environ, "PYTHONPATH": REPO}
#: Seconds the stress workers run; CKPTKIT_STRESS_SECONDS=600 for a long run.
SECONDS = float(os.environ.get("CKPTKIT_STRESS_SECONDS", "2"))
#: Savers, loaders and pruners in the stress run.
PROCS = tuple(int(n) for n in os.environ.get("CKPTKIT_STRESS_PROCS", "3,2,1").split(","))
#: What every stress process opens the store with.
CONFIG: dict[str, Any] = {
    "keep_last": 3,
    "keep_best": 2,
    "monitor": "loss",
    "mode": "min",
    "lock_timeout": 60.0,
}
#: Steps saved before the workers start, so that loaders never meet an empty store.
SEEDED = 3

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="deleting an open or mapped file is POSIX behaviour"
)


def worker(
    root: Path | str, config: dict[str, Any], role: str, *args: object
) -> subprocess.Popen[str]:
    """Start stress_worker.py in ``role``, with pipes for stdin and for stdout (stderr merged)."""
    return subprocess.Popen(
        [sys.executable, WORKER, str(root), json.dumps(config), role, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def wait_for(proc: subprocess.Popen[str], word: str) -> None:
    """Read the worker's output up to the line ``word`` (it failed if its output ends first)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if line.strip() == word:
            return
        seen.append(line)
    raise AssertionError(f"the worker ended (exit {proc.wait()}) before {word!r}:\n{''.join(seen)}")


def save_version(
    store: CheckpointStore, step: int, version: int = 0, loss: float | None = None
) -> CheckpointRecord:
    """Save the deterministic state of ``step`` at ``version``."""
    return store.save(
        step,
        expected_state(step, version),
        metrics={"loss": expected_loss(step) if loss is None else loss},
        metadata={"version": version},
        overwrite=version > 0,
    )


def listing(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def store_names(records: list[CheckpointRecord]) -> list[str]:
    """What a store's root holds when nothing but its listed checkpoints is there."""
    return sorted([LOCK_NAME, "manifest.json", *(r.directory for r in records)])


# -- many processes at once ---------------------------------------------------------------------


def record_from_json(data: dict[str, Any], *, pinned: bool) -> CheckpointRecord:
    return CheckpointRecord(
        step=data["step"],
        metrics=data["metrics"],
        metadata=data["metadata"],
        created=data["created"],
        directory=data["directory"],
        files=tuple(FileEntry(name=n, size=s, checksum=c) for n, s, c in data["files"]),
        pinned=pinned,
    )


def print_figures(reports: list[dict[str, Any]], wall: float) -> None:
    savers, loaders, pruners = PROCS
    print(
        f"\nstress: {savers} savers, {loaders} loaders, {pruners} pruners, "
        f"{SECONDS:g} s each, {wall:.1f} s wall"
    )
    total = Counter[str]()
    for report in reports:
        counts = Counter(report["counts"])
        ops = sum(v for k, v in counts.items() if k != "pruned steps")
        total.update(counts)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(
            f"  {report['role']} {report['index']}: {ops} ops ({ops / report['seconds']:.0f}/s): {detail}"
        )
    ops = sum(v for k, v in total.items() if k != "pruned steps")
    print(f"  all processes: {ops} concurrent ops ({ops / SECONDS:.0f}/s)")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))


def test_stress_savers_loaders_and_a_pruner_on_one_store(tmp_path: Path) -> None:
    """Processes saving, overwriting, loading, verifying, pinning and pruning one store at once never
    see a wrong or corrupt checkpoint, and the store ends with exactly what retention keeps."""
    root = tmp_path / "store"
    savers, loaders, pruners = PROCS
    seed_store = CheckpointStore(root, **CONFIG)
    committed = {s: record_to_json(save_version(seed_store, s)) for s in range(SEEDED)}
    roles: list[tuple[str, int, tuple[int, ...]]] = [
        *(("saver", i, (savers, SEEDED)) for i in range(savers)),
        *(("loader", i, (100 + i,)) for i in range(loaders)),
        *(("pruner", i, (200 + i,)) for i in range(pruners)),
    ]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(worker(root, CONFIG, role, i, SECONDS, *extra))
            for role, i, extra in roles
        ]
        # Every worker has imported ckptkit and opened the store before any of them starts.
        for proc in procs:
            wait_for(proc, "ready")
        start = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=SECONDS + 120)[0] for proc in procs]
        wall = time.monotonic() - start

    reports = []
    for (role, i, _), proc, out in zip(roles, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{role} {i} exited with {proc.returncode}:\n{out}"
        lines = [line for line in out.splitlines() if line.startswith("report ")]
        assert len(lines) == 1, f"{role} {i} wrote no report:\n{out}"
        reports.append(json.loads(lines[0].removeprefix("report ")))
    print_figures(reports, wall)

    failures = [(r["role"], r["index"], f) for r in reports for f in r["failures"]]
    kinds = Counter[tuple[str, str]]()
    for r in reports:
        for k, n in r["counts"].items():
            if k.endswith(": FAILED"):
                kinds[r["role"], k.removesuffix(": FAILED")] += n
    assert not failures, (
        f"{sum(r['failure_count'] for r in reports)} unexpected outcomes, by worker and op: "
        f"{dict(kinds)}\n"
        + "\n".join(
            f"--- {role} {i}, {f['op']}: {f['type']}: {f['message']}\n{f['traceback']}"
            for role, i, f in failures[:4]
        )
    )
    total = Counter[str]()
    for report in reports:
        total.update(report["counts"])
    for op in ("latest", "best", "step", "verify latest", "verify step", "records"):
        assert total[f"{op}: ok"] > 0, f"the loaders never completed {op!r}: {dict(total)}"
    for op in ("save", "overwrite", "prune: ok", "pin: ok"):
        assert total[op] > 0, f"no {op!r} happened: {dict(total)}"

    for report in reports:
        for data in report["committed"]:  # in commit order; each saver owns its steps
            committed[data["step"]] = data

    # Before anything opens the store again (opening sweeps): nothing but listed checkpoints.
    listed = _manifest.loads((root / "manifest.json").read_bytes(), path="manifest.json")
    assert listing(root) == store_names(listed)
    for record in listed:
        want = committed.get(record.step)
        assert want is not None, f"step {record.step} is listed, but no save returned it"
        assert {**record_to_json(record), "pinned": None} == {**want, "pinned": None}, (
            f"the manifest's record of step {record.step} is not the one its last save returned"
        )

    pinned = {r.step for r in listed if r.pinned}
    store = CheckpointStore(root, **CONFIG)
    policy = store.retention
    assert policy == RetentionPolicy(keep_last=3, keep_best=2, monitor="loss", mode="min")
    every = [record_from_json(d, pinned=d["step"] in pinned) for d in committed.values()]
    keep = policy.select(every).keep
    lost = keep - {r.step for r in listed}
    assert not lost, f"committed steps {sorted(lost)} that retention keeps are gone"

    store.prune()
    final = store.records()
    assert {r.step for r in final} == keep
    assert listing(root) == store_names(final)
    for record in final:
        assert store.verify(record.step) == record
        checkpoint = store.load_checkpoint(record.step)
        check_state(checkpoint.record, checkpoint.state)
    print(
        f"  {len(committed)} steps committed, {sum(len(r['committed']) for r in reports)} saves; "
        f"kept {sorted(keep)} (pinned {sorted(pinned)})"
    )


# -- the lock -----------------------------------------------------------------------------------


def test_a_save_times_out_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """A writer gives up after lock_timeout with a message naming the lock file; readers and
    opening the store never wait for the lock; once the holder releases it, the save succeeds."""
    root = tmp_path / "store"
    store = CheckpointStore(root, lock_timeout=0.2)
    save_version(store, 1)
    before = listing(root)
    with worker(root, {}, "hold") as holder:
        wait_for(holder, "held")
        start = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            save_version(store, 2)
        waited = time.monotonic() - start
        for write in (lambda: store.pin(1), lambda: store.unpin(1), store.prune):
            with pytest.raises(LockTimeoutError):
                write()
        # lock_timeout=0: a reader that tried to take the lock would fail at once.
        reader = CheckpointStore(root, lock_timeout=0)
        checkpoint = reader.load_checkpoint("latest")
        check_state(checkpoint.record, checkpoint.state)
        check_state(reader.record(1), reader.load(1))
        assert reader.verify(1).step == 1
        assert [r.step for r in reader.records()] == [1]
        assert listing(root) == before
        assert holder.stdin is not None
        holder.stdin.close()
        wait_for(holder, "released")
        assert holder.wait() == 0
    message = str(info.value)
    assert str(root / LOCK_NAME) in message, message
    assert "lock_timeout=0.2" in message, message
    assert isinstance(info.value, TimeoutError)
    assert waited >= 0.19
    record = save_version(store, 2)
    check_state(record, store.load(2))


def test_the_lock_of_a_killed_holder_is_free_again(tmp_path: Path) -> None:
    """A process killed while holding the lock does not block later writers: the kernel drops it."""
    root = tmp_path / "store"
    store = CheckpointStore(root, lock_timeout=0.2)
    with worker(root, {}, "hold") as holder:
        wait_for(holder, "held")
        with pytest.raises(LockTimeoutError):
            save_version(store, 1)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    store = CheckpointStore(root, lock_timeout=30.0)
    check_state(save_version(store, 1), store.load(1))


# -- memory-mapped readers ----------------------------------------------------------------------


@pytest.mark.parametrize("change", ["overwrite", "retention", "prune"])
def test_a_memory_mapped_checkpoint_keeps_its_bytes_when_the_store_replaces_it(
    tmp_path: Path, change: str
) -> None:
    """A reader that mapped arrays.safetensors still reads the original bytes after the step is
    overwritten, dropped by retention or pruned: the store writes new files and renames them,
    it never writes into a file that is already there."""
    root = tmp_path / "store"
    store = CheckpointStore(root, keep_last=1 if change == "retention" else None)
    save_version(store, 5)
    path = root / store.record(5).directory / "arrays.safetensors"
    original = path.read_bytes()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        memmap = np.memmap(path, dtype=np.uint8, mode="r")
        inode = os.fstat(f.fileno()).st_ino
        if change == "overwrite":
            save_version(store, 5, version=1)
            check_state(store.record(5), store.load(5))
            # The second overwrite gets the first checkpoint's directory name back.
            save_version(store, 5, version=2)
            assert root / store.record(5).directory / "arrays.safetensors" == path
            new_path, new = path, expected_state(5, 2)
        else:
            save_version(store, 6)
            store.wait()  # retention's deletion runs on after save returns
            if change == "prune":
                assert CheckpointStore(root, keep_last=1).prune().delete == (5,)
            assert 5 not in store and not path.parent.exists()
            new_path, new = (
                root / store.record(6).directory / "arrays.safetensors",
                expected_state(6),
            )
        assert os.fstat(f.fileno()).st_nlink == 0, "the mapped file was not unlinked"
        assert os.stat(new_path).st_ino != inode
    assert mapped[:] == original
    assert memmap.tobytes() == original
    want = expected_state(5)
    for buffer in (mapped, memmap):
        arrays, _ = parse_safetensors(buffer, source=str(path))
        for key in ("w", "b"):
            assert arrays[key].tobytes() == want[key].tobytes()
    on_disk, _ = parse_safetensors(new_path.read_bytes(), source=str(new_path))
    for key in ("w", "b"):
        assert on_disk[key].tobytes() == new[key].tobytes()
        assert on_disk[key].tobytes() != want[key].tobytes()


# -- a checkpoint deleted or replaced while it is being read -------------------------------------


class Mutator:
    """A real process that changes a store when told to, while the test's reader is mid-load."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def __call__(
        self,
        root: Path,
        config: dict[str, Any],
        saves: list[tuple[int, int, float]],
        prune: bool = False,
    ) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        command = {"root": str(root), "config": config, "saves": saves, "prune": prune}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("done "), line + self.proc.stdout.read()
        result: dict[str, Any] = json.loads(line.removeprefix("done "))
        return result


@pytest.fixture(scope="module")
def mutator() -> Iterator[Mutator]:
    with worker("-", {}, "serve") as proc:
        yield Mutator(proc)


def ckptkit_modules() -> list[Any]:
    return [
        m for name, m in sys.modules.items() if name == "ckptkit" or name.startswith("ckptkit.")
    ]


@contextlib.contextmanager
def after_manifest_read(action: Callable[[], object]) -> Iterator[list[str]]:
    """Run ``action`` once, just after the next manifest is parsed and before it is used."""
    real = _manifest.loads
    fired: list[str] = []

    def loads(*args: Any, **kwargs: Any) -> Any:
        records = real(*args, **kwargs)
        if not fired:
            fired.append("after the manifest read")
            action()
        return records

    with pytest.MonkeyPatch.context() as patch:
        for module in ckptkit_modules():
            if getattr(module, "loads", None) is real:
                patch.setattr(module, "loads", loads)
        yield fired


@contextlib.contextmanager
def between_file_opens(action: Callable[[], object]) -> Iterator[list[str]]:
    """Run ``action`` once, just before a checkpoint's second file is opened (the first is open)."""
    opened: set[str] = set()
    fired: list[str] = []

    def before_open(file: object) -> None:
        if fired or not isinstance(file, (str, bytes, os.PathLike)):
            return
        name = os.path.basename(os.fsdecode(file))
        if name in CHECKPOINT_FILES:
            if opened and name not in opened:
                fired.append("between the file opens")
                action()
            opened.add(name)

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def opener(file: Any, *args: Any, **kwargs: Any) -> Any:
            before_open(file)
            return real(file, *args, **kwargs)

        return opener

    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((os, "open"), (builtins, "open"), (io, "open")):
            patch.setattr(module, name, wrap(getattr(module, name)))
        yield fired


INJECTIONS = {"after_manifest_read": after_manifest_read, "between_file_opens": between_file_opens}
#: A mutator config that keeps only the newest and the best checkpoint.
KEEP_ONE = {"keep_last": 1, "keep_best": 1, "monitor": "loss", "mode": "min"}


def seeded_store(root: Path) -> CheckpointStore:
    """A store (keeping everything) with steps 1 (loss 0.5) and 2 (loss 0.4)."""
    store = CheckpointStore(root, monitor="loss", mode="min")
    save_version(store, 1, loss=0.5)
    save_version(store, 2, loss=0.4)
    return store


@pytest.mark.parametrize("when", INJECTIONS)
@pytest.mark.parametrize("op", ["load", "verify"])
def test_a_step_another_process_deletes_while_it_is_read_is_not_found(
    tmp_path: Path, mutator: Mutator, when: str, op: str
) -> None:
    """Loading or verifying an int step that another process deletes mid-read raises
    CheckpointNotFoundError saying so, never CorruptCheckpointError."""
    root = tmp_path / "store"
    store = seeded_store(root)
    action = lambda: mutator(root, KEEP_ONE, saves=[(3, 0, 0.3)])  # noqa: E731
    with INJECTIONS[when](action) as fired, pytest.raises(CheckpointNotFoundError) as info:
        store.load(1) if op == "load" else store.verify(1)
    assert fired, "the other process never ran"
    message = str(info.value)
    assert "another process" in message and "step 1" in message, message
    assert [r.step for r in store.records()] == [3]


@pytest.mark.parametrize("when", INJECTIONS)
@pytest.mark.parametrize("which", [None, "latest", "best"])
@pytest.mark.parametrize("op", ["load", "verify"])
def test_latest_or_best_deleted_by_another_process_while_it_is_read_gives_the_newer_one(
    tmp_path: Path, mutator: Mutator, when: str, which: str | None, op: str
) -> None:
    """load and verify of None/"latest"/"best" retry when another process deletes the checkpoint
    they chose mid-read, and give the newer checkpoint that replaced it."""
    root = tmp_path / "store"
    store = seeded_store(root)
    action = lambda: mutator(root, KEEP_ONE, saves=[(3, 0, 0.3)])  # noqa: E731
    with INJECTIONS[when](action) as fired:
        if op == "load":
            checkpoint = store.load_checkpoint(which)
        else:
            record = store.verify(which)
    assert fired, "the other process never ran"
    if op == "load":
        assert checkpoint.record.step == 3
        check_state(checkpoint.record, checkpoint.state)
    else:
        assert record == store.record(3)


def overwrite_step_2_twice(mutator: Mutator, root: Path) -> None:
    # The first overwrite goes to step_..02.1, the second gets the free name step_..02 back.
    mutator(root, {}, saves=[(2, 1, 0.4), (2, 2, 0.4)])


def delete_step_1_then_save_it_again(mutator: Mutator, root: Path) -> None:
    mutator(root, KEEP_ONE, saves=[(3, 0, 0.3)])
    mutator(root, {}, saves=[(1, 1, 0.5)])


@pytest.mark.parametrize("when", INJECTIONS)
@pytest.mark.parametrize(
    ("which", "change", "step", "version"),
    [
        pytest.param(2, overwrite_step_2_twice, 2, 2, id="step-overwritten-twice"),
        pytest.param("latest", overwrite_step_2_twice, 2, 2, id="latest-overwritten-twice"),
        pytest.param(1, delete_step_1_then_save_it_again, 1, 1, id="step-deleted-and-saved-again"),
    ],
)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_a_checkpoint_replaced_under_the_same_directory_name_is_never_corrupt_or_mixed(
    tmp_path: Path,
    mutator: Mutator,
    when: str,
    which: int | str,
    change: Callable[[Mutator, Path], None],
    step: int,
    version: int,
    verify: bool,
) -> None:
    """A step whose directory name another process reuses mid-read for other bytes of the same
    sizes loads as the new checkpoint, whole, or for an int step may be not found; it is never
    reported corrupt, and its state is never paired with the old record or mixed with old files."""
    root = tmp_path / "store"
    store = seeded_store(root)
    old = store.record(step)
    outcome: Any
    with INJECTIONS[when](lambda: change(mutator, root)) as fired:
        try:
            outcome = store.load_checkpoint(which, verify=verify)
        except CheckpointNotFoundError as e:
            outcome = e
    assert fired, "the other process never ran"
    new = store.record(step)
    assert new.directory == old.directory and new.metadata["version"] == version
    assert [f.size for f in new.files] == [f.size for f in old.files]
    assert new.files != old.files
    if isinstance(outcome, CheckpointNotFoundError):
        assert isinstance(which, int), f"load({which!r}) raised instead of retrying: {outcome}"
        assert "another process" in str(outcome), outcome
    else:
        check_state(outcome.record, outcome.state)
        assert outcome.state["version"] == version


def test_a_checkpoint_that_is_really_corrupt_is_still_reported_corrupt(tmp_path: Path) -> None:
    """The retry on a concurrent change does not hide real corruption: a listed file with other
    bytes, while the manifest stays the same, raises CorruptCheckpointError."""
    root = tmp_path / "store"
    store = seeded_store(root)
    path = root / store.record(2).directory / "arrays.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    for which in (2, "latest"):
        with pytest.raises(CorruptCheckpointError, match=r"arrays\.safetensors"):
            store.load(which)
