"""Checkpointing a data-parallel run: rank 0 writes, every rank gets the same decisions.

In a DistributedDataParallel run every rank holds the same model and optimizer state, so one
writer is enough, but every rank must leave the loop at the same epoch: a rank that stops while
another trains on waits forever at the next gradient all-reduce. :class:`DistributedCheckpointer`
runs the core :class:`~ckptkit.Checkpointer` on every rank, lets only the group's rank 0 save,
and sends rank 0's decision and stopping counters to the others with a tensor broadcast of JSON
(no pickle), so ``should_stop``, ``best_step`` and what ``restore_best`` loads agree everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from ckptkit._async import PendingSave
from ckptkit._checkpointer import Checkpointer, Stateful
from ckptkit._errors import CkptkitError
from ckptkit._manifest import dumps as _dump_records
from ckptkit._manifest import loads as _load_records
from ckptkit._policy import Decision, StoppingPolicy
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore
from ckptkit._tree import encode_json_value
from ckptkit._tree_read import decode_json_value

from ._torch_dist_sharded import ShardedIO
from ._torch_state import TorchState

__all__ = ["DistributedCheckpointError", "DistributedCheckpointer"]


class DistributedCheckpointError(CkptkitError, RuntimeError):
    """A checkpoint operation failed on another rank, or the ranks disagree on the store."""


class DistributedCheckpointer:
    """The :class:`~ckptkit.Checkpointer` of a DDP-style run: one writer, one shared decision.

    Why: every rank must stop at the same epoch and resume from the same checkpoint, or the
    next collective hangs; and several ranks writing one store would only take turns at its
    lock to write the same bytes.

    The contract, for a group whose ranks hold the same state (DDP replicas):

    - Make it on every rank of the group, with the same arguments, after
      ``torch.distributed.init_process_group``; call its methods on every rank in the same
      order, as you would a collective.
    - ``store`` is the same directory on every rank (a filesystem they all read); only the
      group's rank 0 ever writes it.
    - :meth:`step` and :meth:`save` run on rank 0 and broadcast the outcome: the decision, the
      policy's counters (loaded into every rank's policy) and any error, which the other ranks
      raise as :class:`DistributedCheckpointError` instead of hanging. Only rank 0's
      ``metrics`` count; the others' are ignored (average them across ranks first if each
      rank evaluates its own shard).
    - :meth:`resume` and :meth:`restore_best` read the store on every rank, then check that
      every rank loaded the same step; no rank writes while they read.
    - The state saved is rank 0's. State that differs between ranks (generators seeded per rank)
      comes back as rank 0's on every rank after a resume; seed such state from the rank and
      the epoch instead of saving it, or keep it out of ``state``.

    With ``sharded=True`` every rank writes instead, for models whose state is split across
    ranks (FSDP2 ``fully_shard``, ``DTensor``): the modules' and optimizers' tensors are saved
    by every rank through ``torch.distributed.checkpoint`` into its own safetensors file, the
    rest by rank 0, and rank 0 commits one manifest listing them all. Every rank then runs
    the policy on rank 0's ``metrics`` and joins each save; loads reshard to this run's layout
    (a checkpoint saved on N ranks resumes on M). ``state`` must be a ``TorchState``. See
    ``docs/how-to/fsdp.md``.

    Args:
        store: the store, opened on every rank.
        policy: the stopping policy (the same options on every rank), or None to only save.
        state: an object with ``state_dict()``/``load_state_dict()``, or a dict of them.
        group: the process group; None for the default (world) group.
        save_every: save every this many steps (as :class:`~ckptkit.Checkpointer`).
        save_best_only: save only new bests (as :class:`~ckptkit.Checkpointer`).
        sharded: every rank writes its own shards (above); False, the default: rank 0 writes
            the whole state.

    Raises:
        DistributedCheckpointError: torch.distributed is not initialized, or this process is
            not in ``group``.

    Example:
        >>> dist.init_process_group("gloo")
        >>> model = DistributedDataParallel(net)
        >>> ckpt = DistributedCheckpointer(store, policy, TorchState(model=model, optimizer=opt))
        >>> for epoch in range(ckpt.resume(), 100):
        ...     train_one_epoch()
        ...     if ckpt.step(epoch, {"val_loss": evaluate()}).should_stop:
        ...         break  # on every rank at the same epoch
        >>> ckpt.restore_best()
        >>> dist.destroy_process_group()  # before exiting: gloo aborts if the interpreter does it
    """

    def __init__(
        self,
        store: CheckpointStore,
        policy: StoppingPolicy | None,
        state: Stateful | Mapping[str, Stateful],
        *,
        group: dist.ProcessGroup | None = None,
        save_every: int = 1,
        save_best_only: bool = False,
        sharded: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedCheckpointError(
                "torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() on every rank before making a "
                "DistributedCheckpointer, or use Checkpointer in a single process"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise DistributedCheckpointError(
                f"global rank {dist.get_rank()} is not a member of the process group passed; "
                "make the DistributedCheckpointer only on the group's ranks"
            )
        self.checkpointer = Checkpointer(
            store, policy, state, save_every=save_every, save_best_only=save_best_only
        )
        self.group = group
        #: This process's rank in ``group``; rank 0 is the one that writes.
        self.rank = rank
        self.world_size = dist.get_world_size(group)
        self._src = 0 if group is None else dist.get_global_rank(group, 0)
        self._device = _collective_device(group)
        #: True when every rank writes its own shards (see the class docstring).
        self.sharded = bool(sharded)
        if self.sharded:
            if not isinstance(state, TorchState):
                raise TypeError(
                    f"sharded=True needs a TorchState(model=..., optimizer=...), not a "
                    f"{type(state).__name__}"
                )
            io = ShardedIO(self, state)
            self.checkpointer._save_hook = io.save
            self.checkpointer._restore_hook = io.restore

    def __repr__(self) -> str:
        return f"DistributedCheckpointer({self.store.root}, rank {self.rank} of {self.world_size})"

    @property
    def store(self) -> CheckpointStore:
        """The store (written by rank 0 only)."""
        return self.checkpointer.store

    @property
    def policy(self) -> StoppingPolicy | None:
        """This rank's policy; after each :meth:`step` it holds rank 0's counters."""
        return self.checkpointer.policy

    @property
    def state(self) -> Stateful | Mapping[str, Stateful]:
        """The training state."""
        return self.checkpointer.state

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the store (the group's rank 0)."""
        return self.rank == 0

    @property
    def resumed_from(self) -> CheckpointRecord | None:
        """The checkpoint :meth:`resume` loaded; None before it or on a fresh run."""
        return self.checkpointer.resumed_from

    @property
    def should_stop(self) -> bool:
        """True once rank 0's policy has said stop; the same on every rank."""
        return self.checkpointer.should_stop

    def resume(self, *, fallback: bool = True) -> int:
        """On every rank, restore the latest checkpoint; return the next step (0: fresh run).

        Every rank reads the store, then the ranks compare the steps they loaded.

        Raises:
            DistributedCheckpointError: another rank failed to resume, or the ranks loaded
                different steps (the store is not one directory that every rank reads).
        """
        if self.sharded:
            latest = self.store.latest()
            self._same_step(-1 if latest is None else latest.step, "resume", "sees as latest")
        error: BaseException | None = None
        step = 0
        try:
            step = self.checkpointer.resume(fallback=fallback)
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
        loaded = self.resumed_from.step if self.resumed_from is not None else -1
        self._agree("resume", error, loaded, "resumed from")
        return step

    def step(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """Rank 0 observes its ``metrics`` and saves if due; every rank gets its decision.

        Returns:
            Rank 0's decision, the same on every rank; None without a policy.

        Raises:
            DistributedCheckpointError: on the other ranks, when rank 0 failed (rank 0 raises
                its own error, a ``MissingMetricError`` say).
        """
        if self.sharded:
            # Every rank runs the policy on rank 0's metrics, so every rank makes the same
            # decision and joins the same saves.
            metrics, metadata = self._rank0_inputs(metrics, metadata)
            return self.checkpointer.step(step, metrics, metadata=metadata)
        reply = self._on_writer(
            lambda: self._decision_reply(self.checkpointer.step(step, metrics, metadata=metadata)),
            f"step {step}",
        )
        if self.rank != 0 and self.policy is not None:
            self.policy.load_state_dict(reply["policy"])
        decision = reply["decision"]
        return None if decision is None else Decision(**decision)

    def save(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Save a checkpoint now, from rank 0; every rank returns its record.

        Raises:
            DistributedCheckpointError: on the other ranks, when rank 0's save failed.
        """

        if self.sharded:
            metrics, metadata = self._rank0_inputs(metrics, metadata)
            saved = self.checkpointer.save(step, metrics, metadata=metadata)
            assert isinstance(saved, CheckpointRecord)
            return saved

        def save_on_writer() -> dict[str, Any]:
            saved = self.checkpointer.save(step, metrics, metadata=metadata)
            # Every rank returns the committed record, so a background save is waited for.
            record = saved.result() if isinstance(saved, PendingSave) else saved
            return {"record": _dump_records([record]).decode("utf-8")}

        reply = self._on_writer(save_on_writer, f"saving step {step}")
        (record,) = _load_records(reply["record"].encode("utf-8"), path="rank 0's reply")
        return record

    def restore_best(self) -> CheckpointRecord:
        """On every rank, load the best checkpoint (rank 0's policy's best) into the state.

        Raises:
            CheckpointNotFoundError: on every rank, when there is no best yet.
            DistributedCheckpointError: another rank failed, or the ranks loaded different steps.
        """
        if self.sharded:
            best = self.checkpointer.best()
            self._same_step(-1 if best is None else best.step, "restore_best", "sees as best")
        error: BaseException | None = None
        record: CheckpointRecord | None = None
        try:
            record = self.checkpointer.restore_best()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
        self._agree("restore_best", error, -1 if record is None else record.step, "restored")
        assert record is not None  # _agree raised otherwise
        return record

    # -- collectives -------------------------------------------------------------------------

    def _decision_reply(self, decision: Decision | None) -> dict[str, Any]:
        policy = self.policy
        return {
            "decision": None if decision is None else asdict(decision),
            "policy": None if policy is None else policy.state_dict(),
        }

    def _on_writer(self, action: Callable[[], Any], what: str) -> dict[str, Any]:
        """Run ``action`` on rank 0 and broadcast its JSON reply, or its error, to every rank."""
        error: BaseException | None = None
        reply: dict[str, Any] = {}
        if self.rank == 0:
            try:
                reply = {"ok": action()}
            except Exception as e:  # re-raised below, after the other ranks have heard of it
                error = e
                reply = {"error": f"{type(e).__name__}: {e}"}
        received = self._broadcast_json(reply if self.rank == 0 else None)
        if error is not None:
            raise error
        if "error" in received:
            raise self._remote_error(what, received["error"])
        result: dict[str, Any] = received["ok"]
        return result

    def _remote_error(self, what: str, message: str) -> DistributedCheckpointError:
        return DistributedCheckpointError(
            f"rank 0 failed at {what} of the store {self.store.root}: {message}; "
            "see rank 0's traceback"
        )

    def _broadcast_json(self, value: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's JSON ``value`` on every rank (the others pass None)."""
        # NaN and infinite values travel as JSON's NaN/Infinity tokens: both ends are Python.
        data = json.dumps(value).encode("utf-8") if self.rank == 0 else b""
        received: dict[str, Any] = json.loads(self._broadcast(data).decode("utf-8"))
        return received

    def _rank0_inputs(
        self, metrics: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Rank 0's metrics and metadata, on every rank (as JSON: NaN and inf included)."""
        mine: dict[str, Any] | None = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                mine = {
                    "metrics": None
                    if metrics is None
                    else {k: float(v) for k, v in metrics.items()},
                    "metadata": None
                    if metadata is None
                    else encode_json_value(dict(metadata), what="metadata"),
                }
                json.dumps(mine)
            except (TypeError, ValueError) as e:  # raised below, after the others heard of it
                error, mine = e, {"error": f"{type(e).__name__}: {e}"}
        got = self._broadcast_json(mine)
        if error is not None:
            raise error
        if "error" in got:
            raise self._remote_error("reading the metrics", got["error"])
        meta = (
            None if got["metadata"] is None else decode_json_value(got["metadata"], what="metadata")
        )
        assert meta is None or isinstance(meta, dict)
        return got["metrics"], meta

    def _same_step(self, step: int, what: str, verb: str) -> None:
        """Raise on every rank unless every rank passes the same ``step`` (-1: none)."""
        mine = torch.tensor([step], dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        steps = [int(t.item()) for t in gathered]
        if len(set(steps)) > 1:
            listed = ", ".join(
                f"rank {rank} {verb} {'no checkpoint' if s < 0 else f'step {s}'}"
                for rank, s in enumerate(steps)
            )
            raise DistributedCheckpointError(
                f"{what}: the ranks see different checkpoints in {self.store.root} ({listed}); "
                "the store must be one directory (or bucket prefix) that every rank reads"
            )

    def _broadcast(self, data: bytes) -> bytes:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        dist.broadcast(size, src=self._src, group=self.group)
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=self._device)
        dist.broadcast(buffer, src=self._src, group=self.group)
        return bytes(buffer.cpu().numpy().tobytes())

    def _agree(self, what: str, error: BaseException | None, step: int, verb: str) -> None:
        """Exchange (failed, step) between all ranks; raise on every rank unless all agree."""
        mine = torch.tensor([int(error is not None), step], dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        results = [(int(t[0].item()), int(t[1].item())) for t in gathered]
        if error is not None:
            raise error
        failed = [rank for rank, (flag, _) in enumerate(results) if flag]
        if failed:
            raise DistributedCheckpointError(
                f"{what} of the store {self.store.root} failed on rank(s) {failed}; see their "
                "tracebacks"
            )
        steps = {s for _, s in results}
        if len(steps) > 1:
            listed = ", ".join(
                f"rank {rank} {verb} {'no checkpoint' if s < 0 else f'step {s}'}"
                for rank, (_, s) in enumerate(results)
            )
            raise DistributedCheckpointError(
                f"{what}: the ranks loaded different checkpoints of {self.store.root} "
                f"({listed}); the store must be one directory that every rank reads, and no "
                "process may write it meanwhile"
            )


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device for the small tensors of our collectives: NCCL alone needs CUDA tensors."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
