"""The global random generators of a torch run: Python's, NumPy's, torch's CPU and CUDA's."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from ckptkit._errors import CorruptCheckpointError


class RngStateWarning(UserWarning):
    """A saved random-generator state could not be restored here (CUDA states without CUDA)."""


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and each initialised CUDA generator."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # untyped in torch
        cuda = torch.cuda.get_rng_state_all()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(saved: Any) -> None:
    """Set the global generators to ``saved`` (from :func:`capture_rng`).

    CUDA states are set for the devices both sides have; where CUDA is absent they are skipped
    with an :class:`RngStateWarning` (the CPU generators are still restored).

    Raises:
        CorruptCheckpointError: ``saved`` is not such a state.
    """
    try:
        python, numpy_state = saved["python"], saved["numpy"]
        torch_state, cuda = saved["torch"].cpu(), list(saved["cuda"])
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CorruptCheckpointError(f"the saved random-generator state is malformed: {e!r}") from e
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and len(cuda) != count:
        here = f"this machine has {count}" if count else "CUDA is not available here"
        warnings.warn(
            RngStateWarning(
                f"the checkpoint holds the random states of {len(cuda)} CUDA device(s) and "
                f"{here}: restored the first {min(count, len(cuda))} (and the CPU generators)"
            ),
            stacklevel=3,
        )
    for index, state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(state.cpu(), index)
