"""PyTorch DCP's ``async_save`` as a reference for ``save_async``, in this one process.

The state is the same arrays as torch tensors (``torch.from_numpy``, no copy), one flat dict.
Each save goes into a fresh directory, removed after it::

    async_save(tensors, storage_writer=FileSystemWriter(path, sync_files=True), no_dist=True)

``no_dist=True`` saves in a single process without a process group (torch 2.13 needs none; it
warns that it assumes so, and that warning is silenced here). ``async_save`` stages a copy of the
tensors into new CPU tensors (``FileSystemWriter`` is its own stager, without a cache), then
saves in a new one-thread executor; the future's ``result()`` returns once the data file and the
pickled ``.metadata`` are written and fsynced and ``.metadata`` is renamed into place. DCP does
not fsync the directory after that rename, which ckptkit's save does: that fsync is timed apart,
after ``result()``, and left out of DCP's figure.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ckptkit.bench._machine import fsync_dir, remove
from ckptkit.bench._methods import available

#: The warning ``save`` gives with ``no_dist=True``, once per save.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def unavailable() -> str | None:
    """Why DCP's ``async_save`` cannot run here, or None."""
    if (why := available("torch")) is not None:
        return why
    import torch.distributed as dist

    if not dist.is_available():
        return "not available: this torch build has no torch.distributed"
    try:
        from torch.distributed.checkpoint.state_dict_saver import async_save  # noqa: F401
    except ImportError:
        return "not available: this torch has no torch.distributed.checkpoint.async_save"
    return None


class DcpAsyncSave:
    """Saves ``state`` with DCP's ``async_save`` into numbered folders under ``root``.

    A context manager: on exit it removes ``root`` and restores the warning filters.
    """

    def __init__(self, state: dict[str, np.ndarray], root: Path) -> None:
        import torch

        self.tensors = {name: torch.from_numpy(array) for name, array in state.items()}
        self.root = root
        self.saves = 0
        #: Seconds of each fsync of a save's directory and of ``root`` after ``result()``.
        self.dir_fsyncs: list[float] = []
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> DcpAsyncSave:
        # The saves run in DCP's executor thread, while this filter is in place: every save
        # waits for its result() before the context ends.
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        self.root.mkdir()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        remove(self.root)
        self._warnings.__exit__(kind, error, traceback)

    def save(self) -> tuple[float, float, list[str]]:
        """One save: seconds until ``async_save`` returned and until its future's ``result()``
        did, and the names of the files it wrote (".metadata (pickled)" when it is a pickle)."""
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import async_save

        path = self.root / str(self.saves)
        self.saves += 1
        start = time.perf_counter()
        response = async_save(
            self.tensors, storage_writer=FileSystemWriter(path, sync_files=True), no_dist=True
        )
        blocked = time.perf_counter() - start
        # A Future here; an AsyncSaveResponse only for a stager that stages in the background.
        upload: Any = getattr(response, "upload_completion", response)
        upload.result()
        durable = time.perf_counter() - start
        start = time.perf_counter()
        fsync_dir(path)
        fsync_dir(self.root)
        self.dir_fsyncs.append(time.perf_counter() - start)
        files = [_describe(f) for f in sorted(path.iterdir(), key=lambda f: f.name == ".metadata")]
        remove(path)
        return blocked, durable, files


def _describe(path: Path) -> str:
    """The file's name; for ``.metadata``, "(pickled)" when it starts as a pickle (protocol 2+)."""
    if path.name != ".metadata":
        return path.name
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"
    return f"{path.name} (pickled)" if pickled else path.name
