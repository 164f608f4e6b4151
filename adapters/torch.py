"""PyTorch adapter: a model, its optimizer, schedulers, scaler, generators and RNG as one state.

Everything converts to ckptkit's framework-free tree (numpy arrays and JSON values), so
checkpoints are safetensors + JSON and loading never runs code (nothing is unpickled).

Example:
    >>> from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
    >>> from ckptkit.adapters.torch import TorchState
    >>> state = TorchState(model=model, optimizer=opt, scheduler=sched, rng=True)
    >>> ckpt = Checkpointer(CheckpointStore("run"), StoppingPolicy(monitor="val_loss"), state)
    >>> start = ckpt.resume()
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (imported for the clear error below)
except ImportError as e:  # pragma: no cover - exercised in the Keras test environment
    raise ImportError(
        "ckptkit.adapters.torch needs PyTorch, which is not installed: "
        "pip install 'ckptkit-ml[torch]'"
    ) from e

from ._torch_convert_read import TiedTensorError
from ._torch_data import ResumableSampler
from ._torch_dist import DistributedCheckpointer, DistributedCheckpointError
from ._torch_hooks import CheckpointCallback
from ._torch_rng import RngStateWarning
from ._torch_state import (
    TorchState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

__all__ = [
    "CheckpointCallback",
    "DistributedCheckpointError",
    "DistributedCheckpointer",
    "ResumableSampler",
    "RngStateWarning",
    "TiedTensorError",
    "TorchState",
    "load_state",
    "save_state",
    "state_to_tree",
    "tree_to_state",
]
