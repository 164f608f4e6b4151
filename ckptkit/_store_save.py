"""A save, from the caller's state to a committed checkpoint: checked, encoded, written, committed.

:func:`prepare_save` does everything that touches no storage (checks, the tree's encoding,
``state.json``'s bytes), so a bad state fails before anything is written and ``save_async``
can copy the arrays before it returns. :func:`commit_save` runs the commit protocol of
``_store.py``'s module docstring as one change of the store's manifest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptkit import _progress
from ckptkit._errors import CheckpointExistsError, UnsupportedStateError
from ckptkit._hashing import HashingWriter
from ckptkit._manifest import detached
from ckptkit._reader import MAX_STATE_JSON_BYTES, STATE_FORMAT_VERSION
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._retention import RetentionPolicy
from ckptkit._safetensors import write_safetensors
from ckptkit._storage import CheckpointWriter, Storage
from ckptkit._store_write import ManifestWriter
from ckptkit._tree import encode_json_value, flatten_for_store
from ckptkit._tree_read import decode_json_value
from ckptkit._validate import check_metrics, check_step

logger = logging.getLogger("ckptkit")

#: Writes a checkpoint's files beyond the two fixed ones (a sharded save's shards and index,
#: with the other ranks) into the checkpoint being written; returns their entries.
ExtraFiles = Callable[[CheckpointWriter], tuple[FileEntry, ...]]


@dataclass(kw_only=True)
class SaveJob:
    """A checked, encoded save, ready for the commit protocol."""

    step: int
    metrics: dict[str, float]
    metadata: dict[str, Any]
    arrays: dict[str, np.ndarray]
    header: dict[str, str]  # the arrays file's __metadata__: the aliases
    state_bytes: bytes
    overwrite: bool
    protected: frozenset[int]


def prepare_save(
    step: int,
    state: Any,
    metrics: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    *,
    overwrite: bool,
    protected: Iterable[int],
) -> SaveJob:
    """Check and encode everything about a save that does not touch the storage."""
    step = check_step(step)
    metric_values = check_metrics(metrics, step=step)
    meta = _check_metadata(metadata, step)
    skeleton, arrays, header = flatten_for_store(state)
    doc = {"format_version": STATE_FORMAT_VERSION, "tree": skeleton}
    state_bytes = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("ascii")
    if len(state_bytes) > MAX_STATE_JSON_BYTES:
        raise UnsupportedStateError(
            f"step {step}: the state's non-array values take {len(state_bytes)} bytes of "
            f"JSON, over the {MAX_STATE_JSON_BYTES}-byte cap of state.json; store large "
            "numeric lists as numpy arrays"
        )
    return SaveJob(
        step=step,
        metrics=metric_values,
        metadata=meta,
        arrays=arrays,
        header=header,
        state_bytes=state_bytes,
        overwrite=overwrite,
        # The step being written is kept even when it is not the newest (a re-run of an
        # earlier step): a save never returns a record of a checkpoint it already deleted.
        protected=frozenset({*protected, step}),
    )


def _check_metadata(metadata: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata of step {step} must be a mapping, got {type(metadata).__name__}")
    what = f"metadata of step {step}"
    decoded = decode_json_value(encode_json_value(dict(metadata), what=what), what=what)
    assert isinstance(decoded, dict)
    return decoded


def commit_save(
    writer: ManifestWriter,
    retention: RetentionPolicy,
    job: SaveJob,
    *,
    progress: bool,
    extra: ExtraFiles | None = None,
    deletions: BackgroundDeletions | None = None,
) -> CheckpointRecord:
    """Write the job's files, commit a manifest that lists them, then apply retention.

    ``extra`` writes more files into the checkpoint before it is finished (under the store's
    lock, as the rest): a sharded save's shards, written by every rank. The checkpoints
    retention dropped are deleted before this returns, or by ``deletions`` after it returns.
    """
    step = job.step
    started = time.perf_counter()
    storage = writer.reader.storage
    with writer.change(f"saving step {step}") as change:
        _refuse_existing(storage, change.records, job)
        total = sum(a.nbytes for a in job.arrays.values())
        with _progress.bar(progress, total, f"saving step {step}") as update:
            directory, files = write_files(storage, job, update, extra)
        created = time.time()

        def decide(
            records: list[CheckpointRecord],
        ) -> tuple[list[CheckpointRecord], tuple[CheckpointRecord, list[CheckpointRecord]]]:
            # Runs again on a newer manifest if another writer committed first.
            old = _refuse_existing(storage, records, job)
            record = CheckpointRecord(
                step=step,
                metrics=job.metrics,
                metadata=job.metadata,
                created=created,
                directory=directory,
                files=files,
                pinned=old.pinned if old is not None else False,
            )
            candidates = [r for r in records if r.step != step] + [record]
            plan = retention.select(candidates, protected=job.protected)
            kept = [r for r in candidates if r.step in plan.keep]
            gone = [r for r in candidates if r.step not in plan.keep]
            return kept, (record, gone + ([old] if old is not None else []))

        record, gone = change.commit(
            decide, new_checkpoint=directory, new_files=[f.name for f in files]
        )
        logger.info(
            "%s: committed step %d (%s, %d bytes) in %.3f s",
            storage.location,
            step,
            directory,
            sum(f.size for f in files),
            time.perf_counter() - started,
        )
        dropped = [r.step for r in gone if r.step != step]
        if dropped:
            logger.info("%s: retention deletes steps %s", storage.location, dropped)
        if deletions is None:
            delete_checkpoints(storage, gone)
    if deletions is not None:
        deletions.start(gone)
    # The committed object stays in the manifest's cache; the caller gets its own copy.
    return detached(record)


def _refuse_existing(
    storage: Storage, records: list[CheckpointRecord], job: SaveJob
) -> CheckpointRecord | None:
    """The committed checkpoint of the job's step, if any; raise unless it may be replaced."""
    old = next((r for r in records if r.step == job.step), None)
    if old is not None and not job.overwrite:
        raise CheckpointExistsError(
            f"{storage.location}: step {job.step} is already committed ({old.directory}); pass "
            "overwrite=True to replace it atomically, or save under another step"
        )
    return old


