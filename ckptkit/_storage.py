"""Where a store's bytes live: the interface every storage backend implements.

``CheckpointStore`` decides *what* to write and when (the commit protocol, retention, the
manifest's contents); a :class:`Storage` decides *how* bytes reach a medium and come back. The
store never calls ``os`` or a cloud client itself, and a storage never parses a manifest or a
tree. Backends: ``LocalStorage`` (a POSIX directory, ``_storage_local.py``) and the object
stores (``_storage_s3.py``).

The contract every backend keeps, which the store's guarantees rest on:

- **Files are never changed in place.** A checkpoint's files are written under a name no
  committed manifest lists, made durable, and only then may a manifest list them. A listed
  checkpoint is deleted only after a manifest that no longer lists it is committed.
- **The manifest is replaced atomically.** :meth:`Storage.commit_manifest` is the commit point:
  a reader sees the old manifest or the new one, never a mix, and a crash at any instant leaves
  one of the two. It is *conditional*: it commits only if the manifest is still the one the
  writer read (:class:`ManifestVersion`); otherwise it raises :class:`ManifestConflict` and
  changes nothing, and the writer reads the new manifest, plans again and retries. A backend
  whose writers are serialised by :meth:`Storage.lock` (the local store's file lock) may commit
  unconditionally, since nobody else can commit between the read and the commit.
- **Reads treat bytes as untrusted.** Sizes are checked before memory is allocated; checksums
  are computed while reading; a file that is not a plain file (a link, a FIFO) is refused.

Errors a backend raises, which the store turns into its own exceptions with context:
``FileNotFoundError`` (a file or checkpoint is missing), :class:`UnsafeFileError` (a link or a
special file), ``ValueError`` (a size or checksum differs from the manifest; the message says
which), ``OSError`` with an ``errno`` for a failed write (``StoreWriteError`` keeps it), and
:class:`ManifestConflict`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

#: Called with the number of bytes just written or read (a progress bar's update).
Progress = Callable[[int], Any]


class UnsafeFileError(ValueError):
    """A path inside the store is a symlink or not a regular file, so it is not read."""


class ManifestConflict(Exception):
    """Another writer committed a manifest after this writer read it; nothing was committed."""


@dataclass(frozen=True)
class ManifestVersion:
    """A manifest as read, and what a conditional commit compares against.

    Attributes:
        data: the manifest's bytes, or None when the store has no manifest yet.
        token: the backend's proof of which manifest this was (an object store's ETag or
            generation); None for a backend whose lock serialises writers.
    """

    data: bytes | None
    token: object = None


class Sink(Protocol):
    """One file being written: bytes go in order; durable only after :meth:`commit`."""

    def write(self, data: memoryview, /) -> None:
        """Write all of ``data`` (a flat byte view) after what was written before."""

    def commit(self) -> None:
        """Make the file durable and close it; after this it is whole on the medium."""

    def abort(self) -> None:
        """Close after a failure without committing; the writer of the checkpoint cleans up."""


class CheckpointWriter(abc.ABC):
    """The files of one checkpoint being written, under a name no manifest lists yet.

    Attributes:
        name: what :meth:`Storage.join_checkpoint` takes to write more files into this
            checkpoint from another process (the ranks of a sharded save).
    """

    name: str

    @abc.abstractmethod
    def create(self, name: str) -> Sink:
        """Start a new file of the checkpoint (its name inside the checkpoint, e.g. ``state.json``)."""

    @abc.abstractmethod
    def finish(self) -> str:
        """Make the checkpoint durable under its final name and return that name.

        The name is what the manifest's ``directory`` field holds; it matches
        ``_manifest.CHECKPOINT_DIR`` and no committed checkpoint has it.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far (after a failure, before any manifest lists it)."""


class RangeReader(abc.ABC):
    """One file of a committed checkpoint open for reads at any offset."""

    size: int

    @abc.abstractmethod
    def read_at(self, size: int, offset: int) -> bytearray:
        """Exactly ``size`` bytes at ``offset``; ``ValueError`` if the file ends first."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointFiles(abc.ABC):
    """The files of one committed checkpoint, open for reading.

    Locally this holds the checkpoint directory's descriptor, so a directory renamed or
    replaced by a link after opening cannot redirect the reads.
    """

    @abc.abstractmethod
    def read(
        self, name: str, *, size: int, checksum: str | None, progress: Progress | None = None
    ) -> memoryview:
        """The whole file in a fresh writable buffer, checked against ``size`` and ``checksum``.

        The size is checked before anything is allocated; with a checksum, the bytes are
        hashed as they arrive. Raises ``ValueError`` saying what differs.
        """

    @abc.abstractmethod
    def map(self, name: str, *, size: int, checksum: str | None) -> memoryview:
        """The whole file as a read-only view that need not be a private copy (a memory map)."""

    @abc.abstractmethod
    def open(self, name: str) -> RangeReader:
        """Open the file for reads at offsets (``read_arrays`` reads one tensor at a time)."""

    @abc.abstractmethod
    def checksum(self, name: str, algorithm: str) -> tuple[int, str]:
        """The file's size and ``"<algorithm>:<hex>"`` checksum, streamed (not held in memory)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(abc.ABC):
    """A store's medium: its manifest, its checkpoints' files, its lock and its leftovers.

    Attributes:
        location: how messages name the store's root (a path, or an ``s3://`` URL).
    """

    location: str

    def describe(self, *parts: str) -> str:
        """How messages name a path inside the store, e.g. ``describe("step_…", "state.json")``."""
        return "/".join([self.location.rstrip("/"), *parts])

    # -- the store as a whole ------------------------------------------------------------------

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the store can be opened for reading (a directory; an object store's bucket)."""

    @abc.abstractmethod
    def create(self) -> None:
        """Create the root if it is missing (nothing for object stores). Idempotent."""

    @abc.abstractmethod
    def lock(self, timeout: float) -> AbstractContextManager[None]:
        """Exclusive across processes for the whole of a change, where the medium allows it.

        Raises ``TimeoutError`` after ``timeout`` seconds. A backend that cannot lock returns a
        context that does nothing: its conditional :meth:`commit_manifest` keeps writers from
        overwriting each other instead.
        """

    def lock_description(self) -> str:
        """What a lock-timeout message says was held (the lock file's path)."""
        return "the store's lock"

    # -- the manifest --------------------------------------------------------------------------

    @abc.abstractmethod
    def read_manifest(self, cap: int) -> ManifestVersion:
        """The committed manifest (``data=None`` if there is none).

        Raises:
            UnsafeFileError: it is a link or not a plain file.
            ValueError: it is larger than ``cap`` bytes.
        """

    @abc.abstractmethod
    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        """Replace the manifest with ``data`` if it is still ``expected``: the commit point.

        On a failure known to leave the old manifest in place (but :class:`ManifestConflict`),
        ``new_checkpoint`` (the checkpoint this commit would have listed) is deleted. When the
        outcome cannot be known (an object store's answer lost, and the manifest read back
        does not show the commit), it is left for the sweep: deleting files a commit that still
        lands would list is worse than leaking them. Past the commit point nothing is rolled
        back: a later failure (a directory fsync) propagates, and the new manifest stands.

        Raises:
            ManifestConflict: another writer committed since ``expected`` was read.
        """

    # -- checkpoints -------------------------------------------------------------------------

    @abc.abstractmethod
    def new_checkpoint(self, step: int) -> CheckpointWriter:
        """Start writing the files of a checkpoint of ``step`` under a fresh name."""

    @abc.abstractmethod
    def join_checkpoint(self, name: str) -> CheckpointWriter:
        """Write more files into a checkpoint another process is writing (``writer.name``).

        The joined writer's :meth:`~CheckpointWriter.create` adds files; its ``finish`` only
        checks that every file it created is committed (durable), and its ``abort`` removes
        only those files. The process that started the checkpoint finishes it, after every
        joined writer has finished.

        Raises:
            ValueError: ``name`` is not one :meth:`new_checkpoint` makes.
        """

    @abc.abstractmethod
    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        """Open a committed checkpoint for reading.

        Raises:
            FileNotFoundError: it does not exist.
            UnsafeFileError: it is a link or not a directory.
        """

    @abc.abstractmethod
    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        """Delete the named files of a checkpoint no manifest lists any longer, then the checkpoint.

        Only the names given are deleted, so a file someone else put there survives; a
        checkpoint that is a link is removed as a link, nothing in its target is touched.
        """

    @abc.abstractmethod
    def sweep(self, listed: set[str] | None) -> None:
        """Remove what crashed writers left: temporaries, and checkpoints not ``listed``.

        ``listed`` is None when there is no manifest: then no checkpoint is touched, since
        nothing says whether it was ever committed. Called under :meth:`lock`, by the first
        change a store object makes; a backend without a lock removes only leftovers old enough
        that no live writer can still be writing them.
        """
