"""The states measured and every save and load method, each made durable the same way.

A save method writes ``state`` to a path that does not exist yet and returns once the bytes are
on disk (fsynced). A load method reads that path back and returns the arrays it got; the caller
then touches every page (``touch``), so a lazy load (a memory map) pays for its reads too.
Optional libraries are imported inside the methods; ``available`` says why one cannot run.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit import CheckpointStore

MiB = 1 << 20
GiB = 1 << 30

#: Tensors of a state are named ``model.layerNNN``; ckptkit stores them under the same names.
PREFIX = "model."
#: How many tensors the partial-read rows read.
KEYS_READ = 4


@dataclass(frozen=True, kw_only=True)
class Size:
    """One state to measure: ``count`` float32 tensors of ``tensor_bytes`` each."""

    label: str
    count: int
    tensor_bytes: int
    small: bool = False

    @property
    def nbytes(self) -> int:
        return self.count * self.tensor_bytes

    def describe(self) -> str:
        return (
            f"{human_bytes(self.nbytes)} ({self.count} x {human_bytes(self.tensor_bytes)} float32)"
        )


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kmg])", re.IGNORECASE)


def parse_size(label: str) -> Size:
    """``small`` (200 tensors, 100 KiB), or a total like ``1g``, ``100m``, ``4m``, ``512k``.

    Large states use 16 MiB tensors from 1 GiB up, 4 MiB tensors from 64 MiB, else 4 tensors.
    """
    label = label.strip().lower()
    if label == "small":
        return Size(label="small", count=200, tensor_bytes=512, small=True)
    match = _SIZE.fullmatch(label)
    if match is None:
        raise ValueError(f"size {label!r}: expected 'small' or a number with k, m or g (e.g. 100m)")
    total = int(float(match[1]) * {"k": 1 << 10, "m": MiB, "g": GiB}[match[2]])
    tensor = 16 * MiB if total >= GiB else 4 * MiB if total >= 64 * MiB else max(4, total // 4)
    tensor -= tensor % 4
    return Size(label=label, count=max(1, total // tensor), tensor_bytes=tensor)


def build_state(size: Size) -> dict[str, np.ndarray]:
    """The flat state, name -> array; non-constant values, so no layer below can skip them."""
    n = size.tensor_bytes // 4
    shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
    state = {}
    for i in range(size.count):
        array = np.arange(n, dtype=np.float32)
        array *= np.float32((i + 1) * 1e-3)
        state[f"{PREFIX}layer{i:03d}"] = array.reshape(shape)
    return state


def nested(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """The same arrays as ckptkit's state tree ``{"model": {"layerNNN": array}}``."""
    return {"model": {name.removeprefix(PREFIX): array for name, array in flat.items()}}


def leaves(tree: Any) -> Iterator[np.ndarray]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from leaves(value)
    elif isinstance(tree, np.ndarray):
        yield tree


