"""CheckpointCallback in a callback-driven PyTorch loop: resume, stop flag, restore best."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import (  # noqa: E402 (after the importorskip)
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointStore,
    MissingMetricError,
    StoppingPolicy,
)
from ckptkit.adapters._torch_hooks import CheckpointCallback  # noqa: E402
from ckptkit.adapters.torch import TorchState  # noqa: E402

EVENTS = (
    "on_epoch_begin",
    "on_batch_begin",
    "on_batch_end",
    "on_loss_begin",
    "on_loss_end",
    "on_backward_begin",
    "on_backward_end",
    "on_step_begin",
    "on_step_end",
)


# -- a callback loop in the style of the article, and the kinds of callbacks it shows ----------


class Callback:
    """The article's callback interface: every event does nothing and returns no flags."""

    def on_train_begin(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_train_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_epoch_begin(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_epoch_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_batch_begin(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_batch_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_loss_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_backward_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_step_begin(self, **kwargs: Any) -> dict[str, Any] | None:
        return None

    def on_step_end(self, **kwargs: Any) -> dict[str, Any] | None:
        return None


class Recorder(Callback):
    """Logs the metrics of every epoch, the article's most basic callback."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.epochs.append((kwargs["epoch"], kwargs["logs"]["val_loss"]))


class LearningRateScheduler(Callback):
    """Sets the learning rate before each batch from the global iteration (a step decay)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def on_batch_begin(self, *, iteration: int, **kwargs: Any) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = 0.01 * 0.5 ** (iteration // 40)


class GradientClipping(Callback):
    """Clips the gradient norm after the backward pass."""

    def __init__(self, model: Any, clip: float) -> None:
        self.model, self.clip = model, clip

    def on_backward_end(self, **kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)


class Task:
    """A noisy regression that overfits after a few epochs: a model, its data and a shuffle."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        data = torch.Generator().manual_seed(2)
        w_true = torch.randn(12, 1, generator=data)
        self.x = torch.randn(16, 12, generator=data)
        self.y = self.x @ w_true + 1.5 * torch.randn(16, 1, generator=data)
        self.x_val = torch.randn(200, 12, generator=data)
        self.y_val = self.x_val @ w_true
        self.shuffle = torch.Generator().manual_seed(1)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(12, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def batches(self) -> list[Any]:
        return list(torch.randperm(16, generator=self.shuffle).reshape(4, 4))

    def val_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(self.model(self.x_val), self.y_val)
        self.model.train()
        return float(loss)

    def state(self) -> Any:
        return TorchState(model=self.model, optimizer=self.optimizer, shuffle=self.shuffle)


def fire(callbacks: list[Any], event: str, **kwargs: Any) -> dict[str, Any]:
    """Call ``event`` on every callback in order and merge the flags they return."""
    flags: dict[str, Any] = {}
    for callback in callbacks:
        flags.update(getattr(callback, event)(**kwargs) or {})
    return flags


def train(task: Task, callbacks: list[Any], epochs: int) -> int:
    """The article's loop with events; returns the number of epochs it trained."""
    start = fire(callbacks, "on_train_begin")
    trained = 0
    if not start.get("stop_training"):
        for epoch in range(start.get("start_epoch", 0), epochs):
            fire(callbacks, "on_epoch_begin", epoch=epoch)
            for i, batch in enumerate(task.batches()):
                fire(callbacks, "on_batch_begin", iteration=epoch * 4 + i)
                loss = torch.nn.functional.mse_loss(task.model(task.x[batch]), task.y[batch])
                fire(callbacks, "on_loss_end", loss=loss)
                task.optimizer.zero_grad()
                loss.backward()
                fire(callbacks, "on_backward_end")
                fire(callbacks, "on_step_begin")
                task.optimizer.step()
                fire(callbacks, "on_step_end")
                fire(callbacks, "on_batch_end")
            trained += 1
            logs = {"val_loss": task.val_loss()}
            if fire(callbacks, "on_epoch_end", epoch=epoch, logs=logs).get("stop_training"):
                break
    fire(callbacks, "on_train_end")
    return trained


def make_run(root: Path, task: Task, *, restore_best: bool = True) -> tuple[Any, ...]:
    """A callback list for ``task``, with a CheckpointCallback over a store at ``root``."""
    store = CheckpointStore(root, keep_last=2, keep_best=1, monitor="val_loss")
    policy = StoppingPolicy(monitor="val_loss", patience=3)
    checkpoint = CheckpointCallback(
        Checkpointer(store, policy, task.state()), restore_best=restore_best
    )
    recorder = Recorder()
    callbacks = [
        LearningRateScheduler(task.optimizer),
        GradientClipping(task.model, clip=5.0),
        recorder,
        checkpoint,
    ]
    return callbacks, recorder, policy, store


def weights(model: Any) -> dict[str, bytes]:
    """The model's parameters as bytes, for bitwise comparison."""
    return {k: v.detach().numpy().tobytes() for k, v in model.state_dict().items()}


def best_val(recorder: Recorder, step: int | None) -> float:
    """The validation loss the recorder logged at ``step``."""
    return dict(recorder.epochs)[step]


# -- tests -----------------------------------------------------------------------------------


def test_loop_stops_on_the_flag_and_restores_the_best(tmp_path: Path) -> None:
    """The loop breaks at the policy's stop epoch and ends holding the best epoch's weights."""
    task = Task()
    callbacks, recorder, policy, store = make_run(tmp_path / "run", task)
    trained = train(task, callbacks, epochs=100)

    replay = StoppingPolicy(monitor="val_loss", patience=3)
    stops = [replay.observe(v, step=e).should_stop for e, v in recorder.epochs]
    assert stops[-1] and not any(stops[:-1])
    assert trained == len(recorder.epochs) < 100
    assert policy.stop_step == recorder.epochs[-1][0]
    assert callbacks[-1].best_record.step == policy.best_step == replay.best_step
    assert task.val_loss() == best_val(recorder, policy.best_step)
    assert store.best() is not None and store.best().step == policy.best_step


def test_resume_after_restart_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    """A run cut short and restarted with new objects on the same store ends bit-identical."""
    task = Task()
    callbacks, recorder, policy, _ = make_run(tmp_path / "whole", task, restore_best=False)
    train(task, callbacks, epochs=100)
    assert policy.stop_step is not None and policy.stop_step > 2

    first = Task()
    callbacks, _, _, _ = make_run(tmp_path / "cut", first, restore_best=False)
    assert train(first, callbacks, epochs=2) == 2  # as if killed during epoch 2

    second = Task()  # a new process: fresh model, optimizer, generators and callbacks
    callbacks, resumed_recorder, resumed_policy, _ = make_run(
        tmp_path / "cut", second, restore_best=False
    )
    train(second, callbacks, epochs=100)

    assert resumed_recorder.epochs == recorder.epochs[2:]
    assert (resumed_policy.stop_step, resumed_policy.best_step) == (
        policy.stop_step,
        policy.best_step,
    )
    assert weights(second.model) == weights(task.model)  # the last epoch's weights, bit for bit


def test_a_stopped_run_restarts_stopped(tmp_path: Path) -> None:
    """After a finished run, a restart gets the stop flag at once and trains no epoch."""
    train(Task(), make_run(tmp_path / "run", Task())[0], epochs=100)
    task = Task()
    callbacks, recorder, policy, _ = make_run(tmp_path / "run", task, restore_best=False)
    flags = callbacks[-1].on_train_begin()
    assert flags == {"start_epoch": policy.stop_step + 1, "stop_training": True}
    assert train(task, callbacks, epochs=100) == 0
    assert recorder.epochs == []


def test_epoch_end_flags_follow_the_policy(tmp_path: Path) -> None:
    """on_epoch_end returns {} until the policy stops, then {"stop_training": True}."""
    task = Task()
    store = CheckpointStore(tmp_path / "run")
    callback = CheckpointCallback(
        Checkpointer(store, StoppingPolicy(monitor="val_loss", patience=2), task.state())
    )
    assert callback.on_train_begin() == {"start_epoch": 0}
    flags = [callback.on_epoch_end(e, {"val_loss": v}) for e, v in enumerate([1.0, 0.5, 0.6, 0.7])]
    assert flags == [{}, {}, {}, {"stop_training": True}]
    assert callback.last_decision is not None and callback.last_decision.best_step == 1
    assert [r.step for r in store.records()] == [0, 1, 2, 3]


def test_epoch_end_accepts_a_0d_tensor_metric(tmp_path: Path) -> None:
    """A 0-d tensor in the logs is taken as its value."""
    task = Task()
    callback = CheckpointCallback(
        Checkpointer(
            CheckpointStore(tmp_path / "run"), StoppingPolicy(monitor="val_loss"), task.state()
        )
    )
    callback.on_epoch_end(0, {"val_loss": torch.tensor(0.25)})
    assert callback.last_decision is not None and callback.last_decision.value == 0.25


def test_epoch_end_without_the_monitored_metric_raises(tmp_path: Path) -> None:
    """Logs without the policy's monitor raise MissingMetricError naming what was there."""
    task = Task()
    callback = CheckpointCallback(
        Checkpointer(
            CheckpointStore(tmp_path / "run"), StoppingPolicy(monitor="val_loss"), task.state()
        )
    )
    with pytest.raises(MissingMetricError, match=r"monitors 'val_loss'.*only \['loss'\]"):
        callback.on_epoch_end(0, {"loss": 1.0})


def test_train_end_restores_only_when_asked(tmp_path: Path) -> None:
    """Without restore_best the trained state is left alone; with it the best epoch comes back."""
    task = Task()
    checkpointer = Checkpointer(
        CheckpointStore(tmp_path / "run"), StoppingPolicy(monitor="val_loss"), task.state()
    )
    bias = task.model[1].bias
    for epoch, val_loss in enumerate([1.0, 2.0]):
        with torch.no_grad():
            bias.fill_(float(epoch))
        CheckpointCallback(checkpointer).on_epoch_end(epoch, {"val_loss": val_loss})
    with torch.no_grad():
        bias.fill_(7.0)

    keep = CheckpointCallback(checkpointer)
    assert keep.on_train_end() == {}
    assert bias.item() == 7.0 and keep.best_record is None
    restore = CheckpointCallback(checkpointer, restore_best=True)
    assert restore.on_train_end() == {}
    assert bias.item() == 0.0
    assert restore.best_record is not None and restore.best_record.step == 0


def test_train_end_without_any_improvement_says_so(tmp_path: Path) -> None:
    """restore_best with only NaN metrics raises CheckpointNotFoundError explaining why."""
    task = Task()
    callback = CheckpointCallback(
        Checkpointer(
            CheckpointStore(tmp_path / "run"),
            StoppingPolicy(monitor="val_loss", patience=5),
            task.state(),
        ),
        restore_best=True,
    )
    callback.on_epoch_end(0, {"val_loss": math.nan})
    with pytest.raises(
        CheckpointNotFoundError, match=r"no committed checkpoint has a finite .val_loss. metric"
    ):
        callback.on_train_end()


def test_other_events_do_nothing(tmp_path: Path) -> None:
    """Batch, loss, backward and step events accept any arguments, return {} and save nothing."""
    store = CheckpointStore(tmp_path / "run")
    callback = CheckpointCallback(Checkpointer(store, None, Task().state()))
    for event in EVENTS:
        assert getattr(callback, event)(3, iteration=7, loss=torch.tensor(1.0)) == {}
    assert store.records() == []


def test_rejects_an_object_that_is_not_a_checkpointer(tmp_path: Path) -> None:
    """Passing the store instead of a Checkpointer raises TypeError saying what to pass."""
    with pytest.raises(TypeError, match="CheckpointStore, which has no resume"):
        CheckpointCallback(CheckpointStore(tmp_path / "run"))  # type: ignore[arg-type]
