"""A real torch model, optimizer or state dict given to the core names TorchState in its error."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptkit import (  # noqa: E402 (after the importorskip)
    Checkpointer,
    CheckpointStore,
    StoppingPolicy,
    UnsupportedStateError,
)
from ckptkit.adapters.torch import TorchState  # noqa: E402


def test_checkpointer_of_a_bare_module_says_to_wrap_it_in_torch_state(tmp_path: Path) -> None:
    """Checkpointer(store, policy, nn.Module) fails at once with TorchState(model=model)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match=r"^state is a PyTorch Sequential") as e:
        Checkpointer(CheckpointStore(tmp_path), StoppingPolicy(monitor="loss"), model)
    assert "TorchState(model=model) from ckptkit.adapters.torch" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_checkpointer_of_a_dict_of_torch_objects_names_every_part(tmp_path: Path) -> None:
    """A dict of model, optimizer and scheduler is refused naming one TorchState with all three."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    parts = {"model": model, "optimizer": opt, "scheduler": sched}
    with pytest.raises(TypeError) as e:
        Checkpointer(CheckpointStore(tmp_path), None, parts)
    assert "TorchState(model=model, optimizer=optimizer, scheduler=scheduler)" in str(e.value)
    Checkpointer(CheckpointStore(tmp_path), None, TorchState(**parts)).save(0)


def test_saving_a_torch_state_dict_names_the_adapter(tmp_path: Path) -> None:
    """store.save(step, model.state_dict()) fails naming the key path and the torch adapter."""
    with pytest.raises(UnsupportedStateError) as e:
        CheckpointStore(tmp_path).save(0, torch.nn.Linear(2, 1).state_dict())
    assert str(e.value).startswith(
        'state["weight"]: unsupported type Tensor; a PyTorch value: convert torch state with '
        "ckptkit.adapters.torch"
    )
