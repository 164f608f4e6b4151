"""Durable file primitives of the local store: creating, fsyncing and deleting files safely.

Every helper here states the hazard it guards against. ``LocalStorage`` (``_storage_local.py``)
composes them in the order of the commit protocol. The checksum functions are shared by every
storage backend.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import xxhash

#: Prefix of every temporary name the store creates inside its root. Opening a store sweeps
#: names with this prefix (and only those) that a crashed writer left behind.
TEMP_PREFIX = ".ckptkit-tmp-"

#: The algorithm of the checksums the store writes. Checksums are ``"<algorithm>:<hex digest>"``
#: and are verified with the algorithm they name, so files written with an older algorithm still
#: verify. They guard against accidental damage (bit rot, truncation, torn copies), not against
#: someone who edits a file and its manifest entry: hostile bytes meet the strict parsers.
CHECKSUM_ALGORITHM = "xxh3_128"

# os.write may write fewer bytes than asked (signals, pipes, some file systems), and a single
# call is capped near 2 GiB on Linux: always loop.
MAX_WRITE = 1 << 30
#: Bytes per read or write call: small enough for a progress bar to move, large enough to cost
#: nothing (16 calls per GiB).
CHUNK = 64 << 20
_HASHED_CHUNK = 4 << 20


class Hasher(Protocol):
    """What the store needs of a hash object: hashlib's and xxhash's both fit."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hash object for a checksum algorithm the manifest can name.

    Raises:
        ValueError: ``algorithm`` is not ``"sha256"`` or ``"xxh3_128"``.
    """
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(
        f"checksum algorithm {algorithm!r} is not one ckptkit knows (sha256, xxh3_128)"
    )


def temp_name(suffix: str = "") -> str:
    """A fresh temporary name: the prefix, 16 random hex digits and an optional suffix."""
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one :func:`temp_name` makes without a suffix."""
    hexdigits = name[len(TEMP_PREFIX) :]
    return (
        name.startswith(TEMP_PREFIX)
        and len(hexdigits) == 16
        and all(c in "0123456789abcdef" for c in hexdigits)
    )


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, deletions) durable.

    A rename is only durable once its parent directory is fsynced: without this, a power cut
    after ``os.replace`` can bring back the old name.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def remove_quietly(path: Path) -> None:
    """Remove a file if it exists; failures are ignored (used on error paths only)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def remove_tree_of_own_files(directory: Path, names: Iterable[str] | Callable[[str], bool]) -> bool:
    """Delete the named files in ``directory``, then the directory if it is then empty.

    ``names`` is a list of names, or a test of a name (those in the directory that pass it
    are deleted). Only the names given are deleted, so a file someone else put there survives (and keeps the
    directory). A ``directory`` that is a symlink is removed as a link: nothing in its target is
    touched. Returns True if the directory is gone.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(directory)):
            os.unlink(directory)
            return True
        raise
    try:
        if callable(names):
            names = [n for n in os.listdir(dir_fd) if names(n)]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def remove_temp_tree(path: Path) -> None:
    """Delete a temporary file or directory the store created (everything in it is the store's)."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            remove_temp_tree(child)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
