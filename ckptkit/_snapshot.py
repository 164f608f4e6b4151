"""SnapshotBuffers: the host memory ``save_async`` copies a state into, reused from save to save.

The arrays are laid out back to back in one buffer, in the order the arrays file stores them
(:func:`_safetensors.data_order`), so the background commit writes the file's data area with a
few large writes instead of one per tensor. Each write and each hash is a point where the
saving thread gives up the GIL and must take it back; with the training thread running, each
costs up to the interpreter's switch interval, so fewer, larger calls finish sooner.

The buffer is allocated once and kept while the state's layout (names, shapes, dtypes) stays
the same, which is the case from one step to the next of a training run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ckptkit._safetensors import data_order

_Layout = tuple[tuple[str, tuple[int, ...], str], ...]


class SnapshotBuffers:
    """One state's worth of host memory, reused by every snapshot of the same layout."""

    def __init__(self) -> None:
        self._layout: _Layout = ()
        self._buffer: np.ndarray | None = None
        self._views: dict[str, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    def snapshot(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy each array into its place in the buffer; return name -> view of that place.

        A state of another layout replaces the buffer, so the pool holds one state's worth of
        memory. Must not be called while a previous snapshot is being written.
        """
        order = data_order(arrays)
        layout = tuple((name, arrays[name].shape, arrays[name].dtype.str) for name in order)
        if layout != self._layout:
            self._allocate(arrays, order, layout)
        for name, array in arrays.items():
            np.copyto(self._views[name], array, casting="no")
        return dict(self._views)

    def _allocate(
        self, arrays: Mapping[str, np.ndarray], order: list[str], layout: _Layout
    ) -> None:
        self.clear()
        # Every offset is a multiple of its array's itemsize: data_order puts larger items first.
        buffer = np.empty(sum(arrays[name].nbytes for name in order), dtype=np.uint8)
        views: dict[str, np.ndarray] = {}
        offset = 0
        for name in order:
            array = arrays[name]
            end = offset + array.nbytes
            views[name] = buffer[offset:end].view(array.dtype).reshape(array.shape)
            offset = end
        self._buffer, self._views, self._layout = buffer, views, layout

    def clear(self) -> None:
        self._layout, self._buffer, self._views = (), None, {}