def write_files(
    storage: Storage,
    job: SaveJob,
    progress: _progress.Update | None,
    extra: ExtraFiles | None = None,
) -> tuple[str, tuple[FileEntry, ...]]:
    """Write a checkpoint's files under a name no manifest lists; return it and the files.

    On any failure everything written is removed.
    """
    writer = storage.new_checkpoint(job.step)
    try:
        arrays = HashingWriter(writer.create("arrays.safetensors"), progress=progress)
        try:
            write_safetensors(arrays, job.arrays, job.header or None)
            arrays.commit()
        except BaseException:
            arrays.abort()
            raise
        state = HashingWriter(writer.create("state.json"))
        try:
            state.write(job.state_bytes)
            state.commit()
        except BaseException:
            state.abort()
            raise
        more = extra(writer) if extra is not None else ()
        directory = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return directory, (
        FileEntry(name="arrays.safetensors", size=arrays.size, checksum=arrays.checksum),
        FileEntry(name="state.json", size=state.size, checksum=state.checksum),
        *more,
    )


def delete_checkpoints(storage: Storage, records: list[CheckpointRecord]) -> None:
    """Delete checkpoints the committed manifest no longer lists: their files, then them."""
    for r in records:
        storage.delete_checkpoint(r.directory, [f.name for f in r.files])


class BackgroundDeletions:
    """Deletes the checkpoints a committed save dropped, in a thread, after the save returns.

    Deleting a dropped checkpoint's files takes as long as a tenth of writing them on ext4
    (the blocks are freed), and nothing depends on it: no manifest lists the checkpoint any
    more, readers never open it, and a crash before the deletion finishes leaves a directory
    the next sweep removes. So the save returns at its commit and the deletion runs on. One
    deletion runs at a time; :meth:`join` waits for it (the store joins before every change
    and on ``wait``/``close``). A failed deletion is logged and the next change sweeps again.

    The deletion takes the store's lock, as every change does: a local store reuses a
    deleted checkpoint's directory name (``step_<12 digits>``) for a later save of that step,
    and only the lock orders this deletion before another writer's save of that name.
    """

    def __init__(self, writer: ManifestWriter) -> None:
        self._writer = writer
        self._thread: threading.Thread | None = None

    def start(self, records: list[CheckpointRecord]) -> None:
        self.join()
        if records:
            # Not a daemon: a deletion under way at interpreter exit is finished first.
            self._thread = threading.Thread(
                target=self._run, args=(records,), name="ckptkit-delete", daemon=False
            )
            self._thread.start()

    def _run(self, records: list[CheckpointRecord]) -> None:
        storage = self._writer.reader.storage
        try:
            with self._writer.locked():
                delete_checkpoints(storage, records)
        except Exception as e:
            self._writer.sweep_again()
            logger.warning(
                "%s: could not delete %s, which the committed manifest no longer lists (%s); "
                "every listed checkpoint is intact, and the next save, prune or pin removes them",
                storage.location,
                ", ".join(r.directory for r in records),
                e,
            )

    def join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
