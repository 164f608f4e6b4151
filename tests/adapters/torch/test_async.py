"""save_async with the torch adapter: tensors are snapshotted before training changes them."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore  # noqa: E402 (after the importorskip)
from ckptkit.adapters.torch import TorchState, state_to_tree, tree_to_state  # noqa: E402


def test_an_optimizer_step_after_save_async_does_not_reach_the_checkpoint(tmp_path: Path) -> None:
    """Parameters and Adam moments saved by save_async are those from before the next step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = opt.state[model.weight]["exp_avg"].clone()

    store = CheckpointStore(tmp_path)
    pending = store.save_async(
        1, state_to_tree({"model": model.state_dict(), "opt": opt.state_dict()})
    )
    for _ in range(3):  # in-place updates of the very tensors that were saved
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
    pending.result()

    saved = tree_to_state(store.load(1))
    for key, value in expected.items():
        assert torch.equal(saved["model"][key], value)
        assert not torch.equal(model.state_dict()[key], value)
    assert torch.equal(saved["opt"]["state"][0]["exp_avg"], expected_moment)


def test_torch_state_loads_what_save_async_committed(tmp_path: Path) -> None:
    """A TorchState tree saved in the background restores the module exactly."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    state = TorchState(model=model, rng=False)
    with CheckpointStore(tmp_path) as store:
        store.save_async(0, state.state_dict())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    state.load_state_dict(CheckpointStore(tmp_path).load(0))
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)
