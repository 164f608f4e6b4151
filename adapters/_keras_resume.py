"""Where a ``model.fit`` resumes: the metadata each checkpoint keeps, and training stages.

Each checkpoint ``CheckpointCallback`` saves records, under the metadata key ``"keras_fit"``,
its place in ``fit`` and what a restarted process needs before it can load it:

- ``epoch``, ``batch`` (None at an epoch's end), ``epoch_end``: where in fit it was taken;
- ``batches``: batches trained since the run began, and ``since_save``: batches since the
  last save ``save_freq=N`` asked for (both count on across restarts and stages);
- ``optimizer``: the optimizer's class, variable count and a digest of their shapes and
  dtypes (:func:`ckptkit.adapters._keras_build.signature`), which marks the training stage,
  and ``previous_stages``: each earlier stage's signature and last step (so the latest
  checkpoint tells the whole history, whatever retention deleted);
- ``build``: the input shapes the model was built with, to build an unbuilt (subclassed)
  model the same way before loading.

A *stage* is the run of checkpoints made with one optimizer signature: fit, unfreeze layers,
compile with a new optimizer and fit again on the same store, and the second fit is a new
stage. When a fit starts, its optimizer's signature decides (:func:`plan`):

- the latest checkpoint's (or the latest has none, as before this metadata): resume it;
- an earlier stage's: that stage is over (a restarted script runs its fits again, in order);
  load its last checkpoint if retention kept one, and train nothing;
- no stage's: a new stage, after the latest checkpoint.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptkit._checkpointer import RESERVED_METADATA_KEY, Checkpointer
from ckptkit._errors import CorruptCheckpointError
from ckptkit._policy import StoppingPolicy
from ckptkit._record import CheckpointRecord

from ._keras_build import build_model, build_optimizer, signature
from ._keras_convert import to_numpy
from ._keras_state import KerasState

logger = logging.getLogger("ckptkit")

#: Metadata key of each checkpoint's place in ``fit`` (see the module docstring).
FIT_METADATA_KEY = "keras_fit"


class NewStageWarning(UserWarning):
    """A fit's optimizer differs from the latest checkpoint's: a new training stage starts.

    The model keeps its weights, the optimizer starts fresh, the stopping policy starts over
    and the epochs are numbered on after the latest checkpoint. Filter it (``warnings``) where
    stages are intended, e.g. ``warnings.simplefilter("ignore", NewStageWarning)``.
    """


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What ``on_train_begin`` does with the store: one of three, with the record it concerns.

    ``"resume"``: load the latest checkpoint (``record``). ``"replay"``: this optimizer's stage
    is over, a later stage followed; load its last checkpoint ``record`` (None when retention
    deleted them all) and train nothing. ``"new_stage"``: start a new stage after ``record``
    (the latest), loading nothing. ``first_step`` and ``last_step`` bound the steps of the
    stage the fit belongs to (``last_step`` None: open-ended): its best checkpoint is ranked
    among those only, since another stage's state does not fit this fit's optimizer.
    """

    action: Literal["resume", "replay", "new_stage"]
    record: CheckpointRecord | None
    first_step: int = 0
    last_step: int | None = None


@dataclass(frozen=True, kw_only=True)
class Start:
    """Where a fit starts, and the counts it carries on from the checkpoint it starts after."""

    epoch: int = 0
    batches: int = 0
    since_save: int = 0
    previous_stages: list[dict[str, Any]] = field(default_factory=list)
    replayed: bool = False


