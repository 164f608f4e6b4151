"""CheckpointReader: how ``CheckpointStore`` lists, chooses, loads and verifies checkpoints.

Reads take no lock. They stay correct while other processes save, prune and delete, because
files are never changed in place: the manifest is replaced atomically, a checkpoint's files are
written before the manifest lists them and deleted only after it stops listing them. A read that
finds a file missing or different reads the manifest again to tell corruption (an error) from
another process's change (read again, or a clear error for a step that is gone).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from ckptkit import _manifest, _progress
from ckptkit._errors import CheckpointNotFoundError, CorruptCheckpointError, StoreFormatError
from ckptkit._manifest import MANIFEST_NAME
from ckptkit._modes import Mode
from ckptkit._reader import read_index_of, read_layout_of, read_state, read_tensors, verify_files
from ckptkit._record import CheckpointRecord, TensorInfo
from ckptkit._retention import RetentionPolicy
from ckptkit._storage import ManifestVersion, Storage
from ckptkit._validate import check_step

StepSelector = int | Literal["latest", "best"] | None

#: How many times a load re-reads the manifest when other processes replace its checkpoint.
_MAX_ATTEMPTS = 20

_T = TypeVar("_T")

logger = logging.getLogger("ckptkit")


class _ChangedWhileReading(Exception):
    """The checkpoint being read was deleted or replaced by another process meanwhile."""

    def __init__(self, record: CheckpointRecord) -> None:
        super().__init__(record.step)
        self.record = record


class FallbackWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older one that verifies."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A loaded checkpoint: its record and its state tree."""

    record: CheckpointRecord
    state: Any


