"""Optional progress bars for saves and loads of large states (``tqdm``, an optional extra)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: States smaller than this are saved and loaded without a bar (it would only flicker).
MIN_BYTES = 64 << 20

#: Called with the number of bytes just written or read.
Update = Callable[[int], Any]


def require_tqdm() -> None:
    """Raise ImportError with the fix when ``tqdm`` is missing."""
    try:
        import tqdm  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "progress=True needs the tqdm package; run `pip install 'ckptkit-ml[progress]'` "
            "(or `pip install tqdm`)"
        ) from e


@contextmanager
def bar(enabled: bool, total: int, description: str) -> Iterator[Update | None]:
    """A byte-counting bar on stderr, or None when disabled or ``total`` is small."""
    if not enabled or total < MIN_BYTES:
        yield None
        return
    from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]

    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, leave=False
    ) as progress:
        yield progress.update
