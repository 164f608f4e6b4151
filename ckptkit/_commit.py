"""The disk side of the commit protocol: write, rename, commit the manifest, delete, sweep.

Each function is one stage of the protocol that ``CheckpointStore.save`` runs under the store's
lock (see ``_store.py`` for the order and why it is safe). Nothing here takes the lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ckptkit import _fsio, _manifest
from ckptkit._manifest import CHECKPOINT_DIR, CHECKPOINT_FILES, MANIFEST_NAME
from ckptkit._progress import Update
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._safetensors import write_safetensors

logger = logging.getLogger("ckptkit")


def write_directory(
    root: Path,
    step: int,
    arrays: Mapping[str, np.ndarray],
    state_bytes: bytes,
    progress: Update | None = None,
    header: Mapping[str, str] | None = None,
) -> tuple[str, tuple[FileEntry, ...]]:
    """Write a checkpoint's files into a temporary directory, then rename it into place.

    Every file and the directory are fsynced before the rename, so the final name never
    refers to incomplete data. On any failure the temporary is removed and nothing is renamed.
    ``header`` is the arrays file's ``__metadata__`` (none is written when it is empty).
    Returns the directory's final name and the files with their sizes and checksums.
    """
    tmp = root / _fsio.temp_name()
    os.mkdir(tmp)
    try:
        writer = _fsio.HashingWriter(tmp / "arrays.safetensors", progress=progress)
        try:
            write_safetensors(writer, arrays, header or None)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        size, checksum = _fsio.write_durable_file(tmp / "state.json", state_bytes)
        files = (
            FileEntry(name="arrays.safetensors", size=writer.size, checksum=writer.checksum),
            FileEntry(name="state.json", size=size, checksum=checksum),
        )
        _fsio.fsync_dir(tmp)
        directory = _free_directory_name(root, step)
        os.rename(tmp, root / directory)
    except BaseException:
        _fsio.remove_temp_tree(tmp)
        raise
    return directory, files


def _free_directory_name(root: Path, step: int) -> str:
    # An overwrite (or a leftover no sweep has removed yet) holds the plain name: add ".N".
    base = f"step_{step:012d}"
    name, n = base, 0
    while os.path.lexists(root / name):
        n += 1
        name = f"{base}.{n}"
    return name


def commit_manifest(
    root: Path, records: list[CheckpointRecord], *, new_directory: str | None = None
) -> None:
    """Atomically replace the manifest with ``records``: the commit point of every change.

    On a failure before ``os.replace``, the old manifest stays and ``new_directory`` (the
    checkpoint this commit would have listed) is removed.
    """
    tmp = root / _fsio.temp_name(".json")
    try:
        # The new directory's rename must be durable before a manifest that lists it is.
        _fsio.fsync_dir(root)
        _fsio.write_durable_file(tmp, _manifest.dumps(records))
        os.replace(tmp, root / MANIFEST_NAME)
    except OSError as e:
        if e.filename == str(tmp):
            e.filename = f"{root / MANIFEST_NAME}, writing its replacement {tmp.name}"
        _fsio.remove_quietly(tmp)
        if new_directory is not None:
            _fsio.remove_tree_of_own_files(root / new_directory, CHECKPOINT_FILES)
        raise
    except BaseException:
        _fsio.remove_quietly(tmp)
        if new_directory is not None:
            _fsio.remove_tree_of_own_files(root / new_directory, CHECKPOINT_FILES)
        raise
    # Past os.replace the commit has happened: a failure here propagates, but nothing is
    # rolled back, since the manifest on disk already lists the new state.
    _fsio.fsync_dir(root)


def delete_checkpoints(root: Path, records: Iterable[CheckpointRecord]) -> None:
    """Delete checkpoints the manifest no longer lists: only their listed files, then the directory."""
    for r in records:
        _fsio.remove_tree_of_own_files(root / r.directory, [f.name for f in r.files])


def sweep(root: Path, listed: set[str] | None) -> None:
    """Remove what crashed writers left: temporaries, and checkpoint directories not ``listed``.

    ``listed`` is None when there is no manifest: then no checkpoint directory is touched, since
    nothing says whether a ``step_*`` directory there was ever committed (a store being copied,
    a manifest deleted by hand). Inside an unlisted directory only the store's own file names
    are deleted, so a file someone else put there keeps its directory.
    """
    for entry in os.scandir(root):
        path = Path(entry.path)
        if entry.name.startswith(_fsio.TEMP_PREFIX):
            logger.info("%s: removing %s, left by a save that did not finish", root, entry.name)
            _fsio.remove_temp_tree(path)
        elif (
            listed is not None
            and CHECKPOINT_DIR.fullmatch(entry.name)
            and entry.name not in listed
            and entry.is_dir(follow_symlinks=False)
        ):
            logger.info("%s: removing %s, which the manifest does not list", root, entry.name)
            _fsio.remove_tree_of_own_files(path, CHECKPOINT_FILES)