class CheckpointReader:
    """Listing, choosing, loading and verifying the checkpoints of one store's storage.

    ``CheckpointStore`` holds one and gives it its public reading methods (their documentation
    is there); the writing side reads the manifest through it too.
    """

    def __init__(self, storage: Storage, retention: RetentionPolicy, *, progress: bool) -> None:
        self.storage = storage
        self.retention = retention
        self.progress = progress
        self.location = storage.location

    @property
    def monitor(self) -> str | None:
        return self.retention.monitor

    @property
    def mode(self) -> Mode:
        return self.retention.mode

    # -- the manifest --------------------------------------------------------------------------

    def records(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, sorted by step (read fresh from the manifest)."""
        return self.parse_manifest(self.read_manifest())

    def read_manifest(self) -> ManifestVersion:
        """The manifest as committed now, read as untrusted input."""
        try:
            return self.storage.read_manifest(_manifest.MAX_MANIFEST_BYTES)
        except ValueError as e:  # a link, a special file, or over the cap
            raise StoreFormatError(
                f"{self.storage.describe(MANIFEST_NAME)}: the manifest {e}; restore "
                "manifest.json from a copy"
            ) from None

    def parse_manifest(
        self, version: ManifestVersion, *, cached: bool = False
    ) -> list[CheckpointRecord]:
        """The records of a manifest read; ``cached``: see ``_manifest.loads``."""
        if version.data is None:
            return []
        path = self.storage.describe(MANIFEST_NAME)
        return _manifest.loads(version.data, path=path, cached=cached)

    def __contains__(self, step: object) -> bool:
        return any(r.step == step for r in self.records())

    def __len__(self) -> int:
        return len(self.records())

    def latest(self) -> CheckpointRecord | None:
        """The checkpoint with the highest step, or None in an empty store."""
        records = self.records()
        return records[-1] if records else None

    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by ``monitor`` (ties: the earliest step), or None if none ranks."""
        return self.best_of(self.records())

    def best_of(self, records: list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.monitor is None:
            raise ValueError(
                f"{self.location}: this store has no monitor, so it has no best checkpoint; "
                "open it with CheckpointStore(root, monitor=..., mode=...)"
            )
        ranked = self.retention.best(records)
        return ranked[0] if ranked else None

    def record(self, step: StepSelector = None) -> CheckpointRecord:
        """The record of ``step`` (None or "latest": the newest; "best": the best)."""
        return self.select(self.records(), step)

    def load_checkpoint(
        self,
        step: StepSelector = None,
        *,
        verify: bool = True,
        fallback: bool = False,
        mmap: bool = False,
    ) -> Checkpoint:
        """Load a checkpoint: its record and its state tree, exactly as saved."""
        if not fallback:
            return self._retrying(
                step,
                "loaded",
                lambda r: Checkpoint(record=r, state=self._read(r, verify=verify, mmap=mmap)),
            )
        for _ in range(_MAX_ATTEMPTS):
            records = self.records()
            chosen = self.select(records, step)
            try:
                return self._load_with_fallback(records, chosen, best=step == "best", mmap=mmap)
            except _ChangedWhileReading as e:
                self._check_still_there(e.record, step)
        raise self._kept_changing(step, "loaded")

    def read_arrays(
        self, step: StepSelector = None, keys: Iterable[str] | None = None, *, verify: bool = False
    ) -> dict[str, np.ndarray]:
        """Read only some tensors of a checkpoint, without reading the rest of its file."""
        wanted = None if keys is None else ([keys] if isinstance(keys, str) else list(keys))
        return self._retrying(
            step,
            "read",
            lambda r: self._guard_concurrent(
                r, read_tensors, self.storage, r, wanted, verify=verify
            ),
        )

    def tensor_info(self, step: StepSelector = None) -> dict[str, TensorInfo]:
        """Name, dtype, shape and size of every tensor of a checkpoint, from its header alone."""

        def read(record: CheckpointRecord) -> dict[str, TensorInfo]:
            slots = read_layout_of(self.storage, record)
            infos = [
                TensorInfo(name=name, dtype=code, shape=shape, nbytes=end - begin)
                for name, code, shape, begin, end in slots
            ]
            index = read_index_of(self.storage, record)
            if index is not None:
                infos += [
                    TensorInfo(name=key, dtype=t.dtype, shape=t.shape, nbytes=t.nbytes)
                    for key, t in index.tensors.items()
                ]
            return {info.name: info for info in sorted(infos, key=lambda i: i.name)}

        return self._retrying(step, "read", lambda r: self._guard_concurrent(r, read, r))

    def _load_with_fallback(
        self, records: list[CheckpointRecord], chosen: CheckpointRecord, *, best: bool, mmap: bool
    ) -> Checkpoint:
        if best:
            candidates = self.retention.best(records)
        else:
            candidates = [r for r in reversed(records) if r.step <= chosen.step]
        errors = []
        for i, record in enumerate(candidates):
            try:
                return Checkpoint(record=record, state=self._read(record, verify=True, mmap=mmap))
            except CorruptCheckpointError as e:
                errors.append(str(e))
                nxt = f"trying step {candidates[i + 1].step}" if i + 1 < len(candidates) else ""
                message = f"skipping corrupt step {record.step}: {e}; {nxt}"
                logger.warning("%s: %s", self.location, message)
                warnings.warn(FallbackWarning(message), stacklevel=4)
        raise CorruptCheckpointError(
            f"{self.location}: no checkpoint verifies among steps {[r.step for r in candidates]}: "
            + "; ".join(errors)
        )

    def verify(self, step: StepSelector = None) -> CheckpointRecord:
        """Check a checkpoint's files against the sizes and checksums in the manifest."""

        def check(record: CheckpointRecord) -> CheckpointRecord:
            self._guard_concurrent(record, verify_files, self.storage, record)
            return record

        return self._retrying(step, "verified", check)

    def _retrying(
        self, step: StepSelector, what: str, read: Callable[[CheckpointRecord], _T]
    ) -> _T:
        """Choose the checkpoint from a fresh manifest and read it, again if it changes meanwhile."""
        for _ in range(_MAX_ATTEMPTS):
            record = self.select(self.records(), step)
            try:
                return read(record)
            except _ChangedWhileReading as e:
                self._check_still_there(e.record, step)
        raise self._kept_changing(step, what)

    def _kept_changing(self, step: StepSelector, what: str) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"{self.location}: other processes kept replacing the checkpoint chosen by step={step!r} "
            f"while it was {what} ({_MAX_ATTEMPTS} attempts); try again"
        )

    def _read(self, record: CheckpointRecord, *, verify: bool, mmap: bool = False) -> Any:
        size = next((f.size for f in record.files if f.name == "arrays.safetensors"), 0)
        with _progress.bar(self.progress and not mmap, size, f"loading step {record.step}") as up:
            state = self._guard_concurrent(
                record, read_state, self.storage, record, verify=verify, mmap=mmap, progress=up
            )
        if not verify and self._changed(record):
            # Without checksums, files of the same sizes saved again under the same directory
            # name would pass unnoticed; the manifest, unchanged after the read, rules that out
            # (its checksums name the content that was read).
            raise _ChangedWhileReading(record)
        return state

    def _guard_concurrent(
        self, record: CheckpointRecord, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> _T:
        """Run a read of ``record``; tell a concurrent deletion or overwrite from corruption.

        Files are never changed in place, so a read that finds a file missing or different
        is either corruption or another process having deleted or replaced the checkpoint
        since the manifest was read: the manifest, read again, says which.
        """
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, CorruptCheckpointError) as e:
            if isinstance(e, StoreFormatError) or not self._changed(record):
                if isinstance(e, CorruptCheckpointError):
                    raise
                raise CorruptCheckpointError(
                    f"{e.filename or self.storage.describe(record.directory)}: listed in the manifest for "
                    f"step {record.step} but missing; load another step, or pass fallback=True "
                    "to load the newest checkpoint that verifies"
                ) from None
            raise _ChangedWhileReading(record) from None

    def _changed(self, record: CheckpointRecord) -> bool:
        current = next((r for r in self.records() if r.step == record.step), None)
        return current is None or (current.directory, current.files, current.created) != (
            record.directory,
            record.files,
            record.created,
        )

    def _check_still_there(self, record: CheckpointRecord, step: StepSelector) -> None:
        """After a concurrent change, raise if the int ``step`` asked for is gone."""
        if isinstance(step, int) and step not in self:
            raise CheckpointNotFoundError(
                f"{self.location}: step {record.step} was deleted by another process (retention or "
                "prune) while it was being read; load another step"
            )

    def select(self, records: list[CheckpointRecord], step: StepSelector) -> CheckpointRecord:
        if not records:
            raise CheckpointNotFoundError(f"{self.location}: the store has no checkpoints yet")
        if step is None or step == "latest":
            return records[-1]
        if step == "best":
            best = self.best_of(records)
            if best is None:
                raise CheckpointNotFoundError(
                    f"{self.location}: no checkpoint has a finite {self.monitor!r} metric, so none is best"
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
            f"{self.location}: no checkpoint for step {step}; the store has steps [{shown}]"
        )
