"""Framework objects given to the core fail at once, naming the adapter that converts them.

The core imports no framework, so these tests use stand-in classes defined as if in the
``torch`` and ``keras`` packages; ``tests/adapters/*/test_wrapping.py`` check the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptkit import Checkpointer, CheckpointStore, UnsupportedStateError


class Module:
    """Stands in for ``torch.nn.Module``: its state_dict holds framework tensors."""

    def state_dict(self) -> dict[str, Any]:
        return {"weight": Tensor()}

    def load_state_dict(self, state: Any) -> None:
        pass


class Optimizer(Module):
    """Stands in for ``torch.optim.Optimizer``."""


class Tensor:
    """Stands in for ``torch.Tensor``."""


class Model:
    """Stands in for ``keras.Model``, which has no state_dict at all."""


Module.__module__ = "torch.nn.modules.module"
Optimizer.__module__ = "torch.optim.optimizer"
Tensor.__module__ = "torch"
Model.__module__ = "keras.src.models.model"


class Linear(Module):
    pass


Linear.__module__ = "torch.nn.modules.linear"


class OwnStateModule(Module):
    """A user's subclass that saves numpy arrays through its own state_dict: not refused."""

    def state_dict(self) -> dict[str, Any]:
        return {"w": np.zeros(2)}


def test_a_torch_module_given_directly_names_torch_state(tmp_path: Path) -> None:
    """Checkpointer(store, policy, model) refuses a torch module, saying to wrap it in TorchState."""
    with pytest.raises(TypeError) as e:
        Checkpointer(CheckpointStore(tmp_path), None, Linear())
    assert str(e.value) == (
        "state is a PyTorch Linear, which the core cannot save directly (its state holds "
        "framework tensors); wrap it in the torch adapter's state: TorchState(model=model) from "
        "ckptkit.adapters.torch, and pass that to the Checkpointer"
    )


def test_a_dict_of_torch_objects_names_one_torch_state_with_every_part(tmp_path: Path) -> None:
    """A dict of a model and an optimizer is refused with TorchState(model=..., optimizer=...)."""
    with pytest.raises(TypeError, match=r"^state\['net'\] is a PyTorch Linear") as e:
        Checkpointer(CheckpointStore(tmp_path), None, {"net": Linear(), "opt": Optimizer()})
    assert "TorchState(net=net, opt=opt) from ckptkit.adapters.torch" in str(e.value)


def test_a_keras_model_given_directly_names_keras_state(tmp_path: Path) -> None:
    """A Keras model (no state_dict) is refused with KerasState and the fit callback named."""
    with pytest.raises(TypeError, match=r"^state is a Keras/TensorFlow Model") as e:
        Checkpointer(CheckpointStore(tmp_path), None, Model())
    assert "KerasState(model=model) from ckptkit.adapters.keras" in str(e.value)
    assert "CheckpointCallback" in str(e.value)


def test_a_module_subclass_with_its_own_state_dict_is_accepted(tmp_path: Path) -> None:
    """A class deriving from a framework's but defining state_dict itself is the user's business."""
    store = CheckpointStore(tmp_path)
    Checkpointer(store, None, OwnStateModule()).save(0)
    assert store.load(0)["w"].tolist() == [0.0, 0.0]


def test_a_framework_tensor_in_a_saved_tree_names_the_adapter(tmp_path: Path) -> None:
    """store.save of a torch state dict says which adapter converts it, with the key path."""
    with pytest.raises(UnsupportedStateError) as e:
        CheckpointStore(tmp_path).save(0, {"model": Module().state_dict()})
    assert str(e.value) == (
        'state["model"]["weight"]: unsupported type Tensor; a PyTorch value: convert torch '
        "state with ckptkit.adapters.torch (TorchState(model=..., optimizer=...) for a "
        "Checkpointer, state_to_tree(obj) for store.save)"
    )
