"""The Keras tests run on the backend KERAS_BACKEND names (TensorFlow when unset).

CI runs this folder once per backend, each in its own environment. Tests marked
``tensorflow_only`` (TFState, tf.data, tf.random) are deselected off TensorFlow with
``-m "not tensorflow_only"``; run there anyway, they skip, which CI (CKPTKIT_NO_SKIP=1) counts
as a failure, so a deselection missing from CI's command shows. The modules that are about
TensorFlow objects alone (and define them at import) are not collected off TensorFlow.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
BACKEND = os.environ["KERAS_BACKEND"]

#: Wholly about TFState, tf.data and tf.random (every test in them is tensorflow_only).
collect_ignore = [] if BACKEND == "tensorflow" else ["test_tf.py", "test_tfstate.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if BACKEND == "torch":
        # Keras' PyTorch backend calls np.array on torch tensors (in its optimizers, in
        # get_weights), whose __array__ takes no copy keyword, which NumPy 2 deprecates; the
        # adapter itself reads tensors with Tensor.numpy.
        for item in items:
            item.add_marker(
                pytest.mark.filterwarnings(
                    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
                )
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if BACKEND != "tensorflow" and item.get_closest_marker("tensorflow_only") is not None:
        pytest.skip(
            f"needs KERAS_BACKEND=tensorflow, this run has {BACKEND!r}: deselect it with "
            "-m 'not tensorflow_only'"
        )


def pytest_report_header() -> str:
    return f"Keras backend (KERAS_BACKEND): {BACKEND}"
