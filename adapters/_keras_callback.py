"""CheckpointCallback: resume, checkpoint, stop early and restore the best inside ``model.fit``.

One ``keras.callbacks.Callback`` does what ``EarlyStopping``, ``ModelCheckpoint`` and
``BackupAndRestore`` do together, through the core :class:`~ckptkit.Checkpointer`: the whole
training state (``KerasState``: every model variable, the optimizer's variables, the Keras RNG)
and the stopping policy's counters are saved in each checkpoint, so a restarted ``fit`` stops
at the epoch the uninterrupted one would have, with the same weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import keras  # type: ignore[import-untyped,unused-ignore]

from ckptkit._checkpointer import Checkpointer
from ckptkit._errors import MissingMetricError
from ckptkit._policy import Decision, StoppingPolicy
from ckptkit._record import CheckpointRecord
from ckptkit._store import CheckpointStore

from ._keras_build import build_config, signature
from ._keras_logs import missing_message, never_validated_message, numeric, validation_skipped
from ._keras_resume import FIT_METADATA_KEY, next_epoch, start
from ._keras_state import KerasState

__all__ = ["CheckpointCallback"]


class CheckpointCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Checkpoint ``model.fit`` with exact resume, early stopping and best-k retention.

    Why: Keras's ``EarlyStopping`` forgets its counters when the process dies, and
    ``ModelCheckpoint`` saves weights without the optimizer or RNG; a restarted run then
    neither continues nor stops as the uninterrupted one would. This callback saves both in
    every checkpoint, atomically, and resumes them when ``fit`` starts.

    In ``fit``:

    - ``set_model``: builds ``checkpointer``, a :class:`~ckptkit.Checkpointer` over the store,
      the policy and ``KerasState(model, model.optimizer)``;
    - ``on_train_begin``: resumes the latest checkpoint (state and policy) and makes ``fit``
      start at the epoch after it, as ``BackupAndRestore`` does; a run that had already
      stopped trains no further epoch. A model that is not built yet (a subclassed model
      before its first call) is first built from the input shapes the checkpoint recorded.
      A fit whose optimizer differs from the checkpoint's (another class, or other trainable
      variables: layers unfrozen and the model compiled again) starts a new training stage
      instead, with a :class:`NewStageWarning` (see the Keras tutorial for the rule);
    - ``on_epoch_end``: reads the policy's monitor from ``logs``, observes it, saves with every
      numeric log as metrics, applies the store's retention, and sets
      ``model.stop_training`` when the policy says stop. An epoch whose logs hold no
      validation metric at all (``fit(validation_freq=2)`` skips it) is not observed by a
      ``val_`` policy: it is saved as a resume point, and patience counts observations, as in
      Keras' ``EarlyStopping``;
    - ``on_train_end``: with ``restore_best_weights``, loads the best checkpoint.

    Steps: with ``save_freq="epoch"`` a checkpoint's step is its epoch (0-based, as Keras
    counts). With ``save_freq=N``, saves come every ``N`` batches counted across epochs, as
    Keras' ``ModelCheckpoint(save_freq=N)`` counts them (``steps_per_execution`` included;
    the count survives restarts), and also at each epoch's end, where the policy observes; a
    save due at an epoch's last batch is that epoch-end save. Steps then count batches: the
    checkpoint taken after ``k`` batches have been trained since the run began has step
    ``k - 1`` (so the policy's ``warmup`` and ``best_step`` count batches too). A run resumed
    from a checkpoint taken inside an epoch restarts that epoch from its first batch with the
    saved weights, as Keras's ``BackupAndRestore`` does, so it is not bit-identical to an
    uninterrupted run; a run resumed from an epoch's end is.

    Args:
        store: where checkpoints go (its ``keep_last``/``keep_best`` apply after each save).
        policy: the stopping rule (Keras ``EarlyStopping``'s monitor, mode, patience,
            min_delta, baseline, start_from_epoch as ``warmup``), or None to only save.
        restore_best_weights: at the end of ``fit``, load the best checkpoint's state.
        save_best_only: save only epochs whose monitored value is the best so far in this
            training stage (``min_delta`` aside, as Keras' ``ModelCheckpoint`` decides).
        save_weights_only: save the model's variables only (no optimizer, no RNG): smaller,
            but a resumed run is not exact.
        save_freq: ``"epoch"``, or an int N to also save every N batches.
        initial_value_threshold: with ``save_best_only``, save only values better than this
            (Keras ``ModelCheckpoint``); it does not change when the policy stops.

    Raises:
        ValueError: an option is invalid, or it needs a policy and there is none.

    Example:
        >>> store = CheckpointStore("run", keep_last=2, keep_best=1, monitor="val_loss")
        >>> policy = StoppingPolicy(monitor="val_loss", patience=3)
        >>> callback = CheckpointCallback(store, policy, restore_best_weights=True)
        >>> model.fit(x, y, validation_data=(xv, yv), epochs=50, callbacks=[callback])
    """

    def __init__(
        self,
        store: CheckpointStore,
        policy: StoppingPolicy | None = None,
        *,
        restore_best_weights: bool = False,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        save_freq: Literal["epoch"] | int = "epoch",
        initial_value_threshold: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(store, CheckpointStore):
            raise TypeError(f"store must be a ckptkit CheckpointStore, got {type(store).__name__}")
        if policy is not None and not isinstance(policy, StoppingPolicy):
            raise TypeError(f"policy must be a StoppingPolicy or None, got {type(policy).__name__}")
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(f'save_freq must be "epoch" or an int >= 1, got {save_freq!r}')
        if policy is None and (save_best_only or initial_value_threshold is not None):
            raise ValueError(
                "save_best_only and initial_value_threshold need a policy to say what an "
                "improvement is; pass policy=StoppingPolicy(monitor=...)"
            )
        if restore_best_weights and policy is None and store.monitor is None:
            # Found here rather than after a whole fit: without either there is no best.
            raise ValueError(
                "restore_best_weights=True needs a policy or a store with a monitor to say which "
                "checkpoint is best; pass policy=StoppingPolicy(monitor=...) or "
                "CheckpointStore(root, monitor=...)"
            )
        if initial_value_threshold is not None and not save_best_only:
            raise ValueError(
                "initial_value_threshold applies only with save_best_only=True (as in Keras's "
                "ModelCheckpoint); pass save_best_only=True too"
            )
        self.store = store
        self.policy = policy
        self.restore_best_weights = bool(restore_best_weights)
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq
        self.initial_value_threshold = (
            None if initial_value_threshold is None else float(initial_value_threshold)
        )
        #: The core checkpointer; None until Keras calls ``set_model``.
        self.checkpointer: Checkpointer | None = None
        #: The decision of the last ``on_epoch_end``; None before the first.
        self.last_decision: Decision | None = None
        #: The record ``on_train_end`` restored; None until it has.
        self.best_record: CheckpointRecord | None = None
        self._epoch = 0
        self._batches = 0  # batches trained since the run began (across restarts)
        self._since_save = 0  # batches since the last save_freq=N save, as ModelCheckpoint counts
        self._batch_due = False  # a save_freq=N save is due before the next batch
        self._batch_begin = 0
        self._batch_logs: dict[str, float] = {}
        self._unobserved: list[int] = []  # epochs a val_ policy could not observe, this fit
        self._observed = False
        self._previous_stages: list[dict[str, Any]] = []  # before this fit's stage
        self._replayed = False  # this fit's stage was over: it trained nothing

    def __repr__(self) -> str:
        return (
            f"CheckpointCallback({self.store!r}, {self.policy!r}, "
            f"save_freq={self.save_freq!r}, save_best_only={self.save_best_only!r})"
        )

    @property
    def initial_epoch(self) -> int:
        """The epoch to pass to ``model.fit(initial_epoch=...)``: the one after the latest save.

        Needs only the store, so it can be read before ``fit``; 0 when the store is empty.
        ``fit`` starts there even without it (``on_train_begin`` tells Keras).
        """
        return next_epoch(self.store.latest())

    def set_model(self, model: Any) -> None:
        """Keep the model and build the checkpointer over its state (Keras calls this)."""
        super().set_model(model)
        optimizer = None if self.save_weights_only else getattr(model, "optimizer", None)
        state = KerasState(model, optimizer, rng=not self.save_weights_only)
        self.checkpointer = Checkpointer(self.store, self.policy, state)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        """Resume (or replay, or start a new stage) and make ``fit`` start at the right epoch.

        Raises:
            ConfigMismatchError: the model is not built and the checkpoint does not say how
                to build it, or the checkpoint does not fit the model (nothing is changed).
            ValueError: a new stage would start after ``fit``'s last epoch.
        """
        ckpt = self._checkpointer()
        self.last_decision = None
        self.best_record = None
        self._batch_due = False
        self._unobserved = []
        self._observed = False
        self.store.wait()
        begun = start(ckpt, self.model, int(self.params.get("epochs") or 0))
        self._batches, self._since_save = begun.batches, begun.since_save
        self._previous_stages, self._replayed = begun.previous_stages, begun.replayed
        # Keras's own BackupAndRestore resumes fit this way; fit reads it after this event.
        self.model._initial_epoch = begun.epoch or None

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Remember the epoch, for the metadata of saves inside it."""
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Make the save ``save_freq=N`` made due at the previous batch's end.

        Saving at the start of the next batch (the same state as the end of the previous one)
        leaves an epoch's last batch to the epoch-end save, which also records the policy.
        """
        self._batch_begin = batch
        if self._batch_due:
            self._batch_due = False
            # On JAX, fit holds the variables' values apart from the model between epochs'
            # ends; Callback.model puts them back (jax_state_sync) before the state is read.
            self.model  # noqa: B018
            self._checkpointer().save(
                self._batches - 1, self._batch_logs, metadata=self._where(batch=batch)
            )

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Count the batches trained; with ``save_freq=N``, see whether a save is due.

        Keras' ModelCheckpoint counts batches since its last save across epochs (several per
        call with ``steps_per_execution``) and saves once the count reaches N, then counts
        from zero; this does the same.
        """
        trained = batch - self._batch_begin + 1
        self._batches += trained
        if self.save_freq == "epoch" or self.save_best_only:
            return
        self._batch_logs = numeric(logs)
        self._since_save += trained
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._batch_due = True

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Observe the monitored metric, save if due, apply retention; stop when told to.

        Raises:
            MissingMetricError: ``logs`` lacks the monitored metric although fit computed
                others of its kind; the message lists the keys there are.
        """
        ckpt = self._checkpointer()
        metrics = numeric(logs)
        step = epoch if self.save_freq == "epoch" else self._batches - 1
        self._batch_due = False  # a save due after the epoch's last batch is this epoch's save
        policy = self.policy
        if policy is None:
            if not self.save_best_only:
                ckpt.save(step, metrics, metadata=self._where(batch=None))
            return
        monitor = policy.monitor
        if monitor not in metrics:
            if not validation_skipped(monitor, metrics):
                raise MissingMetricError(missing_message(monitor, epoch, logs or {}))
            # fit ran no validation this epoch (validation_freq): nothing to observe, but the
            # epoch is still a point to resume from.
            self._unobserved.append(epoch)
            if policy.should_stop:
                self.model.stop_training = True
            elif not self.save_best_only:
                ckpt.save(step, metrics, metadata=self._where(batch=None))
            return
        self._observed = True
        if policy.should_stop:
            self.model.stop_training = True
            return
        decision = policy.observe(metrics[monitor], step=step)
        self.last_decision = decision
        if self._due(monitor, metrics[monitor]):
            ckpt.save(step, metrics, metadata=self._where(batch=None))
        if decision.should_stop:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        """With ``restore_best_weights``, load the best checkpoint's state into the model.

        The best is this training stage's checkpoint with the best monitored value (see
        :meth:`ckptkit.Checkpointer.best`). When there is none (every value was NaN, or none
        beat ``initial_value_threshold``), the weights stay as they are, with a ``UserWarning``.

        Raises:
            MissingMetricError: a ``val_`` policy never had a value to observe, in this fit
                or before it: fit was given no validation data.
        """
        self.model._initial_epoch = None  # Keras keeps it on the model for later fits
        policy = self.policy
        if (
            policy is not None
            and self._unobserved
            and not self._observed
            and policy.state_dict()["observations"] == 0
        ):
            raise MissingMetricError(
                never_validated_message(policy.monitor, self._unobserved, logs or {})
            )
        if not self.restore_best_weights:
            return
        ckpt = self._checkpointer()
        if ckpt.best() is None:
            if self._replayed:
                return  # a stage that is over, its best gone: the later stage's fit resumes its own
            monitor = policy.monitor if policy is not None else self.store.monitor
            warnings.warn(
                f"restore_best_weights: no checkpoint of this training stage in "
                f"{self.store.root} has a finite {monitor!r}, so the model keeps its last weights",
                UserWarning,
                stacklevel=2,
            )
            return
        self.best_record = ckpt.restore_best()

    # -- helpers -----------------------------------------------------------------------------

    def _checkpointer(self) -> Checkpointer:
        if self.checkpointer is None:
            raise RuntimeError(
                "CheckpointCallback has no model yet: pass it to model.fit(callbacks=[...]), "
                "or call set_model(model) first"
            )
        return self.checkpointer

    def _due(self, monitor: str, value: float) -> bool:
        # A new best value (min_delta aside, as ModelCheckpoint(save_best_only=True) sees it)
        # is always saved, so the best checkpoint exists to restore.
        if self._checkpointer()._is_new_best({monitor: value}):
            threshold = self.initial_value_threshold
            if threshold is None or not self.save_best_only:
                return True
            minimize = self.policy is not None and self.policy.mode == "min"
            return value < threshold if minimize else value > threshold
        # Every epoch end otherwise, including the stop (so a restart stays stopped).
        return not self.save_best_only

    def _where(self, *, batch: int | None) -> dict[str, Any]:
        state = self._checkpointer().state
        optimizer = state.optimizer if isinstance(state, KerasState) else None
        here = None if optimizer is None else signature(optimizer, self.model)
        return {
            FIT_METADATA_KEY: {
                "epoch": self._epoch,
                "batch": batch,
                "epoch_end": batch is None,
                "batches": self._batches,
                "since_save": self._since_save,
                "optimizer": here,
                "build": build_config(self.model),
                "previous_stages": self._previous_stages,
            }
        }
