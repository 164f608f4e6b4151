"""Sharded saves and loads: every rank writes and reads its own shards, rank 0 commits.

A save, on every rank of the group at once:

1. Every rank takes its state (``TorchState._sharded_state``): module and optimizer tensors
   (``DTensor`` shards under FSDP2) for DCP, the rest as the ordinary tree.
2. Rank 0 starts the save under the store's lock (the sweep has run), writes the tree's two
   files into a fresh checkpoint and broadcasts the checkpoint's name; a failure before that is
   broadcast instead, and every rank raises.
3. Every rank joins the checkpoint (``Storage.join_checkpoint``) and runs ``dcp.save`` with
   :class:`~._torch_dcp.ShardWriter`: its chunks go to its own ``shard_<rank>.safetensors``,
   durable before DCP's final gather. DCP raises on every rank if any rank failed.
4. Rank 0 writes ``shards.json`` (the index, with every shard file's checksum from DCP's
   results) and commits the manifest: the commit point. It broadcasts the record, or its error;
   on an error every rank removes what it wrote (locally rank 0 removes the whole temporary
   directory), so nothing of a failed save is ever listed.

A rank killed at any instant leaves the others raising (gloo reports the lost peer) and an
unlisted temporary checkpoint, which the next change to the store sweeps.

A load: rank 0 chooses the checkpoint (and the older ones to fall back to) and broadcasts
their records; every rank reads the tree (the replicated part) and the index, then the ranks
agree that all could; ``dcp.load`` with :class:`~._torch_dcp.ShardReader` fills each rank's
tensors in place from the chunks it needs, resharding to this run's layout; then every rank
loads its objects. A corrupt file on any rank makes every rank move to the next older
checkpoint together (with ``fallback``) or raise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptkit._errors import CkptkitError, CorruptCheckpointError
from ckptkit._hashing import HashingWriter
from ckptkit._manifest import SHARD_INDEX
from ckptkit._manifest import dumps as dump_records
from ckptkit._manifest import loads as load_records
from ckptkit._reader import read_state
from ckptkit._record import CheckpointRecord, FileEntry
from ckptkit._sharded import encode_index, read_index
from ckptkit._storage import CheckpointFiles, CheckpointWriter
from ckptkit._store import StepSelector
from ckptkit._store_read import FallbackWarning

from ._torch_dcp import ShardReader, ShardWriter, build_index
from ._torch_sharded import Captured, capture, fill

if TYPE_CHECKING:
    from ._torch_dist import DistributedCheckpointer
    from ._torch_state import TorchState

_OK, _CORRUPT, _FAILED = 0, 1, 2


class _Corrupt(Exception):
    """Some rank found the checkpoint corrupt; every rank raises this together."""


def _failures(e: CheckpointException) -> dict[int, BaseException]:
    """Each failed rank's exception (DCP keeps them as (exception, traceback) pairs)."""
    out = {}
    for rank, failure in e.failures.items():
        exc = failure[0] if isinstance(failure, tuple) else failure
        out[rank] = exc if isinstance(exc, BaseException) else RuntimeError(str(exc))
    return out


def _from_dcp(e: CheckpointException, what: str, rank: int) -> Exception:
    """DCP's error (a ``BaseException``, which ``except Exception`` misses) as an Exception.

    This rank's own exception when it failed itself; otherwise a ``DistributedCheckpointError``
    naming the ranks that failed and why.
    """
    from ._torch_dist import DistributedCheckpointError

    failures = _failures(e)
    own = failures.get(rank)
    if isinstance(own, Exception):
        return own
    listed = "; ".join(f"rank {r}: {_describe(exc)}" for r, exc in sorted(failures.items()))
    return DistributedCheckpointError(f"{what} failed on another rank ({listed})")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


#: What a process group's collectives say when a peer process is gone (gloo, NCCL).
_LOST_PEER = ("closed by peer", "reset by peer", "Broken pipe", "Timed out", "timed out")