def start(ckpt: Checkpointer, model: Any, epochs: int) -> Start:
    """Bring the model, optimizer and policy to where ``fit`` goes on, and say where that is.

    Builds an unbuilt model from the latest checkpoint's input shapes and the optimizer as
    fit builds it, then resumes, replays or starts a new stage as :func:`plan` decides.

    Args:
        ckpt: the callback's checkpointer (its state a :class:`KerasState`).
        model: the model ``fit`` trains.
        epochs: ``fit``'s ``epochs``.

    Raises:
        ConfigMismatchError: the model cannot be built, or the checkpoint does not fit it.
        ValueError: a new stage would start after ``fit``'s last epoch.
    """
    store, state = ckpt.store, ckpt.state
    assert isinstance(state, KerasState)
    records = store.records()
    if not records:
        return Start()
    latest = records[-1]
    build_model(
        model,
        fit_metadata(latest).get("build"),
        f"CheckpointCallback: {store.root}, step {latest.step}",
    )
    here = None
    if state.optimizer is not None:
        build_optimizer(state.optimizer, model, f"CheckpointCallback: {store.root}")
        here = signature(state.optimizer, model)
    decided = plan(records, here)
    # The best of this fit is its stage's: rank only that stage's checkpoints.
    ckpt._rank_within(decided.first_step, decided.last_step)
    if decided.action == "new_stage":
        assert here is not None
        first = next_epoch(latest)
        if first >= epochs:
            raise ValueError(too_few_epochs_message(store.root, latest, here, first, epochs))
        if ckpt.policy is not None:
            reset_policy(ckpt.policy)
        saved = fit_metadata(latest).get("optimizer") or {}
        warnings.warn(
            NewStageWarning(new_stage_message(store.root, latest, saved, here, first)),
            stacklevel=3,
        )
        batches, since = counters(latest, 0)
        return Start(epoch=first, batches=batches, since_save=since, previous_stages=ended(latest))
    if decided.action == "replay":
        log_replay(store.root, decided.record)
        if decided.record is not None:
            loaded = store.load_checkpoint(decided.record.step)
            state._load(loaded.state, f"{store.root}, step {loaded.record.step}")
            saved_policy = saved_policy_state(loaded.record, store.root)
            if ckpt.policy is not None and saved_policy is not None:
                ckpt.policy.load_state_dict(saved_policy)
            ckpt.resumed_from = loaded.record
        return Start(epoch=epochs, replayed=True)  # this stage is over: train nothing
    ckpt.resume()
    ckpt._rank_within(decided.first_step, decided.last_step)  # resume ranked every stage
    record = ckpt.resumed_from
    assert record is not None
    iterations = 0 if state.optimizer is None else int(to_numpy(state.optimizer.iterations))
    batches, since = counters(record, iterations)
    first = next_epoch(record)
    if ckpt.should_stop:
        first = max(first, epochs)  # train no further epoch
    return Start(
        epoch=first, batches=batches, since_save=since, previous_stages=previous_stages(record)
    )


def fit_metadata(record: CheckpointRecord) -> Mapping[str, Any]:
    """The ``"keras_fit"`` metadata of a checkpoint; empty when it has none."""
    found = record.metadata.get(FIT_METADATA_KEY)
    return found if isinstance(found, Mapping) else {}


def plan(records: Sequence[CheckpointRecord], optimizer: Mapping[str, Any] | None) -> Plan:
    """Decide how a fit with this optimizer ``signature`` starts on a non-empty store.

    Args:
        records: the store's checkpoints, oldest first.
        optimizer: the signature of the fit's optimizer, or None when the state has none
            (``save_weights_only``): then the latest is always resumed.
    """
    latest = records[-1]
    stages = previous_stages(latest)
    ends = [_after(s["last_step"]) for s in stages]  # the first step after each stage
    saved = fit_metadata(latest).get("optimizer")
    if optimizer is None or saved is None or saved == optimizer:
        return Plan(action="resume", record=latest, first_step=ends[-1] if ends else 0)
    by_step = {r.step: r for r in records}
    for i in reversed(range(len(stages))):
        if stages[i]["optimizer"] == optimizer:
            last = stages[i]["last_step"]
            return Plan(
                action="replay",
                record=by_step.get(last),
                first_step=ends[i - 1] if i > 0 else 0,
                last_step=last if isinstance(last, int) else None,
            )
    return Plan(action="new_stage", record=latest, first_step=latest.step + 1)


def _after(step: object) -> int:
    return step + 1 if isinstance(step, int) and not isinstance(step, bool) else 0


def previous_stages(record: CheckpointRecord) -> list[dict[str, Any]]:
    """The stages before ``record``'s, oldest first: each one's signature and last step."""
    history = fit_metadata(record).get("previous_stages")
    if not isinstance(history, list):
        return []
    return [
        {"optimizer": s.get("optimizer"), "last_step": s.get("last_step")}
        for s in history
        if isinstance(s, Mapping)
    ]


