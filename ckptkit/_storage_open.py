"""Which storage a store's ``root`` names: a local path, or a ``scheme://`` URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptkit._storage import Storage
from ckptkit._storage_local import LocalStorage

#: The URL schemes a store's root may have; a root without ``://`` is a local path.
SCHEMES = ("file", "gs", "memory", "s3")


def open_storage(
    root: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None
) -> Storage:
    """The storage for ``root``: a local directory, ``file://``, ``memory://`` or ``s3://``.

    Raises:
        ValueError: an unknown scheme, or ``storage_options`` for a storage that takes none.
    """
    if isinstance(root, Storage):
        if storage_options:
            raise ValueError("storage_options apply to a URL root, not to a storage object")
        return root
    text = os.fspath(root)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if storage_options:
            raise ValueError(
                f"{text}: storage_options apply to object-store URLs (s3://...), not to a local "
                "path; drop them"
            )
        return LocalStorage(Path(text))
    scheme = scheme.lower()
    if scheme == "file":
        if storage_options:
            raise ValueError(f"{text}: a file:// store takes no storage_options; drop them")
        return LocalStorage(Path(rest))
    if scheme == "memory":
        from ckptkit._storage_memory import MemoryStorage

        if storage_options:
            raise ValueError(f"{text}: a memory:// store takes no storage_options; drop them")
        return MemoryStorage(text)
    if scheme == "s3":
        from ckptkit._storage_s3 import S3Storage

        return S3Storage(text, storage_options=dict(storage_options or {}))
    if scheme == "gs":
        from ckptkit._storage_gcs import GCSStorage

        return GCSStorage(text, storage_options=dict(storage_options or {}))
    raise ValueError(
        f"{text}: no storage for the scheme {scheme!r}://; a store's root is a local path or a "
        f"URL with one of {', '.join(s + '://' for s in SCHEMES)}"
    )
