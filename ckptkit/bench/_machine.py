"""Facts about the machine and its disk, the page cache, and this process's memory (Linux first).

Every helper degrades to "unknown" rather than failing: a benchmark on another OS still runs,
it only reports less.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def filesystem(path: Path) -> tuple[str, str]:
    """The (type, mount point) of the file system holding ``path``, from /proc/mounts."""
    real = os.path.realpath(path)
    best: tuple[str, str] = ("unknown", "?")
    best_len = -1
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces and friends as octal (\040).
        mount = fields[1].encode().decode("unicode_escape")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        # Later lines shadow earlier ones at the same mount point.
        if inside and len(mount) >= best_len:
            best, best_len = (fields[2], mount), len(mount)
    return best


def checksum_throughput(nbytes: int = 64 << 20) -> tuple[str, float | None]:
    """The store's checksum algorithm and its single-thread speed in MiB/s (None if unknown)."""
    from ckptkit import _fsio

    name = str(getattr(_fsio, "CHECKSUM_ALGORITHM", "unknown"))
    # The store's own hasher factory when it has one (it may use a non-hashlib hash).
    factory: Any = getattr(_fsio, "new_hasher", hashlib.new)
    try:
        h = factory(name)
    except (ValueError, TypeError):
        return name, None
    data = np.ones(nbytes, dtype=np.uint8)
    start = time.perf_counter()
    h.update(data.data)
    elapsed = time.perf_counter() - start
    return name, (nbytes / (1 << 20)) / elapsed if elapsed > 0 else None


def machine_facts(directory: Path) -> dict[str, Any]:
    """What a reader needs to judge the figures: CPUs, versions, the disk under ``directory``."""
    fstype, mount = filesystem(directory)
    usage = shutil.disk_usage(directory)
    algo, speed = checksum_throughput()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "memory_total_bytes": _meminfo("MemTotal"),
        "memory_available_bytes": _meminfo("MemAvailable"),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "matplotlib": _version("matplotlib"),
        "ckptkit": _version("ckptkit"),
        "dir": str(directory),
        "dir_fstype": fstype,
        "dir_mount": mount,
        "dir_free_bytes": usage.free,
        "checksum": algo,
        "checksum_mib_s": speed,
    }


def remove(path: Path) -> None:
    """Delete a file or tree, then fsync its directory (outside any timing).

    On a file system mounted with ``discard``, freed blocks are trimmed at the next journal
    commit; the directory fsync makes that commit happen here, not in the next method's fsync.
    """
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- page cache ----------------------------------------------------------------------------


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _libc() if platform.system() == "Linux" else None
_MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_pages(path: Path) -> tuple[int, int] | None:
    """(pages in the page cache, pages in the file), by mincore(2) on a fresh map; None if unknown."""
    if _LIBC is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        addr = _LIBC.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = np.zeros(pages, dtype=np.uint8)
            if _LIBC.mincore(addr, size, vec.ctypes.data) != 0:
                return None
            return int(np.count_nonzero(vec & 1)), pages
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return [path]


def evict(path: Path) -> float | None:
    """Drop a file (or every file under a directory) from the page cache; return the fraction
    still cached afterwards (0.0 means fully evicted), or None if that cannot be told.

    The files were fsynced when written, so their pages are clean and DONTNEED can drop them.
    """
    resident = total = 0
    known = True
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # a dirty page is not dropped; make sure none is
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                known = False
        finally:
            os.close(fd)
        counted = _resident_pages(file)
        if counted is None:
            known = False
        else:
            resident += counted[0]
            total += counted[1]
    if not known:
        return None
    return resident / total if total else 0.0


# -- this process's memory -----------------------------------------------------------------


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
