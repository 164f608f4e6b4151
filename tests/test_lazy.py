"""Lazy reads: a memory-mapped load, single tensors by name, and the header alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ckptkit import (
    CheckpointStore,
    CorruptCheckpointError,
    TensorInfo,
    TensorNotFoundError,
)


def _state() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "model": {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.arange(5)},
        "opt": {"m": rng.standard_normal(100), "count": 3},
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float16),
    }


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_mmap_load_equals_a_normal_load_and_holds_no_private_copy(tmp_path: Path) -> None:
    """Arrays of an mmap load have the saved values, are read-only, and view the file's map."""
    store = CheckpointStore(tmp_path)
    store.save(0, _state())
    plain = store.load(0)
    mapped = store.load(0, mmap=True)
    np.testing.assert_array_equal(mapped["model"]["w"], plain["model"]["w"])
    np.testing.assert_array_equal(mapped["opt"]["m"], plain["opt"]["m"])
    assert mapped["opt"]["count"] == 3
    w = mapped["model"]["w"]
    assert not w.flags.writeable and not w.flags.owndata
    assert plain["model"]["w"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0


def test_an_mmap_load_still_verifies_the_checksum(tmp_path: Path) -> None:
    """A changed byte is detected by an mmap load with verify=True (the default)."""
    store = CheckpointStore(tmp_path)
    record = store.save(0, _state())
    _flip_last_byte(tmp_path / record.directory / "arrays.safetensors")
    with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
        store.load(0, mmap=True)


def test_a_mapped_checkpoint_survives_its_deletion(tmp_path: Path) -> None:
    """Arrays mapped from a checkpoint that retention then deletes keep their values."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(0, {"w": np.full(1000, 7.0)})
    mapped = store.load(0, mmap=True)
    store.save(1, {"w": np.full(1000, 8.0)})
    store.wait()  # retention's deletion runs on after save returns
    assert not (tmp_path / "step_000000000000").exists()
    assert mapped["w"].tolist() == [7.0] * 1000


def test_read_arrays_reads_only_the_named_tensors(tmp_path: Path) -> None:
    """read_arrays returns exactly the tensors asked for, equal to a full load's."""
    store = CheckpointStore(tmp_path)
    store.save(0, _state())
    full = store.load(0)
    some = store.read_arrays(0, ["model.w", "flags"])
    assert list(some) == ["model.w", "flags"]
    np.testing.assert_array_equal(some["model.w"], full["model"]["w"])
    np.testing.assert_array_equal(some["flags"], full["flags"])
    everything = store.read_arrays(0)
    assert sorted(everything) == ["empty", "flags", "model.b", "model.w", "opt.m"]
    assert everything["empty"].shape == (0, 4) and everything["empty"].dtype == np.float16
    assert store.read_arrays(0, "opt.m")["opt.m"].shape == (100,)


def test_read_arrays_reads_no_more_than_the_header_and_its_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading one small tensor of a large checkpoint reads a few hundred bytes, not the file."""
    store = CheckpointStore(tmp_path)
    store.save(0, {"big": np.zeros(1 << 20), "small": np.arange(4)})
    read_sizes: list[int] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, offset: int) -> bytes:
        read_sizes.append(n)
        return real_pread(fd, n, offset)

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        read_sizes.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    assert store.read_arrays(0, ["small"])["small"].tolist() == [0, 1, 2, 3]
    assert sum(read_sizes) < 1000


def test_read_arrays_names_a_missing_tensor_and_lists_the_others(tmp_path: Path) -> None:
    """An unknown tensor name raises TensorNotFoundError listing the names there are."""
    store = CheckpointStore(tmp_path)
    store.save(3, _state())
    with pytest.raises(TensorNotFoundError, match=r"step 3 has no tensor 'model\.x'.*model\.w"):
        store.read_arrays(3, ["model.x"])
    with pytest.raises(KeyError):
        store.read_arrays(3, ["nope"])


def test_read_arrays_verifies_the_whole_file_only_when_asked(tmp_path: Path) -> None:
    """A flipped byte in another tensor passes verify=False but fails verify=True."""
    store = CheckpointStore(tmp_path)
    record = store.save(0, {"a": np.zeros(8), "z": np.zeros(8, np.int8)})
    # Tensors are ordered by itemsize: the int8 tensor "z" holds the last byte.
    _flip_last_byte(tmp_path / record.directory / "arrays.safetensors")
    assert store.read_arrays(0, ["a"])["a"].tolist() == [0.0] * 8
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.read_arrays(0, ["a"], verify=True)


def test_tensor_info_lists_every_tensor_from_the_header(tmp_path: Path) -> None:
    """tensor_info gives dtype code, shape and size of each tensor, sorted by name."""
    store = CheckpointStore(tmp_path)
    store.save(0, _state())
    info = store.tensor_info(0)
    assert list(info) == ["empty", "flags", "model.b", "model.w", "opt.m"]
    assert info["model.w"] == TensorInfo(name="model.w", dtype="F32", shape=(64, 32), nbytes=8192)
    assert info["flags"].dtype == "BOOL" and info["empty"].nbytes == 0
