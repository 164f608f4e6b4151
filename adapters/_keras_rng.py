"""The global random generators of a Keras run: captured, checked, restored.

Every backend has Keras' global ``SeedGenerator`` (what ``keras.random`` functions and
initializers draw from without a seed), Python's ``random`` and NumPy's global generator. Each
backend adds the generator of its own that Keras' training draws from:

- TensorFlow: its global ``tf.random.Generator`` (entry ``"tf"``);
- PyTorch: torch's default CPU generator (entry ``"torch"``), which ``fit``'s shuffling of
  NumPy arrays draws from (Keras feeds them through a ``torch.utils.data.RandomSampler``);
- JAX: nothing more (JAX has no global generator).

So the entries of a saved state say which backend it was saved on; a state from another
backend is refused, naming it, rather than restored in part.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import keras  # type: ignore[import-untyped,unused-ignore]
import numpy as np

from ckptkit._errors import ConfigMismatchError, CorruptCheckpointError

from . import _keras_private as private
from ._keras_convert import cast_seed_state, to_numpy

#: The entry of each backend's own generator in the saved state.
BACKEND_ENTRY = {"tensorflow": "tf", "torch": "torch"}
_COMMON = {"keras", "python", "numpy"}


def backend() -> str:
    """The backend Keras runs on (``KERAS_BACKEND``)."""
    return str(keras.backend.backend())


def _entries(name: str) -> set[str]:
    return _COMMON | ({BACKEND_ENTRY[name]} if name in BACKEND_ENTRY else set())


def capture_rng() -> dict[str, Any]:
    """The global generators' states; Keras' (and TF's) are None where not created yet.

    Loading a None removes the generator again, so it is created the same way the next time
    it is needed.
    """
    keras_gen = private.keras_global_seed_generator()
    tree: dict[str, Any] = {
        "keras": None if keras_gen is None else to_numpy(keras_gen.state),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }
    name = backend()
    if name == "tensorflow":
        from . import _keras_tf_random

        tree["tf"] = _keras_tf_random.capture_global()
    elif name == "torch":
        import torch  # type: ignore[import-not-found,unused-ignore]

        tree["torch"] = torch.get_rng_state().numpy().copy()
    return tree


def _check_python(saved: Any) -> None:
    random.Random().setstate(saved)


def _check_numpy(saved: Any) -> None:
    np.random.RandomState().set_state(saved)


def _check_keras_seed(saved: Any) -> None:
    if saved is not None and to_numpy(saved).shape != (2,):
        raise ValueError("expected an array of shape (2,)")


def _check_torch(saved: Any) -> None:
    array = to_numpy(saved)
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError("expected a 1-D uint8 array")


def _check_tf(saved: Any, where: str) -> None:
    from . import _keras_tf_random

    _keras_tf_random.check_global(saved, where)


def check_rng(saved: Any, where: str) -> None:
    """Refuse a saved RNG state that is malformed or from another backend; restore nothing.

    Raises:
        ConfigMismatchError: it was saved on another Keras backend (its entries say which).
        CorruptCheckpointError: naming the generator whose state is malformed.
    """
    name = backend()
    if isinstance(saved, Mapping) and set(saved) != _entries(name):
        for other in ("tensorflow", "torch", "jax"):
            if other != name and set(saved) == _entries(other):
                raise ConfigMismatchError(
                    f"{where}: the random generators were saved on Keras' {other!r} backend, "
                    f"and this Keras runs on {name!r}; each backend has generators of its own. "
                    "Load the model and optimizer without them (KerasState(model, optimizer, "
                    "rng=False)), or resume on the backend it was saved on"
                )
    if not isinstance(saved, Mapping) or set(saved) != _entries(name):
        raise CorruptCheckpointError(f"{where}: the saved random-generator state is malformed")
    checks: dict[str, Callable[[Any], None]] = {
        "python": _check_python,
        "numpy": _check_numpy,
        "keras": _check_keras_seed,
        "torch": _check_torch,
        "tf": lambda s: _check_tf(s, where),
    }
    for entry in sorted(saved):
        try:
            checks[entry](saved[entry])
        except (TypeError, ValueError, KeyError, AttributeError, ConfigMismatchError) as e:
            raise CorruptCheckpointError(
                f"{where}: the saved state of the {entry} random generator is malformed ({e})"
            ) from e


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Set the global generators to a state checked by :func:`check_rng`."""
    if saved["keras"] is None:
        private.remove_keras_global_seed_generator()
    else:
        # Creating it draws from Python's generator, which is restored after.
        gen = private.make_keras_global_seed_generator()
        gen.state.assign(cast_seed_state(to_numpy(saved["keras"]), gen.state.dtype))
    if "tf" in saved:
        from . import _keras_tf_random

        _keras_tf_random.restore_global(saved["tf"])
    if "torch" in saved:
        import torch

        torch.set_rng_state(torch.from_numpy(np.array(to_numpy(saved["torch"]), np.uint8)))
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])
