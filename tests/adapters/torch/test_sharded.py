"""Sharded saves of FSDP2 models on real gloo ranks: every rank writes, any world size loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore  # noqa: E402
from ckptkit._cli import main  # noqa: E402
from ckptkit._manifest import shard_file_name  # noqa: E402

from .test_distributed import launch, ok  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


def run(world: int, *args: str) -> None:
    ok(launch(*args, world=world, worker=WORKER))


def read_dump(path: Path) -> dict[str, Any]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_same(a: Path, b: Path) -> None:
    """The two dumped states are equal bit for bit: keys, dtypes, shapes, bytes, JSON values."""
    x, y = read_dump(a), read_dump(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        assert x[key].tobytes() == y[key].tobytes(), f"{key} differs"


class Runs:
    """FSDP2 runs of three steps on 2 and 4 ranks, each made once per module when first asked for."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._done: dict[int, tuple[int, Path, Path]] = {}

    def __call__(self, world: int) -> tuple[int, Path, Path]:
        """The world size, the store and the final state of the run on ``world`` ranks."""
        if world not in self._done:
            root, out = self._tmp / f"run{world}", self._tmp / f"trained{world}.npz"
            run(world, "train", str(root), str(out), "--steps", "0", "3")
            self._done[world] = (world, root, out)
        return self._done[world]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(params=[2, 4], ids=["saved-on-2", "saved-on-4"])
def saved(request: pytest.FixtureRequest, runs: Runs) -> tuple[int, Path, Path]:
    """Three steps of an FSDP2 run on 2 or 4 ranks: the world size, its store and final state."""
    return runs(request.param)


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2)])
def test_a_sharded_checkpoint_loads_bit_exactly_on_any_world_size(
    runs: Runs, save_world: int, load_world: int, tmp_path: Path
) -> None:
    """Saved on N ranks, the model and AdamW state load on 1 (no process group), 2 or 4 ranks."""
    _, root, trained = runs(save_world)
    out = tmp_path / "loaded.npz"
    run(load_world, "load", str(root), str(out))
    assert_same(trained, out)


def test_every_rank_writes_its_own_shard_file_and_the_manifest_lists_them(
    saved: tuple[int, Path, Path],
) -> None:
    """Each rank's shard file is in the checkpoint and the manifest (format 3), with its checksum."""
    world, root, _ = saved
    store = CheckpointStore(root, read_only=True)
    record = store.latest()
    assert record is not None and record.sharded
    names = sorted(f.name for f in record.files)
    shards = sorted(shard_file_name(rank) for rank in range(world))
    assert names == sorted(["arrays.safetensors", "state.json", "shards.json", *shards])
    assert json.loads((root / "manifest.json").read_text())["format_version"] == 3
    assert sorted(p.name for p in (root / record.directory).iterdir()) == names
    assert store.verify().step == record.step


def test_one_tensor_of_a_sharded_checkpoint_reads_without_torch(runs: Runs, tmp_path: Path) -> None:
    """read_arrays puts one tensor together from the ranks' chunks, in a process without torch."""
    _, root, trained = runs(4)
    script = (
        "import sys, json, numpy as np\n"
        "from ckptkit import CheckpointStore\n"
        "store = CheckpointStore(sys.argv[1], read_only=True)\n"
        "info = store.tensor_info()\n"
        "w = store.read_arrays(keys=['model.0.weight', 'optimizer.state.2.weight.exp_avg'])\n"
        "np.savez(sys.argv[2], **w)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'shape': list(info['model.0.weight'].shape)}))\n"
    )
    out = tmp_path / "one.npz"
    done = subprocess.run(
        [sys.executable, "-c", script, str(root), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result == {"torch": False, "shape": [30, 8]}
    want = read_dump(trained)
    with np.load(out) as got:
        assert got["model.0.weight"].tobytes() == want["model/0.weight"].tobytes()
        assert (
            got["optimizer.state.2.weight.exp_avg"].tobytes()
            == want["optimizer/state/2.weight/exp_avg"].tobytes()
        )


def test_an_older_sharded_step_loads_whole_into_a_plain_or_a_sharded_model(
    runs: Runs, tmp_path: Path
) -> None:
    """store.load(step) of a sharded checkpoint loads whole into a plain or an FSDP2 model."""
    _, root, trained = runs(2)
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    run(1, "load", str(root), str(first), "--step", "1")
    run(2, "load", str(root), str(second), "--step", "1")
    assert_same(first, second)
    assert (
        read_dump(first)["model/0.weight"].tobytes()
        != read_dump(trained)["model/0.weight"].tobytes()
    )


def test_a_resumed_fsdp2_run_matches_the_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    """Killed after step 2 and resumed on 2 ranks, training ends where the whole run ends."""
    whole, parts = tmp_path / "whole.npz", tmp_path / "parts.npz"
    run(2, "train", str(tmp_path / "a"), str(whole), "--steps", "0", "6")
    run(2, "train", str(tmp_path / "b"), str(tmp_path / "half.npz"), "--steps", "0", "3")
    run(2, "train", str(tmp_path / "b"), str(parts), "--steps", "3", "6")
    assert_same(whole, parts)


def test_the_cli_lists_and_verifies_a_sharded_checkpoint(
    saved: tuple[int, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """ckptkit ls, show and verify read a sharded store (shard files and sharded tensors listed)."""
    world, root, _ = saved
    for command in (["ls"], ["show", "latest"], ["verify"]):
        assert main([command[0], str(root), *command[1:]]) == 0
        if command[0] == "show":
            shown = capsys.readouterr().out
            assert shard_file_name(world - 1) in shown
            assert "model.0.weight" in shown


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_sharded_save_of_cuda_shards_over_nccl_loads_on_the_cpu(tmp_path: Path) -> None:
    """FSDP2 on the GPU with NCCL saves its CUDA shards; a CPU-only process loads them exactly."""
    world = min(2, torch.cuda.device_count())
    trained, loaded = tmp_path / "trained.npz", tmp_path / "loaded.npz"
    run(world, "train", str(tmp_path / "run"), str(trained), "--steps", "0", "3", "--cuda")
    run(1, "load", str(tmp_path / "run"), str(loaded))
    assert_same(trained, loaded)