def touch(arrays: Iterator[np.ndarray] | list[np.ndarray]) -> float:
    """Read one value per page of every array, so a memory-mapped load pays for its reads."""
    total = 0.0
    for array in arrays:
        if array.size:
            flat = array.reshape(-1)
            total += float(flat[:: max(1, 4096 // array.itemsize)].sum(dtype=np.float64))
    return total


def available(library: str) -> str | None:
    """None if ``library`` imports, else "not installed"."""
    try:
        __import__(library)
    except ImportError:
        return "not installed"
    return None


def store_supports(feature: str) -> bool:
    """Whether this ckptkit has ``save_async``, ``read_arrays`` or ``load(mmap=...)``."""
    if feature == "mmap":
        return "mmap" in inspect.signature(CheckpointStore.load).parameters
    return hasattr(CheckpointStore, feature)


# -- saves ---------------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data[: 1 << 30]) :]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_raw(state: dict[str, np.ndarray], path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for array in state.values():
            _write_all(fd, array.reshape(-1).view(np.uint8).data)
        os.fsync(fd)
    finally:
        os.close(fd)


def save_ckptkit(state: dict[str, np.ndarray], path: Path) -> None:
    # Opening the store (a mkdir, a lock file, a directory scan) is counted: well under 1 ms.
    CheckpointStore(path).save(0, nested(state))


def save_torch(state: dict[str, np.ndarray], path: Path) -> None:
    import torch

    tensors = {name: torch.from_numpy(array) for name, array in state.items()}
    with open(path, "xb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(state, str(path))
    _fsync_path(path)


@dataclass(frozen=True, kw_only=True)
class Method:
    """A named method: ``run`` and the library it needs (None: only numpy and ckptkit)."""

    name: str
    run: Callable[..., Any]
    needs: str | None = None
    feature: str | None = None

    def unavailable(self) -> str | None:
        """Why this method cannot run here, or None."""
        if self.needs is not None and (why := available(self.needs)) is not None:
            return why
        if self.feature is not None and not store_supports(self.feature):
            return "not available"
        return None


SAVES = [
    Method(name="raw write+fsync", run=save_raw),
    Method(name="ckptkit save", run=save_ckptkit),
    Method(name="torch.save+fsync", run=save_torch, needs="torch"),
    Method(name="safetensors save_file+fsync", run=save_safetensors, needs="safetensors"),
]
#: The save each load method reads back.
LOAD_SOURCE = {
    "ckptkit load": "ckptkit save",
    "ckptkit load verify=False": "ckptkit save",
    "ckptkit load mmap=True": "ckptkit save",
    "raw read": "raw write+fsync",
    "torch.load mmap": "torch.save+fsync",
    "safetensors load_file": "safetensors save_file+fsync",
    "ckptkit read_arrays": "ckptkit save",
    "safetensors safe_open": "safetensors save_file+fsync",
}


# -- loads ---------------------------------------------------------------------------------


def load_raw(path: Path, size: Size) -> list[np.ndarray]:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(os.fstat(fd).st_size)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.readv(fd, [view[got : got + (1 << 30)]])
            if not n:
                raise EOFError(f"{path}: ended after {got} bytes")
            got += n
    finally:
        os.close(fd)
    n = size.tensor_bytes // 4
    return [np.frombuffer(buf, np.float32, n, i * size.tensor_bytes) for i in range(size.count)]


def load_ckptkit(path: Path, size: Size, **options: Any) -> list[np.ndarray]:
    return list(leaves(CheckpointStore(path).load(0, **options)))


def load_torch(path: Path, size: Size) -> list[np.ndarray]:
    import torch

    tensors = torch.load(path, weights_only=True, mmap=True)
    return [t.numpy() for t in tensors.values()]


def load_safetensors(path: Path, size: Size) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    return list(load_file(str(path)).values())


def key_names(size: Size) -> list[str]:
    """The tensors the partial reads ask for: spread over the file, first to last."""
    picks = sorted({round(i * (size.count - 1) / max(1, KEYS_READ - 1)) for i in range(KEYS_READ)})
    return [f"{PREFIX}layer{i:03d}" for i in picks]


def read_keys_ckptkit(path: Path, size: Size) -> list[np.ndarray]:
    store: Any = CheckpointStore(path)
    return list(store.read_arrays(0, keys=key_names(size)).values())


def read_keys_safetensors(path: Path, size: Size) -> list[np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return [f.get_tensor(name) for name in key_names(size)]


LOADS = [
    Method(name="raw read", run=load_raw),
    Method(name="ckptkit load", run=load_ckptkit),
    Method(
        name="ckptkit load verify=False",
        run=lambda path, size: load_ckptkit(path, size, verify=False),
    ),
    Method(
        name="ckptkit load mmap=True",
        run=lambda path, size: load_ckptkit(path, size, mmap=True),
        feature="mmap",
    ),
    Method(name="torch.load mmap", run=load_torch, needs="torch"),
    Method(name="safetensors load_file", run=load_safetensors, needs="safetensors"),
]
KEY_LOADS = [
    Method(name="ckptkit read_arrays", run=read_keys_ckptkit, feature="read_arrays"),
    Method(name="safetensors safe_open", run=read_keys_safetensors, needs="safetensors"),
]
ALL = {m.name: m for m in [*SAVES, *LOADS, *KEY_LOADS]}
