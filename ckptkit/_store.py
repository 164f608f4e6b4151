"""CheckpointStore: atomic, verified checkpoints with retention, on any storage.

The commit protocol of a save (the medium's side of each stage is in the storage backend,
``_storage_local.py`` for a directory):

1. Start a change (``_store_write.py``): on a local disk, take the store's file lock; read the
   committed manifest.
2. Write the checkpoint's files under a name no manifest lists, hashing every byte as it is
   written, and make them durable (locally: a temporary directory, fsynced, renamed to
   ``step_<12 digits>``).
3. Commit: replace the manifest with one that lists the new checkpoint, atomically and only if
   it is still the manifest read in 1 (else read the new one and decide again). This is the
   commit point: the manifest is the single source of truth.
4. Only then delete what retention dropped.

A crash before 3 leaves the old manifest, which never lists the new files; a crash after 3
leaves the new manifest, whose checkpoints are all complete. What a crash leaves behind is
swept by the next change to the store (a save, pin, unpin or prune); opening or reading a store
changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ckptkit import _async, _progress
from ckptkit._async import PendingSave
from ckptkit._errors import (
    CheckpointNotFoundError,
    ReadOnlyStoreError,
)
from ckptkit._manifest import MANIFEST_NAME, detached
from ckptkit._modes import Mode, resolve_mode
from ckptkit._record import CheckpointRecord, TensorInfo
from ckptkit._retention import RetentionPlan, RetentionPolicy
from ckptkit._snapshot import SnapshotBuffers
from ckptkit._storage import Storage
from ckptkit._storage_local import LOCK_NAME, LocalStorage
from ckptkit._storage_open import open_storage
from ckptkit._store_read import Checkpoint, CheckpointReader, FallbackWarning, StepSelector
from ckptkit._store_save import (
    BackgroundDeletions,
    ExtraFiles,
    SaveJob,
    commit_save,
    delete_checkpoints,
    prepare_save,
)
from ckptkit._store_write import ManifestWriter
from ckptkit._switching import fast_switching
from ckptkit._validate import check_step

__all__ = ["LOCK_NAME", "Checkpoint", "CheckpointStore", "FallbackWarning", "StepSelector"]


logger = logging.getLogger("ckptkit")


class CheckpointStore:
    """A directory of committed checkpoints, listed by ``root/manifest.json``.

    Every ``save`` is atomic and durable; ``load`` verifies sizes and checksums; retention keeps
    the newest ``keep_last``, the ``keep_best`` best by ``monitor``, every ``keep_every``-th step,
    pinned checkpoints and the newest one. With no retention option set, everything is kept.

    Opening a store creates its root if missing and nothing else; reading never changes it.
    The first change (save, pin, unpin, prune) sweeps what crashed writers left. With
    ``read_only=True`` nothing is ever created or changed: for inspecting a store another
    process writes, one on read-only media, or one you must not touch.

    Args:
        root: the store's directory, created if missing (unless ``read_only``), or the URL of
            an object store: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name``
            (in this process only), ``file:///path``.
        storage_options: for an ``s3://`` root, how to reach it, as s3fs/fsspec take them:
            ``key``, ``secret``, ``token``, ``client_kwargs={"endpoint_url": ...,
            "region_name": ...}``; for ``gs://``, as gcsfs takes them: ``project``, ``token``,
            ``endpoint_url``. What is absent is read from the environment as the cloud's own
            client reads it (``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...).
        keep_last: how many of the newest checkpoints to keep.
        keep_best: how many of the best checkpoints by ``monitor`` to keep.
        monitor: the metric that ranks checkpoints for ``keep_best`` and ``best()``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` to infer it from the monitor's name.
        keep_every: keep every step divisible by this.
        lock_timeout: seconds to wait for another process's lock before raising.
        progress: show a progress bar (``tqdm``, the ``progress`` extra) on stderr while
            saving or loading a state of 64 MiB or more.
        read_only: open for reading only: the root must exist; ``save``, ``save_async``,
            ``pin``, ``unpin`` and ``prune`` (but for ``dry_run=True``) raise
            :class:`ReadOnlyStoreError`; no lock file is made and nothing is swept.

    Raises:
        NotADirectoryError: ``root`` is a file.
        CheckpointNotFoundError: ``read_only`` and ``root`` does not exist.

    Example:
        >>> store = CheckpointStore(tmp, keep_last=2, keep_best=1, monitor="val_loss")
        >>> store.save(0, {"w": np.zeros(3)}, metrics={"val_loss": 0.5}).step
        0
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max", "auto"] = "auto",
        keep_every: int | None = None,
        lock_timeout: float = 60.0,
        progress: bool = False,
        read_only: bool = False,
    ) -> None:
        resolved: Mode = (
            "min" if monitor is None and mode == "auto" else resolve_mode(mode, monitor)
        )
        self.retention = RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=resolved,
            keep_every=keep_every,
        )
        if (
            isinstance(lock_timeout, bool)
            or not isinstance(lock_timeout, (int, float))
            or not lock_timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {lock_timeout!r}")
        if progress:
            _progress.require_tqdm()
        self._storage: Storage = open_storage(root, storage_options)
        #: The store's directory (a ``Path``), or the URL of an object store.
        self.root: Path | str = (
            self._storage.root
            if isinstance(self._storage, LocalStorage)
            else self._storage.location
        )
        self.read_only = bool(read_only)
        if not self.read_only:
            self._storage.create()
        elif not self._storage.exists():
            raise CheckpointNotFoundError(
                f"{self._storage.location}: no such directory (or bucket), so no store to read; "
                "a read-only store is never created: check the path"
            )
        self.lock_timeout = float(lock_timeout)
        self.progress = bool(progress)
        self._reader = CheckpointReader(self._storage, self.retention, progress=self.progress)
        self._writer = ManifestWriter(self._reader, lock_timeout=self.lock_timeout)
        # A count per step, so protections from different reasons nest.
        self._protected: Counter[int] = Counter()
        self._buffers = SnapshotBuffers()
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._deletions = BackgroundDeletions(self._writer)
        # Read, not changed: a damaged manifest, or one of a newer format, is refused at
        # once rather than at the first save or load.
        self.records()

    def __repr__(self) -> str:
        read_only = ", read_only=True" if self.read_only else ""
        return f"CheckpointStore({str(self.root)!r}, {self.retention}{read_only})"

    @property
    def monitor(self) -> str | None:
        """The metric that ranks checkpoints (for ``keep_best`` and :meth:`best`), if any."""
        return self.retention.monitor

    @property
    def mode(self) -> Mode:
        """Whether a lower (``"min"``) or higher (``"max"``) ``monitor`` value is better."""
        return self.retention.mode

    @property
    def manifest_path(self) -> Path | str:
        """The manifest: the list of committed checkpoints, and the store's commit point."""
        if isinstance(self.root, Path):
            return self.root / MANIFEST_NAME
        return self._storage.describe(MANIFEST_NAME)

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, sorted by step (read fresh from the manifest)."""
        return self._reader.records()

    def __contains__(self, step: object) -> bool:
        return step in self._reader

    def __len__(self) -> int:
        return len(self._reader)

    def latest(self) -> CheckpointRecord | None:
        """The checkpoint with the highest step, or None in an empty store."""
        return self._reader.latest()

    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by ``monitor`` (ties: the earliest step), or None if none ranks.

        Raises:
            ValueError: the store was made without a ``monitor``.
        """
        return self._reader.best()

    def record(self, step: StepSelector = None) -> CheckpointRecord:
        """The record of ``step`` (None or "latest": the newest; "best": the best)."""
        return self._reader.record(step)

    def load(
        self,
        step: StepSelector = None,
        *,
        verify: bool = True,
        fallback: bool = False,
        mmap: bool = False,
    ) -> Any:
        """Load a checkpoint's state tree; see :meth:`load_checkpoint`."""
        return self._reader.load_checkpoint(step, verify=verify, fallback=fallback, mmap=mmap).state

    def load_checkpoint(
        self,
        step: StepSelector = None,
        *,
        verify: bool = True,
        fallback: bool = False,
        mmap: bool = False,
    ) -> Checkpoint:
        """Load a checkpoint: its record and its state tree, exactly as saved.

        Safe while other processes save, prune or delete: a checkpoint deleted or replaced
        while it is read is read again from the new manifest (for an int step that is gone,
        ``CheckpointNotFoundError``).

        Args:
            step: an int step, None or "latest" for the newest, "best" for the best by monitor.
            verify: check every file's checksum against the manifest (sizes are always checked).
            fallback: if the chosen checkpoint is corrupt, warn (``FallbackWarning``) and try
                the next older one (for "best": the next best), until one verifies.
            mmap: return the arrays as read-only views of a memory map of the arrays file
                instead of a private copy (the page cache holds the only copy).

        Raises:
            CheckpointNotFoundError: no such step (the message lists the steps there are).
            CorruptCheckpointError: a file does not match the manifest (and no fallback).
        """
        return self._reader.load_checkpoint(step, verify=verify, fallback=fallback, mmap=mmap)

    def read_arrays(
        self, step: StepSelector = None, keys: Iterable[str] | None = None, *, verify: bool = False
    ) -> dict[str, np.ndarray]:
        """Read only some tensors of a checkpoint, without reading the rest of its file.

        Tensor names are the state's key paths joined with ``.`` (``"model.layer.weight"``);
        :meth:`tensor_info` lists them. The header is checked as strictly as by :meth:`load`,
        and each tensor costs one positioned read of its own bytes. Checksums cover whole
        files, so ``verify=True`` hashes the whole file first (streamed, not held in memory).

        Raises:
            TensorNotFoundError: a key is not a tensor of the checkpoint.
            CheckpointNotFoundError, CorruptCheckpointError: as for :meth:`load`.

        Example:
            >>> store.read_arrays("latest", ["model.head.weight"])["model.head.weight"].shape
            (10, 512)
        """
        return self._reader.read_arrays(step, keys, verify=verify)

    def tensor_info(self, step: StepSelector = None) -> dict[str, TensorInfo]:
        """Name, dtype, shape and size of every tensor of a checkpoint, from its header alone."""
        return self._reader.tensor_info(step)

    def verify(self, step: StepSelector = None) -> CheckpointRecord:
        """Check a checkpoint's files against the sizes and checksums in the manifest.

        Raises:
            CorruptCheckpointError: naming the first file that is missing or differs.
        """
        return self._reader.verify(step)

    # -- writing ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> CheckpointRecord:
        """Commit a checkpoint of ``state`` at ``step``, then apply retention.

        If this raises before the commit point (the manifest's replacement), the store is
        exactly as it was; if it raises after it (a failed directory fsync or deletion), the new
        checkpoint is committed and whole. Either way no listed checkpoint is partial. On an
        object store, a commit that another writer beat is decided again on the new manifest.

        Raises:
            UnsupportedStateError: a leaf of ``state`` cannot be saved (the message has its key path).
            CheckpointExistsError: ``step`` is committed and ``overwrite`` is False (also when
                another writer committed it first), or is being saved by ``save_async`` (raised
                at once, without waiting for that save).
            LockTimeoutError: another process held the lock longer than ``lock_timeout``.
            StoreWriteError: the disk or the object store failed (e.g. ENOSPC, a read-only file
                system, access denied); the message says whether the step was committed. If
                not, the store is unchanged.
        """
        self._refuse_if_read_only(f"save step {step}")
        location = self._storage.location
        _async.refuse_in_flight(location, self._pending, check_step(step), overwrite=overwrite)
        self.wait()
        return self._commit(self._prepare(step, state, metrics, metadata, overwrite=overwrite))

    def save_async(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> PendingSave:
        """Copy ``state`` into reused host buffers and commit it in a background thread.

        Returns as soon as the copy is made, so the state may change right after the call.
        The buffer is kept for the next save of the same tensor names, shapes and dtypes. At most
        one save is in flight: this first waits for the previous one. The commit is the same as
        :meth:`save`'s. The :class:`PendingSave` returned is a ``concurrent.futures.Future``
        of the committed record: the save's error is raised by its ``result()`` (or returned
        by ``exception()``) or, if nobody asked, by the next ``save``, ``save_async``,
        ``wait``, ``close``, ``prune``, ``pin`` or ``unpin``. A save still in flight at
        interpreter exit is finished first.

        Unless ``overwrite`` is True, the step of the save in flight is refused at once,
        without waiting for that save, and a committed step is refused before anything is
        copied (checked once the previous save, whose retention may delete it, is done). With
        ``overwrite=True``, a save in flight of the same step is waited for, then replaced.

        Raises:
            CheckpointExistsError: ``step`` is committed or in flight and ``overwrite`` is
                False (a commit by another writer meanwhile is refused by the commit itself).
            Exception: the previous background save's error; the same errors as :meth:`save`
                for a state that cannot be saved (raised here, before any copy is made).

        Example:
            >>> pending = store.save_async(step, {"w": weights})
            >>> weights += 1  # the checkpoint holds the values from before this line
            >>> pending.add_done_callback(lambda p: log.info("finished: %r", p))
            >>> pending.result().step == step
            True
        """
        self._refuse_if_read_only(f"save step {step}")
        step, location = check_step(step), self._storage.location
        _async.refuse_in_flight(location, self._pending, step, overwrite=overwrite)
        self.wait()
        if not overwrite:
            # Read through the manifest's cache: only steps are looked at, nothing handed out,
            # and the caller is blocked meanwhile (a full parse of 1,000 records took 40 ms).
            reader = self._reader
            listed = reader.parse_manifest(reader.read_manifest(), cached=True)
            _async.refuse_committed(location, listed, step)
        job = self._prepare(step, state, metrics, metadata, overwrite=overwrite)
        job.arrays = self._buffers.snapshot(job.arrays)
        pending = PendingSave(job.step)
        self._pending = pending
        self._thread = _async.start(pending, lambda: self._commit(job))
        return pending

    def wait(self) -> CheckpointRecord | None:
        """Wait for the background save in flight, if any; raise its error if it failed.

        Also waits for the deletion of the checkpoints retention dropped at the last save,
        which runs after the save returns. Returns the record the background save committed,
        or None when no save was in flight.
        """
        pending, thread = self._pending, self._thread
        if pending is None:
            self._deletions.join()
            return None
        if thread is not None:
            thread.join()
        self._deletions.join()
        self._pending = self._thread = None
        if pending._error is not None and pending._reported:
            return None
        return pending.result()

    def close(self) -> None:
        """Finish the save in flight (raising its error) and release the reused buffers."""
        try:
            self.wait()
        finally:
            self._buffers.clear()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        *,
        overwrite: bool,
    ) -> SaveJob:
        return prepare_save(
            step, state, metrics, metadata, overwrite=overwrite, protected=self._protected
        )

    def _commit(self, job: SaveJob) -> CheckpointRecord:
        with fast_switching():
            return commit_save(
                self._writer, self.retention, job, progress=self.progress, deletions=self._deletions
            )

    def _save_with_files(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        extra: ExtraFiles,
        *,
        overwrite: bool = False,
    ) -> CheckpointRecord:
        """:meth:`save`, with ``extra`` writing more files into the checkpoint before its commit.

        For a sharded save: ``extra`` gets the checkpoint's writer while the store's lock is
        held, has every rank write its shards, and returns their entries for the manifest.
        """
        self._refuse_if_read_only(f"save step {step}")
        self.wait()
        job = self._prepare(step, state, metrics, metadata, overwrite=overwrite)
        return commit_save(self._writer, self.retention, job, progress=False, extra=extra)

    # -- pins, protection, pruning ----------------------------------------------------------

    def pin(self, step: int) -> CheckpointRecord:
        """Mark a checkpoint as never to be deleted by retention (persisted in the manifest)."""
        return self._set_pinned(step, True)

    def unpin(self, step: int) -> CheckpointRecord:
        """Undo :meth:`pin`; retention may delete the checkpoint at the next save or prune."""
        return self._set_pinned(step, False)

    def _set_pinned(self, step: int, pinned: bool) -> CheckpointRecord:
        self._refuse_if_read_only(f"{'pin' if pinned else 'unpin'} step {step}")
        self.wait()
        step = check_step(step)

        def decide(
            records: list[CheckpointRecord],
        ) -> tuple[list[CheckpointRecord], CheckpointRecord]:
            target = self._reader.select(records, step)
            updated = replace(target, pinned=pinned)
            return [updated if r.step == target.step else r for r in records], updated

        with self._writer.change(f"{'pinning' if pinned else 'unpinning'} step {step}") as change:
            return detached(change.commit(decide))

    def protect(self, step: int) -> None:
        """Keep ``step`` from retention for the life of this store object (not persisted).

        Used for the checkpoint this process resumed from and the best checkpoint (by the
        monitored value) of its ``Checkpointer``. Calls nest: a step protected twice needs two :meth:`unprotect` calls.
        """
        self._protected[check_step(step)] += 1

    def unprotect(self, step: int) -> None:
        """Undo one :meth:`protect` of ``step``."""
        if self._protected[step] > 1:
            self._protected[step] -= 1
        else:
            self._protected.pop(step, None)

    def prune(self, *, dry_run: bool = False) -> RetentionPlan:
        """Apply retention now (it otherwise runs after each save); return what it decided.

        With ``dry_run`` the plan is made from the manifest as it is, and nothing is changed
        (no lock is taken, nothing is swept), so it works on a ``read_only`` store too.
        """
        if dry_run:
            return self.retention.select(self.records(), protected=self._protected)
        self._refuse_if_read_only("prune")
        self.wait()

        def decide(
            records: list[CheckpointRecord],
        ) -> tuple[list[CheckpointRecord], tuple[RetentionPlan, list[CheckpointRecord]]]:
            plan = self.retention.select(records, protected=self._protected)
            gone = [r for r in records if r.step not in plan.keep]
            return [r for r in records if r.step in plan.keep], (plan, gone)

        with self._writer.change("pruning") as change:
            plan = self.retention.select(change.records, protected=self._protected)
            if not plan.delete:
                return plan
            plan, gone = change.commit(decide)
            if gone:
                logger.info(
                    "%s: prune deletes steps %s", self._storage.location, [r.step for r in gone]
                )
            delete_checkpoints(self._storage, gone)
        return plan

    def _refuse_if_read_only(self, action: str) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(
                f"{self._storage.location}: cannot {action}: the store was opened with read_only=True; open "
                "it as CheckpointStore(root) to change it"
            )
