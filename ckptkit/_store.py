"""CheckpointStore: atomic, verified checkpoints in a directory, with retention.

The commit protocol, in the order ``save`` runs it:

1. Take the store's file lock (exclusive across processes; the kernel drops it if the holder dies).
2. Write the checkpoint's files into a fresh temporary directory ``root/.ckptkit-tmp-<random>``,
   hashing every byte as it is written, and fsync each file and the directory.
3. Rename the directory to its final name ``step_<12 digits>`` and fsync ``root``.
4. Replace ``manifest.json`` atomically (temporary file, fsync, ``os.replace``, fsync ``root``).
   This is the commit point: the checkpoint exists from here on, because the manifest is the
   single source of truth.
5. Only then delete what retention dropped.

A crash before 4 leaves the old manifest, which never lists the new directory; a crash after 4
leaves the new manifest, whose checkpoints are all complete on disk. What a crash leaves behind
(a temporary, an unlisted ``step_*`` directory) is swept when the store is next opened.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import filelock

from ckptkit import _manifest
from ckptkit._commit import commit_manifest, delete_checkpoints, sweep, write_directory
from ckptkit._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LockTimeoutError,
)
from ckptkit._manifest import MANIFEST_NAME
from ckptkit._modes import Mode, resolve_mode
from ckptkit._reader import STATE_FORMAT_VERSION, read_state, verify_files
from ckptkit._record import CheckpointRecord
from ckptkit._retention import RetentionPlan, RetentionPolicy
from ckptkit._tree import decode_json_value, encode_json_value, flatten_state
from ckptkit._validate import check_metrics, check_step

LOCK_NAME = ".ckptkit.lock"


StepSelector = int | Literal["latest", "best"] | None


class FallbackWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older one that verifies."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A loaded checkpoint: its record and its state tree."""

    record: CheckpointRecord
    state: Any


