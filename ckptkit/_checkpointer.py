"""Checkpointer: a store, a stopping policy and the training state, for a hand-written loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ckptkit._async import PendingSave
from ckptkit._errors import (
    CheckpointNotFoundError,
    CkptkitError,
    CorruptCheckpointError,
    MissingMetricError,
)
from ckptkit._frameworks import part_name, refuse_framework_objects
from ckptkit._policy import Decision, StoppingPolicy
from ckptkit._preemption import PreemptionGuard
from ckptkit._record import CheckpointRecord
from ckptkit._retention import RetentionPolicy
from ckptkit._store import CheckpointStore, StepSelector
from ckptkit._validate import check_step

#: Metadata key under which the checkpointer keeps its own state (the policy's) in each record.
RESERVED_METADATA_KEY = "ckptkit"


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` returning a state tree and ``load_state_dict(tree)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class Checkpointer:
    """Ties a :class:`CheckpointStore`, a :class:`StoppingPolicy` and the training state together.

    Each :meth:`step` observes the monitored metric, saves a checkpoint holding the state and
    the policy's counters, and applies the store's retention; :meth:`resume` brings both back,
    so a restarted run decides and continues exactly as the uninterrupted one.

    Which steps are saved: every ``save_every``-th (those with ``(step + 1) % save_every == 0``),
    every step whose monitored value is the best so far (so the best is always restorable), and
    the step where the policy says stop. With ``save_best_only=True``, only new bests are saved
    (Keras ``ModelCheckpoint(save_best_only=True)``); the stop is then not recorded, so a restart
    re-runs the steps after the last best and (the run being deterministic) stops again at the
    same step. With a ``preemption`` guard that has caught a signal, the step is saved whatever
    the schedule (``save_best_only`` included) and :attr:`preempted` turns True, for the loop to
    stop; a restart resumes there.

    The best checkpoint is the committed one with the best value of the policy's monitor
    (earliest step on a tie; NaN and infinities never count): the one ``store.best()``, ``load(
    "best")`` and ``ckptkit show run best`` give when the store ranks by the same monitor.
    ``min_delta``, ``baseline`` and ``warmup`` decide when to stop, not which checkpoint is
    best: a value better by less than ``min_delta`` does not reset patience, but it is the best
    checkpoint. The policy's own ``best``/``best_step`` are the value patience counts from.

    Args:
        store: where checkpoints go.
        policy: the stopping policy, or None to only save.
        state: an object with ``state_dict()``/``load_state_dict()``, or a dict of them by name.
        save_every: save every this many steps (1: every step).
        save_best_only: save only steps where the policy sees an improvement (Keras
            ``ModelCheckpoint(save_best_only=True)``).
        preemption: a :class:`PreemptionGuard` whose request makes the next :meth:`step`
            save and set :attr:`preempted`.
        blocking: False to save with ``store.save_async``: each save copies the state into
            reused buffers and commits in the background while training goes on; a failure is
            raised by the next save, :meth:`wait` or :meth:`restore_best`.

    Example:
        >>> policy = StoppingPolicy(monitor="val_loss", patience=3)
        >>> with PreemptionGuard() as guard:
        ...     ckpt = Checkpointer(store, policy, model, preemption=guard)
        ...     for epoch in range(ckpt.resume(), 100):
        ...         ckpt.step(epoch, {"val_loss": train_one_epoch()})
        ...         if ckpt.should_stop or ckpt.preempted:
        ...             break
        >>> if not ckpt.preempted:
        ...     ckpt.restore_best()
    """

    def __init__(
        self,
        store: CheckpointStore,
        policy: StoppingPolicy | None,
        state: Stateful | Mapping[str, Stateful],
        *,
        save_every: int = 1,
        save_best_only: bool = False,
        preemption: PreemptionGuard | None = None,
        blocking: bool = True,
    ) -> None:
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
        if save_best_only and policy is None:
            raise ValueError("save_best_only=True needs a policy to say what an improvement is")
        if isinstance(state, Mapping):
            refuse_framework_objects(dict(state), where="state")
            for name, obj in state.items():
                _check_stateful(obj, f"state[{name!r}]")
        else:
            refuse_framework_objects({part_name(state): state}, where=None)
            _check_stateful(state, "state")
        if policy is not None and store.monitor == policy.monitor and store.mode != policy.mode:
            raise ValueError(
                f"the store ranks {store.monitor!r} by mode {store.mode!r} and the policy by "
                f"{policy.mode!r}, so they would disagree on the best checkpoint; give both the "
                "same mode"
            )
        if preemption is not None and not isinstance(preemption, PreemptionGuard):
            raise TypeError(
                f"preemption is a {type(preemption).__name__}; pass a PreemptionGuard or None"
            )
        self.store = store
        self.policy = policy
        self.state = state
        self.save_every = save_every
        self.save_best_only = save_best_only
        self.preemption = preemption
        self.blocking = bool(blocking)
        self.resumed_from: CheckpointRecord | None = None
        self._best_protected: int | None = None
        #: (value, step) of the best monitored value saved so far.
        self._best: tuple[float, int] | None = None
        #: The steps whose checkpoints can be the best (first, last or None): all by default;
        #: an adapter that runs training stages narrows it to the stage at hand.
        self._best_window: tuple[int, int | None] = (0, None)
        self._overwrite_after: int | None = None
        self._preempted = False
        #: An adapter's own save and load of the state (a sharded save, which every rank of a
        #: distributed run joins): (step, metrics, metadata, overwrite) -> the committed record,
        #: and (step, fallback) -> the record loaded into the state.
        self._save_hook: (
            Callable[[int, Mapping[str, Any] | None, dict[str, Any], bool], CheckpointRecord] | None
        ) = None
        self._restore_hook: Callable[[StepSelector, bool], CheckpointRecord] | None = None

    def resume(self, *, fallback: bool = True) -> int:
        """Restore the latest checkpoint into the state and the policy; return the next step.

        Returns 0 when the store is empty. With ``fallback`` (the default), a latest checkpoint
        that fails verification is skipped with a ``FallbackWarning`` for the newest one that
        verifies. The checkpoint resumed from is protected from retention in this process.
        """
        self.store.wait()
        latest = self.store.latest()
        if latest is None:
            return 0
        record = self._restore(None, fallback=fallback)
        if self.policy is not None:
            best = self._best_record(self.store.records())
            self._best = None if best is None else (self._value(best), best.step)
            saved = self._saved_policy_state(record)
            if saved is not None:
                try:
                    self.policy.load_state_dict(saved)
                except ValueError as e:
                    if isinstance(e, CkptkitError):
                        raise
                    raise CorruptCheckpointError(
                        f"{self.store.root}: the stopping state saved with step "
                        f"{record.step} is malformed: {e}"
                    ) from e
            self._protect_best()
        # After a fallback past corrupt checkpoints, the loop re-runs their steps: let its
        # saves replace them instead of failing on "already committed".
        self._overwrite_after = record.step if record.step < latest.step else None
        self.store.protect(record.step)
        self.resumed_from = record
        return record.step + 1

    @property
    def should_stop(self) -> bool:
        """True once the policy has said stop, including in a run resumed after the stop."""
        return self.policy is not None and self.policy.should_stop

    @property
    def preempted(self) -> bool:
        """True after a :meth:`step` that found a stop request and made sure its step is saved.

        A signal caught after that check leaves this False until the next step has saved, so
        a loop that breaks on it never leaves its last trained step unsaved.
        """
        return self._preempted

    def step(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """Observe the monitored metric, save if due, apply retention; return the decision.

        Also saves a step not due when the ``preemption`` guard has caught a signal, and then
        sets :attr:`preempted`. Returns None when the checkpointer has no policy.

        Raises:
            MissingMetricError: the policy's monitor is not among ``metrics`` (the message lists
                the names there are).
        """
        step = check_step(step)
        self._preempted = False
        decision = None
        if self.policy is not None:
            monitor = self.policy.monitor
            if metrics is None or monitor not in metrics:
                names = sorted(metrics) if metrics else []
                raise MissingMetricError(
                    f"step {step}: the policy monitors {monitor!r}, but the metrics passed have "
                    f"only {names}; pass {monitor!r} in the metrics of every step"
                )
            if self.policy.should_stop:
                # Stopped earlier (maybe before a restart): nothing new to decide or save.
                return self.policy.observe(metrics[monitor], step=step)
            decision = self.policy.observe(metrics[monitor], step=step)
        saved = self._due(step, decision, metrics)
        if saved:
            self.save(step, metrics, metadata=metadata)
        # Checked after the scheduled save: a signal caught during it needs no second one.
        if self.preemption is not None and self.preemption.requested:
            if not saved:
                self.save(step, metrics, metadata=metadata)
            # The loop stops on this: the checkpoint must be committed first.
            self.store.wait()
            self._preempted = True
        return decision

    def _due(self, step: int, decision: Decision | None, metrics: Mapping[str, Any] | None) -> bool:
        if self._is_new_best(metrics):
            return True
        if self.save_best_only:
            return False
        if decision is not None and decision.should_stop:
            return True  # saved with the policy's stopped state, so a restart stops too
        return (step + 1) % self.save_every == 0

    def save(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord | PendingSave:
        """Save a checkpoint now, whatever the schedule (for example before a preemption).

        Returns the committed record, or with ``blocking=False`` the :class:`PendingSave` of
        a commit that goes on in the background (``store.save_async``).
        """
        meta = dict(metadata or {})
        if RESERVED_METADATA_KEY in meta:
            raise ValueError(
                f"metadata key {RESERVED_METADATA_KEY!r} is reserved for ckptkit's own state; "
                "rename that key"
            )
        if self.policy is not None:
            meta[RESERVED_METADATA_KEY] = {"policy": self.policy.state_dict()}
        overwrite = self._overwrite_after is not None and step > self._overwrite_after
        result: CheckpointRecord | PendingSave
        if self._save_hook is not None:
            result = self._save_hook(step, metrics, meta, overwrite)
        else:
            save = self.store.save if self.blocking else self.store.save_async
            result = save(step, self._state_dict(), metrics, meta, overwrite=overwrite)
        if self._is_new_best(metrics):
            assert self.policy is not None and metrics is not None
            self._best = (float(metrics[self.policy.monitor]), step)
        self._protect_best()
        return result

    def wait(self) -> CheckpointRecord | None:
        """Wait for a background save (``blocking=False``); raise its error if it failed."""
        return self.store.wait()

    def best(self) -> CheckpointRecord | None:
        """The record of the best checkpoint, the one :meth:`restore_best` loads; None if none.

        The committed checkpoint with the best value of the policy's monitor (earliest step on
        a tie; NaN, infinite and missing values never count); without a policy, by the store's
        monitor.

        Raises:
            ValueError: there is neither a policy nor a store monitor to rank by.
        """
        self.store.wait()
        return self._best_record(self.store.records())

    def restore_best(self) -> CheckpointRecord:
        """Load the best checkpoint into the state and return its record.

        The best is the committed checkpoint with the best value of the policy's monitor
        (earliest step on a tie), whatever ``min_delta``, ``baseline`` or ``warmup`` say about
        stopping; without a policy, the store's best by its monitor. The policy itself is left
        as it is.

        Raises:
            CheckpointNotFoundError: no committed checkpoint has a finite monitored value.
        """
        best = self.best()
        if best is None:
            monitor = self.policy.monitor if self.policy is not None else self.store.monitor
            raise CheckpointNotFoundError(
                f"{self.store.root}: no committed checkpoint has a finite {monitor!r} metric, "
                "so there is no best checkpoint to restore"
            )
        return self._restore(best.step, fallback=False)

    def _restore(self, step: StepSelector, *, fallback: bool) -> CheckpointRecord:
        """Load a checkpoint into the state; return its record."""
        if self._restore_hook is not None:
            return self._restore_hook(step, fallback)
        loaded = self.store.load_checkpoint(step, fallback=fallback)
        self._load_state(loaded.state, loaded.record)
        return loaded.record

    def _rank_within(self, first: int, last: int | None = None) -> None:
        """Count only steps ``first`` to ``last`` (inclusive) for the best, e.g. one stage.

        For adapters that run several training stages on one store, whose states differ (an
        optimizer replaced between stages): the best of a stage is the one to restore.
        """
        self._best_window = (first, last)
        if self.policy is not None:
            best = self._best_record(self.store.records())
            self._best = None if best is None else (self._value(best), best.step)
            self._protect_best()

    def _saved_policy_state(self, record: CheckpointRecord) -> Any:
        own = record.metadata.get(RESERVED_METADATA_KEY)
        if own is None:
            return None
        if not isinstance(own, Mapping):
            raise CorruptCheckpointError(
                f"{self.store.root}: metadata key {RESERVED_METADATA_KEY!r} of step {record.step} "
                f"holds a {type(own).__name__}, not ckptkit's state; that key is reserved, so "
                "save such values under another key"
            )
        return own.get("policy")

    def _best_record(self, records: list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.policy is not None:
            ranking = RetentionPolicy(monitor=self.policy.monitor, mode=self.policy.mode)
        elif self.store.monitor is not None:
            ranking = RetentionPolicy(monitor=self.store.monitor, mode=self.store.mode)
        else:
            raise ValueError(
                f"{self.store.root}: without a policy or a store monitor there is no best "
                "checkpoint; pass a StoppingPolicy, or open the store with monitor=..."
            )
        first, last = self._best_window
        ranked = ranking.best(
            [r for r in records if r.step >= first and (last is None or r.step <= last)]
        )
        return ranked[0] if ranked else None

    def _value(self, record: CheckpointRecord) -> float:
        assert self.policy is not None
        return float(record.metrics[self.policy.monitor])

    def _is_new_best(self, metrics: Mapping[str, Any] | None) -> bool:
        """True if ``metrics`` holds a finite monitored value better than any saved before."""
        if self.policy is None or metrics is None or self.policy.monitor not in metrics:
            return False
        try:
            value = float(metrics[self.policy.monitor])
        except (TypeError, ValueError):
            return False
        if not math.isfinite(value):
            return False
        if self._best is None:
            return True
        return value < self._best[0] if self.policy.mode == "min" else value > self._best[0]

    def _protect_best(self) -> None:
        best = self._best[1] if self._best is not None else None
        if best == self._best_protected:
            return
        if self._best_protected is not None:
            self.store.unprotect(self._best_protected)
        self._best_protected = best
        if best is not None:
            self.store.protect(best)

    def _state_dict(self) -> Any:
        if isinstance(self.state, Mapping):
            return {name: obj.state_dict() for name, obj in self.state.items()}
        return self.state.state_dict()

    def _load_state(self, tree: Any, record: CheckpointRecord) -> None:
        if not isinstance(self.state, Mapping):
            self.state.load_state_dict(tree)
            return
        if not isinstance(tree, Mapping):
            raise ValueError(
                f"step {record.step}: the checkpoint's state is not a dict of named parts"
            )
        missing = sorted(set(self.state) - set(tree))
        unexpected = sorted(set(tree) - set(self.state))
        if missing or unexpected:
            raise ValueError(
                f"step {record.step}: the checkpoint's parts do not match the state's: missing "
                f"{missing}, unexpected {unexpected}; pass the same names as when it was saved"
            )
        for name, obj in self.state.items():
            obj.load_state_dict(tree[name])


def _check_stateful(obj: object, where: str) -> None:
    if not (
        callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    ):
        raise TypeError(
            f"{where} is a {type(obj).__name__}, which has no state_dict()/load_state_dict(); "
            "wrap it in an object that has both"
        )
