"""The package's surface: exported names, no framework imports, no pickle anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ckptkit

REPO = Path(__file__).parent.parent


def test_exported_names_are_pinned() -> None:
    """__all__ is sorted and exactly the public names; each one exists."""
    assert ckptkit.__all__ == sorted(ckptkit.__all__)
    assert set(ckptkit.__all__) == {
        "AUTO_MODES",
        "Checkpoint",
        "CheckpointExistsError",
        "CheckpointNotFoundError",
        "CheckpointRecord",
        "CheckpointStore",
        "Checkpointer",
        "CkptkitError",
        "ConfigChangedWarning",
        "ConfigMismatchError",
        "CorruptCheckpointError",
        "Decision",
        "FallbackWarning",
        "FileEntry",
        "LockTimeoutError",
        "MissingMetricError",
        "PendingSave",
        "PreemptionGuard",
        "RetentionPlan",
        "RetentionPolicy",
        "Stateful",
        "StoppingPolicy",
        "ReadOnlyStoreError",
        "StoreFormatError",
        "StoreWriteError",
        "TensorInfo",
        "TensorNotFoundError",
        "UnsupportedStateError",
        "__version__",
    }
    for name in ckptkit.__all__:
        assert hasattr(ckptkit, name), name


def test_import_loads_no_framework() -> None:
    """`import ckptkit` (and the adapters package) imports no deep-learning framework."""
    code = (
        "import sys, ckptkit, ckptkit.adapters\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'tensorflow', 'keras', 'jax', 'flax', 'safetensors'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_errors_form_one_tree_with_builtin_bases() -> None:
    """Every error derives from CkptkitError and from the builtin code outside would catch."""
    pairs = {
        ckptkit.CheckpointNotFoundError: FileNotFoundError,
        ckptkit.CheckpointExistsError: FileExistsError,
        ckptkit.CorruptCheckpointError: ValueError,
        ckptkit.UnsupportedStateError: TypeError,
        ckptkit.ConfigMismatchError: ValueError,
        ckptkit.LockTimeoutError: TimeoutError,
        ckptkit.MissingMetricError: KeyError,
        ckptkit.ReadOnlyStoreError: PermissionError,
        ckptkit.StoreFormatError: ckptkit.CorruptCheckpointError,
        ckptkit.StoreWriteError: OSError,
        ckptkit.TensorNotFoundError: KeyError,
    }
    for error, builtin in pairs.items():
        assert issubclass(error, ckptkit.CkptkitError) and issubclass(error, builtin), error
    assert str(ckptkit.MissingMetricError("plain message")) == "plain message"


def test_the_library_never_uses_pickle() -> None:
    """No pickle, torch.save/torch.load or allow_pickle in the library's source.

    The benchmark (``ckptkit/bench``) is the one exception: it times ``torch.save`` and
    ``torch.load(weights_only=True)`` on files it wrote itself, as references.
    """
    bench = REPO / "ckptkit" / "bench"
    for path in [*REPO.joinpath("ckptkit").rglob("*.py"), *REPO.joinpath("adapters").rglob("*.py")]:
        if bench in path.parents:
            continue
        text = path.read_text()
        for word in ("import pickle", "torch.save", "torch.load", "allow_pickle", "np.load("):
            assert word not in text, f"{path}: {word}"