def ended(record: CheckpointRecord) -> list[dict[str, Any]]:
    """The stage history after ``record``'s stage ended at it: a new stage starts next."""
    return [
        *previous_stages(record),
        {"optimizer": fit_metadata(record).get("optimizer"), "last_step": record.step},
    ]


def next_epoch(record: CheckpointRecord | None) -> int:
    """The epoch ``fit`` continues at after ``record``: the next one, or its own if mid-epoch."""
    if record is None:
        return 0
    where = fit_metadata(record)
    if isinstance(where.get("epoch"), int):
        return int(where["epoch"]) + (1 if where.get("epoch_end", True) else 0)
    return record.step + 1


def counters(record: CheckpointRecord, fallback_batches: int) -> tuple[int, int]:
    """Batches trained, and batches since the last ``save_freq=N`` save, at ``record``.

    ``fallback_batches`` (the optimizer's iteration count) stands in for checkpoints saved
    before the callback recorded batches.
    """
    where = fit_metadata(record)
    batches = where.get("batches")
    since = where.get("since_save")
    return (
        batches if isinstance(batches, int) else fallback_batches,
        since if isinstance(since, int) else 0,
    )


def saved_policy_state(record: CheckpointRecord, root: object) -> Any:
    """The stopping policy's state saved with ``record`` by the core Checkpointer, or None.

    Raises:
        CorruptCheckpointError: the reserved metadata key holds something else.
    """
    own = record.metadata.get(RESERVED_METADATA_KEY)
    if own is None:
        return None
    if not isinstance(own, Mapping):
        raise CorruptCheckpointError(
            f"{root}: metadata key {RESERVED_METADATA_KEY!r} of step {record.step} holds a "
            f"{type(own).__name__}, not ckptkit's state"
        )
    return own.get("policy")


def reset_policy(policy: StoppingPolicy) -> None:
    """Put a policy back to its state before any observation, keeping its options."""
    fresh = dict(policy.state_dict())
    fresh.update(
        best=None,
        best_step=None,
        wait=0,
        observations=0,
        stopped=False,
        stop_step=None,
        stop_reason=None,
    )
    policy.load_state_dict(fresh)


def new_stage_message(
    root: object,
    latest: CheckpointRecord,
    saved: Mapping[str, Any],
    here: Mapping[str, Any],
    start: int,
) -> str:
    """The :class:`NewStageWarning` text: what differs and what the new stage keeps."""
    return (
        f"{root}: this fit's optimizer ({_describe(here)}) is not the one the latest "
        f"checkpoint (step {latest.step}) was saved with ({_describe(saved)}), so a new "
        f"training stage starts at epoch {start}: the model keeps the weights it has now "
        "(nothing is loaded from the store), the optimizer starts fresh and the stopping "
        "policy starts over. To resume that checkpoint instead, compile with the optimizer "
        "it was saved with, over the same trainable variables"
    )


def too_few_epochs_message(
    root: object, latest: CheckpointRecord, here: Mapping[str, Any], start: int, epochs: int
) -> str:
    """The error for a new stage that ``fit(epochs=...)`` would end before it starts."""
    return (
        f"{root}: this fit's optimizer ({_describe(here)}) starts a new training stage after "
        f"the latest checkpoint (step {latest.step}), at epoch {start}, but fit(epochs={epochs}) "
        f"ends before that epoch: the stages of one store number their epochs on, as "
        f"fit(initial_epoch=...) does; pass epochs={start} plus this stage's epochs"
    )


def _describe(signature: Mapping[str, Any]) -> str:
    return f"{signature.get('class')} with {signature.get('variables')} variables"


def log_replay(root: object, record: CheckpointRecord | None) -> None:
    """Say that a fit found its stage over and trains nothing (a warning if nothing loads)."""
    if record is None:
        logger.warning(
            "%s: this fit's optimizer belongs to an earlier training stage, whose checkpoints "
            "retention has deleted; training no epoch, and the model keeps its weights until "
            "the later stage's fit resumes",
            root,
        )
        return
    logger.info(
        "%s: this fit's optimizer belongs to an earlier training stage, which ended at step "
        "%d; loading it and training no epoch",
        root,
        record.step,
    )
