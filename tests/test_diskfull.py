"""A full disk and a read-only file system: clear errors, old checkpoints intact, space released.

Each test runs twice through the ``small_fs`` fixture: ``real`` on a tmpfs of a few MiB mounted
for the test (falling back to fault injection where this machine cannot mount one, which it
prints), and ``simulated``, always by fault injection. Both variants make the same assertions.
CKPTKIT_REQUIRE_TMPFS=1 makes ``real`` fail instead of falling back; CKPTKIT_DISKFULL_LONG=1
sweeps many more checkpoint sizes.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptkit
from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy

MIB = 1 << 20
#: The size of the small file system; tmpfs counts whole pages, and so does the simulation.
FS_BYTES = 4 * MIB
PAGE = mmap.PAGESIZE
TEMP_PREFIX = ".ckptkit-tmp-"
LOCK_NAME = ".ckptkit.lock"
LONG = os.environ.get("CKPTKIT_DISKFULL_LONG") == "1"
REQUIRE_TMPFS = os.environ.get("CKPTKIT_REQUIRE_TMPFS") == "1"
#: A failure on a read-only store must come at once, not after lock_timeout: a hang guard only.
PROMPT_S = 5.0
NO_SPACE = "No space left on device"
READ_ONLY = r"read-only|not writable"


def pages(size: int) -> int:
    return -(-size // PAGE)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- the small file system ------------------------------------------------------------------


class SmallFs:
    """A directory that holds at most FS_BYTES, and can be made read-only."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_only_by: str | None = None

    def free_bytes(self) -> int:
        return free_bytes(self.path)

    def fill(self, leave: int) -> None:
        """Write (or rewrite) a filler file so that exactly ``leave`` bytes stay free."""
        filler = self.path / "filler"
        filler.unlink(missing_ok=True)
        size = self.free_bytes() - leave
        assert size >= 0 and size % PAGE == 0, (size, leave)
        with open(filler, "wb") as f:
            f.write(bytes(size))
        assert self.free_bytes() == leave

    def make_read_only(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Undo what the fixture did (unmount, restore permissions)."""


class Tmpfs(SmallFs):
    """A real tmpfs mounted at ``path``."""

    kind = "tmpfs"

    def make_read_only(self) -> None:
        run = subprocess.run(
            ["mount", "-o", "remount,ro", str(self.path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, f"remount,ro failed: {run.stderr}"
        self.read_only_by = "remount,ro"

    def close(self) -> None:
        _unmount(self.path)


class Simulated(SmallFs):
    """os calls on paths under ``path`` act as on a full, then read-only, small file system.

    ``os.write`` to a file under ``path`` writes only what fits in FS_BYTES (counting whole
    pages of every file there) and then raises ENOSPC; ``os.statvfs`` reports that budget.
    Once read-only, calls that would change anything under ``path`` raise EROFS as the kernel
    does (ENOENT/EEXIST first where the kernel checks those first), and ``os.access(W_OK)``
    is False. Where ``use_chmod`` (a user other than root, or root without CAP_DAC_OVERRIDE),
    the directories are made mode 0o555 instead, so the kernel itself refuses with EACCES.
    """

    kind = "injected"

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, *, use_chmod: bool) -> None:
        super().__init__(path)
        self._real_root = os.path.realpath(path)
        self._use_chmod = use_chmod
        self._read_only = False
        self._fds: dict[int, str] = {}
        self._os: dict[str, Callable[..., Any]] = {}
        self._mp = monkeypatch
        for name in ("open", "close", "write", "statvfs"):
            self._patch(name)

    def _patch(self, name: str) -> None:
        self._os[name] = getattr(os, name)
        self._mp.setattr(os, name, getattr(self, f"_{name}"))

    # where a call lands

    def _target(self, path: Any, dir_fd: int | None = None) -> str | None:
        if isinstance(path, int):
            return _fd_path(path)
        p = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(p):
            base = _fd_path(dir_fd)
            if base is None:
                return None
            p = os.path.join(base, p)
        return os.path.abspath(p)

    def _inside(self, target: str | None) -> bool:
        if target is None:
            return False
        real = os.path.realpath(target)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def _used_pages(self) -> int:
        used = 0
        for dirpath, _, filenames in os.walk(self.path):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    used += pages(st.st_size)
        return used

    def _refuse(self, target: str, *, exists_first: bool = False) -> None:
        """Raise what the kernel raises for a change on a read-only file system."""
        if exists_first and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        if not exists_first and not os.path.lexists(target):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), target)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), target)

    # the replacements

    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        target = self._target(path, dir_fd)
        if self._read_only and writes and self._inside(target):
            assert target is not None
            if flags & os.O_CREAT and flags & os.O_EXCL:
                self._refuse(target, exists_first=True)
            if not flags & os.O_CREAT:
                self._refuse(target)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), target)
        fd: int = self._os["open"](path, flags, mode, dir_fd=dir_fd)
        if writes and self._inside(_fd_path(fd) or target):
            self._fds[fd] = target or ""
        else:
            self._fds.pop(fd, None)
        return fd

    def _close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._os["close"](fd)

    def _write(self, fd: int, data: Any) -> int:
        if fd not in self._fds:
            return int(self._os["write"](fd, data))
        view = memoryview(data).cast("B")
        if not len(view):
            return int(self._os["write"](fd, view))
        size = os.fstat(fd).st_size
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        limit = (pages(size) + FS_BYTES // PAGE - self._used_pages()) * PAGE
        room = max(0, limit - pos)
        if room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return int(self._os["write"](fd, view[:room]))

    def _statvfs(self, path: Any) -> os.statvfs_result:
        real: os.statvfs_result = self._os["statvfs"](path)
        if not self._inside(self._target(path)):
            return real
        total = FS_BYTES // PAGE
        free = total - self._used_pages()
        flag = real.f_flag | (os.ST_RDONLY if self._read_only else 0)
        fields = (PAGE, PAGE, total, free, free, real.f_files, real.f_ffree, real.f_favail)
        return os.statvfs_result((*fields, flag, real.f_namemax))

    def _mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        target = self._target(path, dir_fd)
        if self._inside(target):
            assert target is not None
            self._refuse(target, exists_first=True)
        self._os["mkdir"](path, mode, dir_fd=dir_fd)

    def _changing(self, name: str) -> Callable[..., Any]:
        def refuse_inside(path: Any, *args: Any, dir_fd: int | None = None, **kw: Any) -> Any:
            target = self._target(path, dir_fd)
            if self._inside(target):
                assert target is not None
                self._refuse(target)
            if dir_fd is not None:
                kw["dir_fd"] = dir_fd
            return self._os[name](path, *args, **kw)

        return refuse_inside

    def _moving(self, name: str) -> Callable[..., Any]:
        def refuse_inside(
            src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
        ) -> None:
            source = self._target(src, src_dir_fd)
            if self._inside(source) or self._inside(self._target(dst, dst_dir_fd)):
                assert source is not None
                self._refuse(source)
            self._os[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        return refuse_inside

    def _access(self, path: Any, mode: int, **kw: Any) -> bool:
        target = self._target(path, kw.get("dir_fd"))
        if mode & os.W_OK and target and self._inside(target) and os.path.lexists(target):
            return False
        return bool(self._os["access"](path, mode, **kw))

    def make_read_only(self) -> None:
        if self._use_chmod:
            for dirpath, _, _ in os.walk(self.path):
                os.chmod(dirpath, 0o555)
            self.read_only_by = "chmod 0o555"
            return
        self._read_only = True
        self._patch("mkdir")
        self._patch("access")
        for name in ("unlink", "remove", "rmdir"):
            self._os[name] = getattr(os, name)
            self._mp.setattr(os, name, self._changing(name))
        for name in ("rename", "replace"):
            self._os[name] = getattr(os, name)
            self._mp.setattr(os, name, self._moving(name))
        self.read_only_by = "injected EROFS"

    def close(self) -> None:
        if self.read_only_by == "chmod 0o555":
            for dirpath, _, _ in os.walk(self.path):
                os.chmod(dirpath, 0o755)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _chmod_is_enforced(tmp_path: Path) -> bool:
    """Whether a directory of mode 0o555 refuses this process a new file (not so for root)."""
    probe = tmp_path / "chmod-probe"
    probe.mkdir()
    os.chmod(probe, 0o555)
    try:
        os.close(os.open(probe / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except PermissionError:
        return True
    else:
        return False
    finally:
        os.chmod(probe, 0o755)
        shutil.rmtree(probe)


def _mount_tmpfs(path: Path) -> str | None:
    """Mount a tmpfs of FS_BYTES at ``path``; return None, or why this machine cannot."""
    if shutil.which("mount") is None:
        return "no mount command"
    try:
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _unmount(path)
        return f"mount failed: {e}"
    if run.returncode != 0:
        return f"mount exited with {run.returncode}: {' '.join(run.stderr.split())}"
    if not os.path.ismount(path) or free_bytes(path) != FS_BYTES:
        _unmount(path)
        return f"mount gave no tmpfs of {FS_BYTES} bytes at {path}"
    return None


def _unmount(path: Path) -> None:
    for command in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not os.path.ismount(path):
            return
        subprocess.run(command, capture_output=True, timeout=30)
    assert not os.path.ismount(path), f"could not unmount the tmpfs at {path}"


@pytest.fixture(params=["real", "simulated"])
def small_fs(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SmallFs]:
    """A small file system under tmp_path: a mounted tmpfs where possible, else fault injection."""
    path = tmp_path / "fs"
    path.mkdir()
    fs: SmallFs
    if request.param == "real":
        why = _mount_tmpfs(path)
        if why is None:
            fs = Tmpfs(path)
        elif REQUIRE_TMPFS:
            pytest.fail(f"CKPTKIT_REQUIRE_TMPFS=1, but no tmpfs could be mounted: {why}")
        else:
            print(f"small_fs[real]: no tmpfs here ({why}); simulating it by fault injection")
            fs = Simulated(path, monkeypatch, use_chmod=_chmod_is_enforced(tmp_path))
    else:
        fs = Simulated(path, monkeypatch, use_chmod=False)
    print(f"small_fs[{request.param}]: {fs.kind}, {FS_BYTES} bytes at {path}")
    request.node.user_properties.append(("small_fs", fs.kind))
    try:
        yield fs
    finally:
        if fs.read_only_by is not None:
            print(f"small_fs[{request.param}]: made read-only by {fs.read_only_by}")
        fs.close()


# -- states and checks ----------------------------------------------------------------------


def tree(step: int, n: int) -> dict[str, Any]:
    """A state of ``n`` float64 numbers (8n bytes) that differs by step."""
    return {"w": np.random.default_rng(step).standard_normal(n), "step": step}


def assert_same(got: Any, want: dict[str, Any]) -> None:
    assert got["step"] == want["step"]
    assert got["w"].dtype == want["w"].dtype and np.array_equal(got["w"], want["w"])


def assert_intact(root: Path, manifest: bytes, saved: dict[int, dict[str, Any]]) -> None:
    """Nothing left behind; the manifest is byte-identical; each saved step verifies and loads."""
    stray = sorted(
        p.name
        for p in root.iterdir()
        if p.name.startswith(TEMP_PREFIX) or p.name.startswith("step_")
    )
    assert (root / "manifest.json").read_bytes() == manifest
    store = CheckpointStore(root, lock_timeout=30)
    listed = sorted(r.directory for r in store.records())
    assert stray == listed, f"left behind: {sorted(set(stray) - set(listed))}"
    assert [r.step for r in store.records()] == sorted(saved)
    for step, want in saved.items():
        store.verify(step)
        assert_same(store.load(step), want)


def check_write_error(
    error: BaseException, *, root: Path, step: int | None, codes: set[int], says: str
) -> None:
    """The contract's StoreWriteError: an OSError keeping errno, naming root, step and reason."""
    assert isinstance(error, ckptkit.StoreWriteError), f"{type(error).__name__}: {error}"
    assert isinstance(error, ckptkit.CkptkitError) and isinstance(error, OSError)
    assert error.errno in codes, error.errno
    message = str(error)
    assert str(root) in message, message
    if step is not None:
        assert re.search(rf"\bstep {step}\b", message), message
    assert re.search(says, message, re.IGNORECASE), message
    assert "intact" in message, message


def measure(tmp_path: Path, saved: dict[int, dict[str, Any]], step: int, new: Any) -> int:
    """Pages the save of ``new`` after ``saved`` needs at its peak: its files and the new manifest.

    Measured by the same saves in a scratch store on the ordinary disk.
    """
    scratch = CheckpointStore(tempfile.mkdtemp(dir=tmp_path, prefix="scratch-"))
    for s, t in saved.items():
        scratch.save(s, t)
    record = scratch.save(step, new)
    return sum(pages(f.size) for f in record.files) + pages(scratch.manifest_path.stat().st_size)


# -- ENOSPC ----------------------------------------------------------------------------------


def test_a_save_too_big_for_the_free_space_fails_and_leaves_the_store_as_it_was(
    small_fs: SmallFs,
) -> None:
    """A save bigger than the free space raises ENOSPC; old checkpoints, manifest and free space are unchanged."""
    root = small_fs.path / "store"
    store = CheckpointStore(root, lock_timeout=30)
    saved = {step: tree(step, MIB // 8) for step in range(3)}
    for step, t in saved.items():
        store.save(step, t, metrics={"loss": 1.0 / (step + 1)})
    manifest = store.manifest_path.read_bytes()
    free = small_fs.free_bytes()
    assert free < 1 * MIB
    too_big = tree(3, (free + MIB) // 8)

    with pytest.raises(OSError) as failed:
        store.save(3, too_big, metrics={"loss": 0.1})

    assert failed.value.errno == errno.ENOSPC
    assert_intact(root, manifest, saved)
    assert small_fs.free_bytes() == free, "the failed save's temporary space was not released"
    # Pruning frees room, and then the same save goes through.
    plan = CheckpointStore(root, keep_last=1, lock_timeout=30).prune()
    assert sorted(plan.delete) == [0, 1]
    store.save(3, too_big, metrics={"loss": 0.1})
    assert [r.step for r in store.records()] == [2, 3]
    assert_same(store.load(3), too_big)
    assert_same(store.load(2), saved[2])
    check_write_error(failed.value, root=root, step=3, codes={errno.ENOSPC}, says=NO_SPACE)


def test_the_disk_filling_up_while_the_manifest_is_written_leaves_the_store_as_it_was(
    small_fs: SmallFs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the checkpoint's files fit but the new manifest does not, nothing changes and the space comes back."""
    root = small_fs.path / "store"
    store = CheckpointStore(root, lock_timeout=30)
    saved = {step: tree(step, 1000) for step in range(2)}
    for step, t in saved.items():
        store.save(step, t)
    new = tree(2, 3000)
    need = measure(tmp_path, saved, 2, new)
    manifest_pages = pages(store.manifest_path.stat().st_size)
    small_fs.fill(leave=(need - manifest_pages) * PAGE)
    manifest = store.manifest_path.read_bytes()
    free = small_fs.free_bytes()
    moved: list[str] = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def spy(src: Any, dst: Any, *a: Any, _real: Any = real, **k: Any) -> Any:
            result = _real(src, dst, *a, **k)
            moved.append(os.path.basename(os.fsdecode(dst)))
            return result

        monkeypatch.setattr(os, name, spy)

    with pytest.raises(OSError) as failed:
        store.save(2, new)

    assert failed.value.errno == errno.ENOSPC
    assert "step_000000000002" in moved, f"the checkpoint's files did not fit: {moved}"
    assert "manifest.json" not in moved
    assert_intact(root, manifest, saved)
    assert small_fs.free_bytes() == free, "the failed save's temporary space was not released"
    (small_fs.path / "filler").unlink()
    store.save(2, new)
    assert_same(store.load(2), new)
    check_write_error(failed.value, root=root, step=2, codes={errno.ENOSPC}, says=NO_SPACE)


SIZES = list(range(0, 12_000, 397)) if LONG else [0, 1000, 3000]


def test_with_any_amount_of_free_space_a_save_commits_whole_or_changes_nothing(
    small_fs: SmallFs, tmp_path: Path
) -> None:
    """With 0, 1, 2, ... pages free a save fails with ENOSPC, changing nothing, until exactly the pages it needs are free."""
    for n in SIZES:
        root = small_fs.path / f"store-{n}"
        store = CheckpointStore(root, lock_timeout=30)
        saved = {0: tree(0, 500)}
        store.save(0, saved[0])
        new = tree(1, n)
        need = measure(tmp_path, saved, 1, new)
        for free_pages in range(need + 1):
            small_fs.fill(leave=free_pages * PAGE)
            manifest = store.manifest_path.read_bytes()
            try:
                store.save(1, new)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                assert free_pages < need, f"{n} numbers: failed with the {need} pages it needs free"
                assert_intact(root, manifest, saved)
                assert small_fs.free_bytes() == free_pages * PAGE, f"{n} numbers, {free_pages} free"
            else:
                assert free_pages == need, f"{n} numbers: needs {need} pages, saved in {free_pages}"
                assert_same(store.load(1), new)
        assert [r.step for r in store.records()] == [0, 1]
        shutil.rmtree(root)
        (small_fs.path / "filler").unlink()


def test_pin_and_prune_on_a_completely_full_disk_fail_cleanly_until_a_page_is_freed(
    small_fs: SmallFs,
) -> None:
    """pin and prune must write a manifest first: on a full disk they fail with ENOSPC and change nothing."""
    root = small_fs.path / "store"
    store = CheckpointStore(root, keep_last=1, lock_timeout=30)
    saved = {step: tree(step, 20_000) for step in range(3)}
    for step, t in saved.items():
        store.protect(step)
        store.save(step, t)
    small_fs.fill(leave=0)
    manifest = store.manifest_path.read_bytes()
    unprotected = CheckpointStore(root, keep_last=1, lock_timeout=30)

    errors = {}
    for name, op in {"pin": lambda: unprotected.pin(1), "prune": unprotected.prune}.items():
        with pytest.raises(OSError) as failed:
            op()
        assert failed.value.errno == errno.ENOSPC, name
        errors[name] = failed.value

    assert_intact(root, manifest, saved)
    assert small_fs.free_bytes() == 0
    small_fs.fill(leave=PAGE)
    assert sorted(unprotected.prune().delete) == [0, 1]
    assert small_fs.free_bytes() > 2 * 20_000 * 8
    assert [r.step for r in unprotected.records()] == [2]
    check_write_error(errors["pin"], root=root, step=1, codes={errno.ENOSPC}, says=NO_SPACE)
    check_write_error(errors["prune"], root=root, step=None, codes={errno.ENOSPC}, says=NO_SPACE)


class Model:
    """A training state whose size the test sets."""

    def __init__(self) -> None:
        self.w = np.zeros(1)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].copy()


def test_a_checkpointer_step_that_fills_the_disk_raises_and_a_restart_resumes_before_it(
    small_fs: SmallFs,
) -> None:
    """ckpt.step raises when its save finds no space; a fresh process resumes from the step before."""
    root = small_fs.path / "run"

    def checkpointer(model: Model) -> Checkpointer:
        store = CheckpointStore(root, keep_last=2, lock_timeout=30)
        return Checkpointer(store, StoppingPolicy(monitor="loss", patience=3), model)

    model = Model()
    ckpt = checkpointer(model)
    assert ckpt.resume() == 0
    weights = {}
    for step in range(2):
        model.w = weights[step] = tree(step, 64 * 1024)["w"]
        ckpt.step(step, {"loss": 1.0 / (step + 1)})
    model.w = np.ones(FS_BYTES // 8)

    with pytest.raises(OSError) as failed:
        ckpt.step(2, {"loss": 0.1})

    assert failed.value.errno == errno.ENOSPC
    assert [p.name for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)] == []
    restarted = Model()
    again = checkpointer(restarted)
    assert again.resume() == 2
    assert np.array_equal(restarted.w, weights[1])
    assert again.policy is not None and again.policy.best_step == 1
    restarted.w = tree(2, 64 * 1024)["w"]
    again.step(2, {"loss": 0.1})
    assert [r.step for r in again.store.records()] == [1, 2]
    check_write_error(failed.value, root=root, step=2, codes={errno.ENOSPC}, says=NO_SPACE)


# -- read-only --------------------------------------------------------------------------------


@pytest.mark.parametrize("lock_file", ["lock-file-present", "lock-file-absent"])
def test_a_read_only_store_reads_and_refuses_every_write_at_once(
    small_fs: SmallFs, lock_file: str
) -> None:
    """On a read-only file system a store opens, lists, loads and verifies; writes fail at once, naming the root."""
    root = small_fs.path / "store"
    store = CheckpointStore(root)
    saved = {step: tree(step, 1000) for step in range(3)}
    for step, t in saved.items():
        store.save(step, t, metrics={"loss": 1.0 / (step + 1)})
    store.pin(0)
    if lock_file == "lock-file-absent":
        (root / LOCK_NAME).unlink()
    manifest = store.manifest_path.read_bytes()
    small_fs.make_read_only()

    started = time.monotonic()
    ro = CheckpointStore(root, keep_last=1, monitor="loss", lock_timeout=30)
    assert [r.step for r in ro.records()] == [0, 1, 2]
    latest = ro.latest()
    assert latest is not None and latest.step == 2
    for step, want in saved.items():
        assert ro.verify(step).step == step
        assert_same(ro.load(step), want)
    assert_same(ro.load("best"), saved[2])
    assert_same(CheckpointStore(root, read_only=True).load(1), saved[1])
    assert time.monotonic() - started < PROMPT_S

    writes: dict[str, tuple[int | None, Callable[[], Any]]] = {
        "save": (3, lambda: ro.save(3, tree(3, 1000), metrics={"loss": 0.1})),
        "pin": (1, lambda: ro.pin(1)),
        "unpin": (0, lambda: ro.unpin(0)),
        "prune": (None, ro.prune),
    }
    errors = {}
    for name, (_, op) in writes.items():
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            op()
        took = time.monotonic() - started
        assert took < PROMPT_S, f"{name} took {took:.1f} s to fail (lock_timeout=30)"
        assert failed.value.errno in {errno.EROFS, errno.EACCES}, (name, failed.value)
        errors[name] = failed.value

    assert (root / LOCK_NAME).exists() == (lock_file == "lock-file-present")
    assert_intact(root, manifest, saved)
    for name, (step, _) in writes.items():
        check_write_error(
            errors[name], root=root, step=step, codes={errno.EROFS, errno.EACCES}, says=READ_ONLY
        )
