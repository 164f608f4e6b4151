"""Retention: which committed checkpoints to keep, as a pure function of their records.

The store asks :meth:`RetentionPolicy.select` for a :class:`RetentionPlan` after each commit and
deletes what the plan drops. Nothing here touches disk, so the rules can be tested exhaustively and
a second process that reads the same manifest reaches the same answer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from types import MappingProxyType
from typing import Literal

from ckptkit._record import CheckpointRecord

#: The reasons a step can be kept, in the order they appear in :attr:`RetentionPlan.reasons`.
REASONS = ("last", "best", "every", "all", "pinned", "protected", "newest")


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    """What retention decided for one set of records.

    Attributes:
        keep: the steps to keep.
        delete: the steps to delete, ascending. ``keep`` and ``delete`` are disjoint and together
            hold every step that was given.
        reasons: for each kept step, every rule that keeps it, in the order of :data:`REASONS`.
    """

    keep: frozenset[int]
    delete: tuple[int, ...]
    reasons: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))


def _check_count(name: str, value: int | None, *, least: int) -> None:
    if value is None:
        return
    # bool is an int subclass; keep_last=True is almost surely a mistake, not "keep one".
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least} or None, got {value}")


def _by_step(records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    ordered = sorted(records, key=lambda r: r.step)
    for earlier, later in pairwise(ordered):
        if earlier.step == later.step:
            raise ValueError(
                f"step {later.step} appears twice in the records given to retention "
                f"(directories {earlier.directory!r} and {later.directory!r}); "
                "each step must have one committed checkpoint"
            )
    return ordered


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which checkpoints to keep: the newest, the best by a metric, and every n-th step.

    The rules are a union: a checkpoint survives if any rule keeps it. With no rule set, every
    checkpoint is kept. Pinned checkpoints, the steps passed as ``protected`` and the newest step
    are always kept, so retention can never delete the checkpoint a run would resume from.

    Attributes:
        keep_last: keep the ``keep_last`` highest steps; ``0`` keeps none by this rule.
        keep_best: keep the ``keep_best`` best checkpoints by ``monitor``; ``0`` keeps none by
            this rule. A checkpoint whose metric is missing, NaN or infinite is never among the
            best; of equal values the earlier step ranks first.
        monitor: the metric name ranked by ``keep_best`` and :meth:`best`.
        mode: ``"min"`` (lower is better) or ``"max"``; resolve ``"auto"`` beforehand with
            the monitor's name (the store does).
        keep_every: keep every step that is a multiple of ``keep_every`` (step 0 included).

    Raises:
        TypeError: a count is not an int (``bool`` counts as not an int).
        ValueError: a count is negative, ``keep_every`` is 0, ``keep_best`` is at least 1
            without a ``monitor``, or ``mode`` is neither ``"min"`` nor ``"max"``.

    Example:
        >>> policy = RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")
        >>> policy.select([]).keep
        frozenset()
    """

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        _check_count("keep_last", self.keep_last, least=0)
        _check_count("keep_best", self.keep_best, least=0)
        _check_count("keep_every", self.keep_every, least=1)
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(
                f"monitor must be a non-empty metric name or None, got {self.monitor!r}"
            )
        if self.keep_best and self.monitor is None:
            raise ValueError(
                f"keep_best={self.keep_best} needs a metric to rank by; "
                'pass monitor="<metric name>" (for example monitor="val_loss")'
            )
        if self.mode not in ("min", "max"):
            raise ValueError(
                f'mode must be "min" or "max", got {self.mode!r}; '
                'resolve "auto" first with the monitor name, or pass the direction explicitly'
            )

    def best(self, records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
        """Rank the records by ``monitor``, best first.

        Records whose metric is missing, NaN or infinite are left out: a diverged run must never
        become the "best" checkpoint. Equal values rank by step, earlier first, so the first
        checkpoint to reach a value stays best when a later one merely matches it.

        Args:
            records: committed checkpoints, in any order.

        Returns:
            The records with a finite ``monitor`` value, best first.

        Raises:
            ValueError: the policy has no ``monitor``, or a step appears twice.

        Example:
            >>> from ckptkit import CheckpointRecord
            >>> recs = [CheckpointRecord(step=s, metrics={"loss": v}, created=0.0,
            ...                          directory=f"step_{s}") for s, v in [(1, 0.5), (2, 0.2)]]
            >>> [r.step for r in RetentionPolicy(monitor="loss").best(recs)]
            [2, 1]
        """
        monitor = self.monitor
        if monitor is None:
            raise ValueError(
                'ranking checkpoints needs a metric; create the policy with monitor="<metric name>"'
            )
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [(value, r) for r in _by_step(records) if (value := r.metric(monitor)) is not None]
        # sorted() is stable and the input is in step order, so ties keep the earlier step first.
        scored.sort(key=lambda pair: sign * pair[0])
        return [r for _, r in scored]

    def select(
        self, records: Sequence[CheckpointRecord], *, protected: Collection[int] = ()
    ) -> RetentionPlan:
        """Decide which of ``records`` to keep and which to delete.

        The result depends only on the set of records, never on their order, and the input is
        not modified. Steps in ``protected`` that match no record are ignored.

        Args:
            records: every committed checkpoint of the store, in any order.
            protected: steps that must survive, such as the checkpoint this process resumed
                from and the one the stopping policy considers best.

        Returns:
            The plan: kept steps with their reasons, and the steps to delete in ascending order.

        Raises:
            ValueError: a step appears twice in ``records``.

        Example:
            >>> from ckptkit import CheckpointRecord
            >>> recs = [CheckpointRecord(step=s, created=0.0, directory=f"step_{s}")
            ...         for s in (10, 20, 30)]
            >>> RetentionPolicy(keep_last=1).select(recs).delete
            (10, 20)
        """
        ordered = _by_step(records)
        if not ordered:
            return RetentionPlan(keep=frozenset(), delete=())
        hits: dict[str, set[int]] = {reason: set() for reason in REASONS}
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            hits["all"] = {r.step for r in ordered}
        if self.keep_last:
            hits["last"] = {r.step for r in ordered[-self.keep_last :]}
        if self.keep_best:
            hits["best"] = {r.step for r in self.best(ordered)[: self.keep_best]}
        if self.keep_every is not None:
            hits["every"] = {r.step for r in ordered if r.step % self.keep_every == 0}
        hits["pinned"] = {r.step for r in ordered if r.pinned}
        wanted = set(protected)
        hits["protected"] = {r.step for r in ordered if r.step in wanted}
        hits["newest"] = {ordered[-1].step}

        reasons: dict[int, tuple[str, ...]] = {}
        delete: list[int] = []
        for r in ordered:
            why = tuple(reason for reason in REASONS if r.step in hits[reason])
            if why:
                reasons[r.step] = why
            else:
                delete.append(r.step)
        return RetentionPlan(keep=frozenset(reasons), delete=tuple(delete), reasons=reasons)
