"""A checkpointing callback for training loops driven by ``on_*`` event callbacks.

Many hand-written PyTorch loops call a list of callbacks at fixed events (``on_train_begin``,
``on_epoch_end``, ``on_batch_begin``, ...) and read flags such as ``{"stop_training": True}``
from what they return. :class:`CheckpointCallback` puts a checkpointer into such a loop: it
resumes at the start, saves and decides at the end of each epoch, and restores the best state
at the end. It needs only the core :class:`~ckptkit.Checkpointer` (or a
:class:`~ckptkit.adapters.torch.DistributedCheckpointer`), never torch itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ckptkit._policy import Decision
from ckptkit._record import CheckpointRecord

__all__ = ["CheckpointCallback"]


class _CheckpointerLike(Protocol):
    """What the callback needs: the :class:`~ckptkit.Checkpointer` methods it calls."""

    def resume(self) -> int: ...

    def step(self, step: int, metrics: Mapping[str, Any] | None = None) -> Decision | None: ...

    def restore_best(self) -> CheckpointRecord: ...

    @property
    def should_stop(self) -> bool: ...


class CheckpointCallback:
    """Resume, checkpoint, stop early and restore the best, as a callback of an event loop.

    Why: in a loop built on callbacks, checkpointing is one more callback; the loop only has to
    honour two flags it reads from the return values: ``start_epoch`` after ``on_train_begin``
    and ``stop_training`` after ``on_epoch_end``.

    Every event returns a dict of flags (empty when there is nothing to say):

    - ``on_train_begin()`` resumes from the store's latest checkpoint and returns
      ``{"start_epoch": n}`` (0 on a fresh run), plus ``"stop_training": True`` when the run
      had already stopped before the restart;
    - ``on_epoch_end(epoch, logs)`` passes the epoch's metrics to ``checkpointer.step`` (which
      decides and saves) and returns ``{"stop_training": True}`` when the policy says stop;
    - ``on_train_end()`` loads the best checkpoint into the state when ``restore_best=True``;
    - the batch, loss, backward and optimizer-step events do nothing.

    Args:
        checkpointer: a :class:`~ckptkit.Checkpointer`, or anything with its ``resume``,
            ``step``, ``restore_best`` and ``should_stop``.
        restore_best: load the best checkpoint at ``on_train_end`` (Keras
            ``EarlyStopping(restore_best_weights=True)``).

    Example:
        >>> callback = CheckpointCallback(Checkpointer(store, policy, state), restore_best=True)
        >>> start = callback.on_train_begin()["start_epoch"]
        >>> for epoch in range(start, 100):
        ...     train_one_epoch()
        ...     if callback.on_epoch_end(epoch, {"val_loss": evaluate()}).get("stop_training"):
        ...         break
        >>> callback.on_train_end()
    """

    def __init__(self, checkpointer: _CheckpointerLike, *, restore_best: bool = False) -> None:
        for name in ("resume", "step", "restore_best"):
            if not callable(getattr(checkpointer, name, None)):
                raise TypeError(
                    f"checkpointer is a {type(checkpointer).__name__}, which has no {name}(); "
                    "pass a ckptkit Checkpointer"
                )
        self.checkpointer = checkpointer
        self.restore_best = restore_best
        #: The decision of the last ``on_epoch_end``; None before the first.
        self.last_decision: Decision | None = None
        #: The record ``on_train_end`` restored; None until it has.
        self.best_record: CheckpointRecord | None = None

    def __repr__(self) -> str:
        return (
            f"CheckpointCallback({type(self.checkpointer).__name__}, "
            f"restore_best={self.restore_best!r})"
        )

    def on_train_begin(self, **kwargs: Any) -> dict[str, Any]:
        """Resume from the latest checkpoint; return ``{"start_epoch": n}``.

        The state and the policy's counters come back from the checkpoint; ``n`` is the epoch
        after it, 0 when the store is empty. When the resumed run had already stopped, the
        flags also hold ``"stop_training": True``, so the loop ends without training again.
        """
        flags: dict[str, Any] = {"start_epoch": self.checkpointer.resume()}
        if self.checkpointer.should_stop:
            flags["stop_training"] = True
        return flags

    def on_epoch_end(
        self, epoch: int, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Observe the epoch's metrics, save if due; return ``{"stop_training": True}`` to stop.

        Args:
            epoch: the epoch that just ended (the checkpoint's step).
            logs: the epoch's metrics by name; the policy's monitor must be among them.

        Returns:
            ``{"stop_training": True}`` when the policy says stop, else ``{}``.

        Raises:
            MissingMetricError: ``logs`` lacks the monitored metric (the message lists those
                present).
        """
        self.last_decision = self.checkpointer.step(epoch, logs)
        return {"stop_training": True} if self.checkpointer.should_stop else {}

    def on_train_end(self, **kwargs: Any) -> dict[str, Any]:
        """With ``restore_best=True``, load the best checkpoint into the state.

        Raises:
            CheckpointNotFoundError: ``restore_best`` is set and no saved epoch has a finite
                monitored value (every value was NaN, say), so there is no best to load.
        """
        if self.restore_best:
            self.best_record = self.checkpointer.restore_best()
        return {}

    # The events below are part of the callback interface; checkpointing has nothing to do there.

    def on_epoch_begin(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_batch_begin(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_batch_end(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_loss_begin(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_loss_end(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_backward_begin(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_backward_end(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_step_begin(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}

    def on_step_end(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do nothing."""
        return {}
