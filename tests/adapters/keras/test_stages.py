"""Training stages on one store: fit, unfreeze, compile with a new optimizer, fit again."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import CheckpointRecord, CheckpointStore, StoppingPolicy  # noqa: E402
from ckptkit.adapters._keras_convert import to_numpy  # noqa: E402
from ckptkit.adapters._keras_resume import plan  # noqa: E402
from ckptkit.adapters.keras import CheckpointCallback, NewStageWarning  # noqa: E402

RNG = np.random.default_rng(1)
X = RNG.normal(size=(64, 6)).astype("float32")
Y = (np.tanh(X @ RNG.normal(size=(6, 1))) + 0.2 * RNG.normal(size=(64, 1))).astype("float32")


def build() -> Any:
    """A functional model whose "base" layer stage 1 trains frozen, compiled with Adam."""
    keras.utils.set_random_seed(6)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="base")(inputs)
    h = keras.layers.Dropout(0.2)(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    model.get_layer("base").trainable = False
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def unfreeze(model: Any) -> None:
    """Stage 2: train the base too, with SGD."""
    model.get_layer("base").trainable = True
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")


def fit(model: Any, callback: Any, epochs: int) -> Any:
    return model.fit(
        X[:48],
        Y[:48],
        validation_data=(X[48:], Y[48:]),
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )


def digest(variables: Any) -> str:
    h = hashlib.sha256()
    for v in variables:
        h.update(to_numpy(v).tobytes())
    return h.hexdigest()


def test_a_new_optimizer_over_unfrozen_layers_starts_a_new_stage(tmp_path: Path) -> None:
    """Stage 2 keeps the model, starts its optimizer and policy afresh, numbers epochs on, and warns."""
    store = CheckpointStore(tmp_path)
    policy = StoppingPolicy(monitor="val_loss", patience=0, min_delta=10.0)  # stops at once
    model = build()
    fit(model, CheckpointCallback(store, policy), epochs=5)
    assert policy.stop_step == 1
    weights = digest(model.variables)

    unfreeze(model)
    callback = CheckpointCallback(store, policy)  # the same, stopped, policy object
    stage2_start: list[str] = []

    class Probe(keras.callbacks.Callback):  # sees the state fit trains from
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if not stage2_start:
                stage2_start.append(digest(model.variables))
                assert int(to_numpy(model.optimizer.iterations)) == 0

    with pytest.warns(NewStageWarning) as caught:
        history = model.fit(
            X[:48], Y[:48], validation_data=(X[48:], Y[48:]), batch_size=16, epochs=4,
            shuffle=False, verbose=0, callbacks=[callback, Probe()],
        )  # fmt: skip
    assert str(caught[0].message) == (
        f"{store.root}: this fit's optimizer (SGD with 6 variables) is not the one the latest "
        "checkpoint (step 1) was saved with (Adam with 6 variables), so a new training stage "
        "starts at epoch 2: the model keeps the weights it has now (nothing is loaded from the "
        "store), the optimizer starts fresh and the stopping policy starts over. To resume that "
        "checkpoint instead, compile with the optimizer it was saved with, over the same "
        "trainable variables"
    )
    assert stage2_start == [weights]
    assert history.epoch == [2, 3]
    assert policy.stop_step == 3 and policy.best_step == 2  # it started over at epoch 2
    records = store.records()
    assert [r.step for r in records] == [0, 1, 2, 3]
    stage2 = records[-1].metadata["keras_fit"]
    assert stage2["optimizer"]["class"] == "SGD"
    assert stage2["previous_stages"] == [
        {"optimizer": records[1].metadata["keras_fit"]["optimizer"], "last_step": 1}
    ]


@pytest.mark.parametrize("killed_after", [2, 3], ids=["between-the-stages", "in-stage-2"])
def test_a_rerun_of_a_two_stage_script_ends_bit_equal(tmp_path: Path, killed_after: int) -> None:
    """Stopped between the stages or in stage 2, then both fits run again on fresh objects:
    the weights and optimizer end as in an uninterrupted run."""

    def script(root: Path, until: int) -> tuple[Any, list[list[int]]]:
        """Stage 1 to epoch 2, stage 2 to ``until``: the epochs each fit trained."""
        store, epochs = CheckpointStore(root), []
        model = build()
        epochs.append(fit(model, CheckpointCallback(store), epochs=min(until, 2)).epoch)
        if until > 2:
            unfreeze(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NewStageWarning)
                epochs.append(fit(model, CheckpointCallback(store), epochs=until).epoch)
        return model, epochs

    whole, _ = script(tmp_path / "whole", 5)
    script(tmp_path / "run", killed_after)  # the run that was stopped
    again, epochs = script(tmp_path / "run", 5)  # the rerun, from the top
    assert epochs[0] == []  # stage 1 is over: it trains nothing
    assert epochs[1] == list(range(killed_after, 5))
    assert digest(again.variables) == digest(whole.variables)
    assert digest(again.optimizer.variables) == digest(whole.optimizer.variables)


def test_a_new_stage_that_fit_would_end_before_it_starts_is_refused(tmp_path: Path) -> None:
    """Epochs count on across stages: fit(epochs=2) after two epochs says what to pass."""
    store = CheckpointStore(tmp_path)
    model = build()
    fit(model, CheckpointCallback(store), epochs=2)
    unfreeze(model)
    with pytest.raises(ValueError) as info:
        fit(model, CheckpointCallback(store), epochs=2)
    assert str(info.value) == (
        f"{store.root}: this fit's optimizer (SGD with 6 variables) starts a new training stage "
        "after the latest checkpoint (step 1), at epoch 2, but fit(epochs=2) ends before that "
        "epoch: the stages of one store number their epochs on, as fit(initial_epoch=...) does; "
        "pass epochs=2 plus this stage's epochs"
    )
    assert [r.step for r in store.records()] == [0, 1]


def test_the_same_optimizer_class_over_the_same_variables_continues_the_stage(
    tmp_path: Path,
) -> None:
    """Compiled again with Adam at another rate (nothing unfrozen), fit resumes: the rate is the saved one."""
    store = CheckpointStore(tmp_path)
    model = build()
    fit(model, CheckpointCallback(store), epochs=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = fit(model, CheckpointCallback(store), epochs=3)
    assert history.epoch == [2]
    assert float(to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.01)


def _record(step: int, optimizer: str | None, previous: tuple[tuple[str, int], ...] = ()) -> Any:
    meta: dict[str, Any] = {"epoch": step, "epoch_end": True}
    if optimizer is not None:
        meta["optimizer"] = optimizer
        meta["previous_stages"] = [{"optimizer": o, "last_step": s} for o, s in previous]
    return CheckpointRecord(
        step=step, metadata={"keras_fit": meta}, created=0.0, directory=f"step_{step:012d}"
    )


def test_plan_resumes_replays_or_starts_a_stage_from_the_latest_checkpoints_history() -> None:
    """The optimizer's signature against the latest checkpoint's and its previous stages'."""
    stage1 = [_record(0, "A"), _record(1, "A")]
    stage2 = [_record(2, "B", (("A", 1),)), _record(3, "B", (("A", 1),))]
    assert plan(stage1, "A").action == "resume"
    assert plan(stage1, None).action == "resume"  # save_weights_only: no optimizer
    assert plan([_record(0, None)], "A").action == "resume"  # saved before stages existed
    new = plan(stage1, "B")
    assert (new.action, new.record) == ("new_stage", stage1[-1])
    replay = plan(stage1 + stage2, "A")
    assert (replay.action, replay.record) == ("replay", stage1[-1])
    gone = plan(stage2, "A")  # retention deleted stage 1's checkpoints
    assert (gone.action, gone.record) == ("replay", None)
    assert plan(stage1 + stage2, "C").action == "new_stage"