@contextmanager
def _peers_answer(owner: DistributedCheckpointer, what: str) -> Iterator[None]:
    """Turn a collective's error about a lost peer into a DistributedCheckpointError."""
    from ._torch_dist import DistributedCheckpointError

    try:
        yield
    except RuntimeError as e:
        if isinstance(e, CkptkitError) or not any(w in str(e) for w in _LOST_PEER):
            raise
        raise DistributedCheckpointError(
            f"{what} of the store {owner.store.root}: another rank stopped answering ({e}). "
            "Every committed checkpoint is intact (a save is committed only by rank 0's "
            "manifest commit, all or nothing); restart every rank, and resume() continues from "
            "the latest committed checkpoint"
        ) from e


class ShardedIO:
    """The sharded save and load of one :class:`DistributedCheckpointer`."""

    def __init__(self, owner: DistributedCheckpointer, state: TorchState) -> None:
        self._owner = owner
        self._state = state

    # -- saving ------------------------------------------------------------------------------

    def save(
        self, step: int, metrics: Any, metadata: dict[str, Any], overwrite: bool
    ) -> CheckpointRecord:
        """Save on every rank together; every rank returns the committed record."""
        with _peers_answer(self._owner, f"saving step {step}"):
            return self._save(step, metrics, metadata, overwrite)

    def _save(
        self, step: int, metrics: Any, metadata: dict[str, Any], overwrite: bool
    ) -> CheckpointRecord:
        owner = self._owner
        tree, captured = self._state._sharded_state()
        if owner.rank == 0:
            return self._save_as_coordinator(step, tree, captured, metrics, metadata, overwrite)
        started = owner._broadcast_json(None)
        if "error" in started:
            raise owner._remote_error(f"saving step {step}", started["error"])
        writer = owner.store._storage.join_checkpoint(started["ok"])
        own_error: BaseException | None = None
        try:
            self._write_shards(writer, captured)
        except Exception as e:  # raised below, after rank 0's outcome
            own_error = e
        outcome = owner._broadcast_json(None)
        if own_error is not None or "error" in outcome:
            writer.abort()
        if own_error is not None:
            raise own_error
        if "error" in outcome:
            raise owner._remote_error(f"saving step {step}", outcome["error"])
        (record,) = load_records(outcome["record"].encode("utf-8"), path="rank 0's reply")
        return record

    def _save_as_coordinator(
        self,
        step: int,
        tree: Any,
        captured: Captured,
        metrics: Any,
        metadata: dict[str, Any],
        overwrite: bool,
    ) -> CheckpointRecord:
        owner = self._owner
        announced = False

        def write_shards(writer: CheckpointWriter) -> tuple[FileEntry, ...]:
            nonlocal announced
            owner._broadcast_json({"ok": writer.name})
            announced = True
            return self._write_shards(writer, captured)

        try:
            record = owner.store._save_with_files(
                step, tree, metrics, metadata, write_shards, overwrite=overwrite
            )
        except Exception as e:
            # The others wait for the checkpoint's name, or for the outcome.
            owner._broadcast_json({"error": _describe(e)})
            raise
        assert announced
        owner._broadcast_json({"record": dump_records([record]).decode("utf-8")})
        return record

    def _write_shards(self, writer: CheckpointWriter, captured: Captured) -> tuple[FileEntry, ...]:
        """Run DCP's save into ``writer``; on rank 0 also write the index; return the entries."""
        owner = self._owner
        shard_writer = ShardWriter(writer, owner.rank)
        try:
            dcp_save(captured.tensors, storage_writer=shard_writer, process_group=owner.group)
        except CheckpointException as e:
            raise _from_dcp(e, "writing the shards", owner.rank) from e
        if owner.rank != 0:
            return ()
        assert shard_writer.metadata is not None and shard_writer.results is not None
        index, entries = build_index(
            shard_writer.metadata, shard_writer.results, captured.paths, owner.world_size
        )
        out = HashingWriter(writer.create(SHARD_INDEX))
        try:
            out.write(encode_index(index))
            out.commit()
        except BaseException:
            out.abort()
            raise
        return (*entries, FileEntry(name=SHARD_INDEX, size=out.size, checksum=out.checksum))

    # -- loading -----------------------------------------------------------------------------

    def restore(self, step: StepSelector, fallback: bool) -> CheckpointRecord:
        """Load the chosen checkpoint into the state on every rank; return its record."""
        with _peers_answer(self._owner, f"loading step={step!r}"):
            return self._restore(step, fallback)

    def _restore(self, step: StepSelector, fallback: bool) -> CheckpointRecord:
        owner = self._owner
        store = owner.store

        def choose() -> dict[str, Any]:
            records = store.records()
            chosen = store._reader.select(records, step)
            if not fallback:
                candidates = [chosen]
            elif step == "best":
                candidates = store._reader.retention.best(records)
            else:
                candidates = [r for r in reversed(records) if r.step <= chosen.step]
            return {"records": dump_records(candidates).decode("utf-8")}

        reply = owner._on_writer(choose, f"choosing the checkpoint of step={step!r}")
        candidates = load_records(reply["records"].encode("utf-8"), path="rank 0's reply")
        # dumps sorts by step: newest first again, or best first for "best".
        if step == "best":
            candidates = store._reader.retention.best(candidates)
        else:
            candidates = candidates[::-1]
        errors = []
        for i, record in enumerate(candidates):
            try:
                self._load(record)
                return record
            except _Corrupt as e:
                errors.append(str(e))
                if i + 1 < len(candidates):
                    message = (
                        f"skipping corrupt step {record.step}: {e}; trying step "
                        f"{candidates[i + 1].step}"
                    )
                    warnings.warn(FallbackWarning(message), stacklevel=4)
        raise CorruptCheckpointError(
            f"{store.root}: no checkpoint verifies among steps {[r.step for r in candidates]}: "
            + "; ".join(errors)
        )

    def _load(self, record: CheckpointRecord) -> None:
        owner = self._owner
        storage = owner.store._storage
        where = storage.describe(record.directory)
        files: CheckpointFiles | None = None
        error: BaseException | None = None
        try:
            files = storage.open_checkpoint(record.directory)
            tree = read_state(storage, record, verify=True, shards=False)
            index = read_index(files, record, verify=True, where=where)
            parts = self._state._from_tree(tree, self._state.map_location, "")
            target = capture(self._state)
            missing = sorted(set(target.tensors) - set(index.tensors))
            unexpected = sorted(set(index.tensors) - set(target.tensors))
            if missing or unexpected:
                raise ValueError(
                    f"{where}: the saved tensors do not match this state's: missing "
                    f"{missing[:10]}, unexpected {unexpected[:10]}; load into the same model "
                    "and optimizers as were saved"
                )
        except Exception as e:  # agreed on below
            error = e
        try:
            self._agree_or_raise(error, record)
            assert files is not None
            reader = ShardReader(files, record, index, verify=True, where=where)
            try:
                dcp_load(target.tensors, storage_reader=reader, process_group=owner.group)
            except CheckpointException as e:
                failures = _failures(e)
                corrupt = [f"rank {r}: {x}" for r, x in sorted(failures.items()) if _is_corrupt(x)]
                if corrupt:
                    raise _Corrupt("; ".join(corrupt)) from e
                raise _from_dcp(e, f"loading step {record.step}", owner.rank) from e
        finally:
            if files is not None:
                files.close()
        fill(parts, target.tensors, {k: index.tensors[k].path for k in target.tensors})
        self._state._apply(parts, "")

    def _agree_or_raise(self, error: BaseException | None, record: CheckpointRecord) -> None:
        """Every rank's outcome of preparing a load; raise on every rank unless all succeeded."""
        owner = self._owner
        code = _OK if error is None else (_CORRUPT if _is_corrupt(error) else _FAILED)
        mine = torch.tensor([code], dtype=torch.int64, device=owner._device)
        codes = [torch.empty_like(mine) for _ in range(owner.world_size)]
        dist.all_gather(codes, mine, group=owner.group)
        worst = max(int(c.item()) for c in codes)
        if worst == _OK:
            return
        if error is not None and code == _FAILED:
            raise error
        if worst == _FAILED:
            failed = [r for r, c in enumerate(codes) if int(c.item()) == _FAILED]
            raise owner._remote_error(
                f"loading step {record.step}", f"rank(s) {failed} failed; see their tracebacks"
            )
        raise _Corrupt(
            str(error) if error is not None else f"step {record.step} is corrupt on another rank"
        )


def _is_corrupt(error: object) -> bool:
    return isinstance(error, (CorruptCheckpointError, FileNotFoundError))