class CheckpointStore:
    """A directory of committed checkpoints, listed by ``root/manifest.json``.

    Every ``save`` is atomic and durable; ``load`` verifies sizes and checksums; retention keeps
    the newest ``keep_last``, the ``keep_best`` best by ``monitor``, every ``keep_every``-th step,
    pinned checkpoints and the newest one. With no retention option set, everything is kept.

    Args:
        root: the store's directory, created if missing.
        keep_last: how many of the newest checkpoints to keep.
        keep_best: how many of the best checkpoints by ``monitor`` to keep.
        monitor: the metric that ranks checkpoints for ``keep_best`` and ``best()``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` to infer it from the monitor's name.
        keep_every: keep every step divisible by this.
        lock_timeout: seconds to wait for another process's lock before raising.

    Example:
        >>> store = CheckpointStore(tmp, keep_last=2, keep_best=1, monitor="val_loss")
        >>> store.save(0, {"w": np.zeros(3)}, metrics={"val_loss": 0.5}).step
        0
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max", "auto"] = "auto",
        keep_every: int | None = None,
        lock_timeout: float = 60.0,
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
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: a store's root must be a directory, not a file")
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = float(lock_timeout)
        self._lock = filelock.FileLock(self.root / LOCK_NAME, timeout=self.lock_timeout)
        # A count per step, so protections from different reasons nest.
        self._protected: Counter[int] = Counter()
        self._sweep()

    @property
    def monitor(self) -> str | None:
        return self.retention.monitor

    @property
    def mode(self) -> Mode:
        return self.retention.mode

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r}, {self.retention})"

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, sorted by step (read fresh from the manifest)."""
        path = self.manifest_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return _manifest.loads(data, path=str(path))

    def __contains__(self, step: object) -> bool:
        return any(r.step == step for r in self.records())

    def __len__(self) -> int:
        return len(self.records())

    def latest(self) -> CheckpointRecord | None:
        """The checkpoint with the highest step, or None in an empty store."""
        records = self.records()
        return records[-1] if records else None

    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by ``monitor`` (ties: the earliest step), or None if none ranks.

        Raises:
            ValueError: the store was made without a ``monitor``.
        """
        return self._best(self.records())

    def _best(self, records: list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.monitor is None:
            raise ValueError(
                f"{self.root}: this store has no monitor, so it has no best checkpoint; "
                "open it with CheckpointStore(root, monitor=..., mode=...)"
            )
        ranked = self.retention.best(records)
        return ranked[0] if ranked else None

    def record(self, step: StepSelector = None) -> CheckpointRecord:
        """The record of ``step`` (None or "latest": the newest; "best": the best)."""
        return self._select(self.records(), step)

    def load(
        self, step: StepSelector = None, *, verify: bool = True, fallback: bool = False
    ) -> Any:
        """Load a checkpoint's state tree; see :meth:`load_checkpoint`."""
        return self.load_checkpoint(step, verify=verify, fallback=fallback).state

    def load_checkpoint(
        self, step: StepSelector = None, *, verify: bool = True, fallback: bool = False
    ) -> Checkpoint:
        """Load a checkpoint: its record and its state tree, exactly as saved.

        Args:
            step: an int step, None or "latest" for the newest, "best" for the best by monitor.
            verify: check every file's checksum against the manifest (sizes are always checked).
            fallback: if the chosen checkpoint is corrupt, warn (``FallbackWarning``) and try
                the next older one (for "best": the next best), until one verifies.

        Raises:
            CheckpointNotFoundError: no such step (the message lists the steps there are).
            CorruptCheckpointError: a file does not match the manifest (and no fallback).
        """
        records = self.records()
        chosen = self._select(records, step)
        if not fallback:
            return Checkpoint(record=chosen, state=self._read(chosen, verify=verify))
        if step == "best":
            candidates = self.retention.best(records)
        else:
            candidates = [r for r in reversed(records) if r.step <= chosen.step]
        errors = []
        for i, record in enumerate(candidates):
            try:
                return Checkpoint(record=record, state=self._read(record, verify=True))
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                errors.append(str(e))
                nxt = f"trying step {candidates[i + 1].step}" if i + 1 < len(candidates) else ""
                warnings.warn(
                    FallbackWarning(f"skipping corrupt step {record.step}: {e}; {nxt}"),
                    stacklevel=2,
                )
        raise CorruptCheckpointError(
            f"{self.root}: no checkpoint verifies among steps {[r.step for r in candidates]}: "
            + "; ".join(errors)
        )

    def verify(self, step: StepSelector = None) -> CheckpointRecord:
        """Check a checkpoint's files against the sizes and checksums in the manifest.

        Raises:
            CorruptCheckpointError: naming the first file that is missing or differs.
        """
        record = self._select(self.records(), step)
        verify_files(self.root, record)
        return record

    def _read(self, record: CheckpointRecord, *, verify: bool) -> Any:
        try:
            return read_state(self.root, record, verify=verify)
        except FileNotFoundError as e:
            if record.directory not in {r.directory for r in self.records()}:
                raise CheckpointNotFoundError(
                    f"{self.root}: step {record.step} was deleted or overwritten by another "
                    "process while it was being loaded; load again"
                ) from None
            raise CorruptCheckpointError(
                f"{e.filename}: a file of step {record.step} listed in the manifest is missing; "
                "load another step, or pass fallback=True to load the newest one that verifies"
            ) from None

    def _select(self, records: list[CheckpointRecord], step: StepSelector) -> CheckpointRecord:
        if not records:
            raise CheckpointNotFoundError(f"{self.root}: the store has no checkpoints yet")
        if step is None or step == "latest":
            return records[-1]
        if step == "best":
            best = self._best(records)
            if best is None:
                raise CheckpointNotFoundError(
                    f"{self.root}: no checkpoint has a finite {self.monitor!r} metric, so none is best"
                )
            return best
        if isinstance(step, str):
            raise ValueError(f"step must be an int, None, 'latest' or 'best', got {step!r}")
        step = check_step(step)
        for r in records:
            if r.step == step:
                return r
        steps = [r.step for r in records]
        shown = (
            ", ".join(map(str, steps))
            if len(steps) <= 12
            else (", ".join(map(str, steps[:5])) + ", ..., " + ", ".join(map(str, steps[-5:])))
        )
        raise CheckpointNotFoundError(
            f"{self.root}: no checkpoint for step {step}; the store has steps [{shown}]"
        )

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

        If this raises before the commit point (the manifest's ``os.replace``), the store is
        exactly as it was; if it raises after it (a failed directory fsync or deletion), the new
        checkpoint is committed and whole. Either way no listed checkpoint is partial.

        Raises:
            UnsupportedStateError: a leaf of ``state`` cannot be saved (the message has its key path).
            CheckpointExistsError: ``step`` is committed and ``overwrite`` is False.
            LockTimeoutError: another process held the lock longer than ``lock_timeout``.
            OSError: the disk failed (e.g. ENOSPC); the previous checkpoints are intact.
        """
        step = check_step(step)
        metric_values = check_metrics(metrics, step=step)
        meta = self._check_metadata(metadata, step)
        skeleton, arrays = flatten_state(state)
        doc = {"format_version": STATE_FORMAT_VERSION, "tree": skeleton}
        state_bytes = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("ascii")
        with self._locked():
            records = self.records()
            old = next((r for r in records if r.step == step), None)
            if old is not None and not overwrite:
                raise CheckpointExistsError(
                    f"{self.root}: step {step} is already committed ({old.directory}); pass "
                    "overwrite=True to replace it atomically, or save under another step"
                )
            directory, files = write_directory(self.root, step, arrays, state_bytes)
            record = CheckpointRecord(
                step=step,
                metrics=metric_values,
                metadata=meta,
                created=time.time(),
                directory=directory,
                files=files,
                pinned=old.pinned if old is not None else False,
            )
            candidates = [r for r in records if r.step != step] + [record]
            # The step just written is kept even when it is not the newest (a re-run of an
            # earlier step): a save never returns a record of a checkpoint it already deleted.
            protected = {*self._protected, step}
            plan = self.retention.select(candidates, protected=protected)
            kept = [r for r in candidates if r.step in plan.keep]
            commit_manifest(self.root, kept, new_directory=directory)
            dropped = [r for r in candidates if r.step not in plan.keep]
            delete_checkpoints(self.root, dropped + ([old] if old is not None else []))
        return record

    def _check_metadata(self, metadata: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping):
            raise TypeError(
                f"metadata of step {step} must be a mapping, got {type(metadata).__name__}"
            )
        what = f"metadata of step {step}"
        decoded = decode_json_value(encode_json_value(dict(metadata), what=what), what=what)
        assert isinstance(decoded, dict)
        return decoded

    # -- pins, protection, pruning ----------------------------------------------------------

    def pin(self, step: int) -> CheckpointRecord:
        """Mark a checkpoint as never to be deleted by retention (persisted in the manifest)."""
        return self._set_pinned(step, True)

    def unpin(self, step: int) -> CheckpointRecord:
        """Undo :meth:`pin`; retention may delete the checkpoint at the next save or prune."""
        return self._set_pinned(step, False)

    def _set_pinned(self, step: int, pinned: bool) -> CheckpointRecord:
        with self._locked():
            records = self.records()
            target = self._select(records, check_step(step))
            updated = replace(target, pinned=pinned)
            commit_manifest(self.root, [updated if r.step == target.step else r for r in records])
        return updated

    def protect(self, step: int) -> None:
        """Keep ``step`` from retention for the life of this store object (not persisted).

        Used for the checkpoint this process resumed from and the one its stopping policy
        holds as best. Calls nest: a step protected twice needs two :meth:`unprotect` calls.
        """
        self._protected[check_step(step)] += 1

    def unprotect(self, step: int) -> None:
        """Undo one :meth:`protect` of ``step``."""
        if self._protected[step] > 1:
            self._protected[step] -= 1
        else:
            self._protected.pop(step, None)

    def prune(self, *, dry_run: bool = False) -> RetentionPlan:
        """Apply retention now (it otherwise runs after each save); return what it decided."""
        with self._locked():
            records = self.records()
            plan = self.retention.select(records, protected=self._protected)
            if not dry_run and plan.delete:
                commit_manifest(self.root, [r for r in records if r.step in plan.keep])
                delete_checkpoints(self.root, [r for r in records if r.step not in plan.keep])
        return plan

    # -- locking and crash recovery ---------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise LockTimeoutError(
                f"{self.root}: another process held the store's lock ({self._lock.lock_file}) "
                f"for more than lock_timeout={self.lock_timeout} s; raise lock_timeout, or find "
                "what else is writing to this store"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _sweep(self) -> None:
        """Remove what crashed writers left, if the lock is free right now.

        Under the lock no live writer is between its first write and its commit, so what the
        sweep finds is a crash's. If another process holds the lock, opening does not wait for
        it: its leftovers (if any) are swept by a later open.
        """
        if not os.access(self.root, os.W_OK):
            return  # a read-only store: nothing can have been left by a writer here
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return
        try:
            listed = None
            if self.manifest_path.exists():
                listed = {r.directory for r in self.records()}
            sweep(self.root, listed)
        finally:
            self._lock.release()
