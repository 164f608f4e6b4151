"""CheckpointCallback inside real ``model.fit`` runs: stopping, exact resume, saving options."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from ckptkit import CheckpointStore, MissingMetricError, StoppingPolicy  # noqa: E402
from ckptkit.adapters._keras_callback import CheckpointCallback  # noqa: E402
from ckptkit.adapters._keras_convert import to_numpy  # noqa: E402
from ckptkit.adapters._keras_state import KerasState  # noqa: E402
from ckptkit.demo import trees_identical  # noqa: E402

BATCH = 32


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small noisy regression task, 192 samples to train on (6 batches) and 64 to validate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.3 * rng.normal(size=(256, 1))).astype("float32")
    return x[:192], y[:192], x[192:], y[192:]


X, Y, XV, YV = make_data()


def build(seed: int = 1, **compile_options: Any) -> Any:
    """A seeded MLP with Dropout, compiled with Adam (every run starts by seeding Keras)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"], **compile_options
    )
    return model


def fit(model: Any, callbacks: list[Any], epochs: int, **kwargs: Any) -> Any:
    """``model.fit`` on the fixed data, in order unless told otherwise, silently."""
    kwargs.setdefault("validation_data", (XV, YV))
    kwargs.setdefault("shuffle", False)
    return model.fit(
        X,
        Y,
        epochs=epochs,
        batch_size=BATCH,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


def digest(model: Any, variables: Any = None) -> str:
    """SHA-256 of the bytes of every model variable (or of ``variables``), in order."""
    h = hashlib.sha256()
    for v in model.variables if variables is None else variables:
        h.update(to_numpy(v).tobytes())
    return h.hexdigest()


# Its data is picked on TensorFlow's numbers (min_delta keeps Keras' best and the lowest value
# apart); tests/adapters/keras/test_policy_parity.py compares the two on every backend.
@pytest.mark.tensorflow_only
def test_stops_at_the_same_epoch_as_keras_early_stopping(tmp_path: Path) -> None:
    """Same settings, same data: stops where EarlyStopping does and restores the same best."""
    options = {"patience": 2, "min_delta": 0.01}
    reference = build()
    keras_stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", restore_best_weights=True, **options
    )
    ref_history = fit(reference, [keras_stop], epochs=40)
    assert keras_stop.stopped_epoch > 0, "the data must make EarlyStopping stop early"

    model = build()
    policy = StoppingPolicy(monitor="val_loss", **options)
    callback = CheckpointCallback(CheckpointStore(tmp_path), policy, restore_best_weights=True)
    history = fit(model, [callback], epochs=40)

    assert history.epoch == ref_history.epoch
    assert policy.stop_step == keras_stop.stopped_epoch
    assert policy.best_step == keras_stop.best_epoch
    assert callback.best_record is not None and callback.best_record.step == policy.best_step
    # Keras restores the weights only; ckptkit also the optimizer and the Dropout seed state.
    assert digest(model, model.trainable_variables) == digest(
        reference, reference.trainable_variables
    )


def test_resume_after_a_restart_equals_the_uninterrupted_fit_bitwise(tmp_path: Path) -> None:
    """New model, optimizer and callback on the same store continue exactly (Dropout and Adam)."""
    reference = build()
    fit(reference, [CheckpointCallback(CheckpointStore(tmp_path / "ref"))], epochs=6)

    first = build()
    fit(first, [CheckpointCallback(CheckpointStore(tmp_path / "run"))], epochs=3)
    model = build()  # "the restart": fresh objects, re-seeded, freshly initialised weights
    callback = CheckpointCallback(CheckpointStore(tmp_path / "run"))
    assert callback.initial_epoch == 3
    history = fit(model, [callback], epochs=6, initial_epoch=callback.initial_epoch)

    assert history.epoch == [3, 4, 5]
    assert digest(model) == digest(reference)
    assert [r.step for r in CheckpointStore(tmp_path / "run").records()] == list(range(6))


def test_fit_resumes_even_without_initial_epoch(tmp_path: Path) -> None:
    """``on_train_begin`` makes fit start after the latest save, as BackupAndRestore does."""
    fit(build(), [CheckpointCallback(CheckpointStore(tmp_path))], epochs=2)
    model = build()
    history = fit(model, [CheckpointCallback(CheckpointStore(tmp_path))], epochs=4)
    assert history.epoch == [2, 3]
    assert model._initial_epoch is None  # a later fit of the same model is not shifted


def test_a_run_that_stopped_before_the_restart_trains_no_further(tmp_path: Path) -> None:
    """The policy's stopped state comes back, so the resumed fit runs no epoch at all."""
    policy = StoppingPolicy(monitor="val_loss", patience=1, min_delta=10.0)
    fit(build(), [CheckpointCallback(CheckpointStore(tmp_path), policy)], epochs=20)
    assert policy.stop_step == 1

    again = StoppingPolicy(monitor="val_loss", patience=1, min_delta=10.0)
    callback = CheckpointCallback(CheckpointStore(tmp_path), again)
    assert callback.initial_epoch == 2
    history = fit(build(), [callback], epochs=20, initial_epoch=callback.initial_epoch)
    assert history.epoch == []
    assert again.should_stop and again.stop_step == 1


def test_a_missing_monitored_key_raises_naming_the_keys_there_are(tmp_path: Path) -> None:
    """Keras only warns about an unknown monitor; the callback raises with the logged names."""
    callback = CheckpointCallback(CheckpointStore(tmp_path), StoppingPolicy(monitor="val_acc"))
    with pytest.raises(MissingMetricError) as info:
        fit(build(), [callback], epochs=2)
    assert str(info.value) == (
        "epoch 0: the policy monitors 'val_acc', which is not in the epoch's logs ['loss', "
        "'mae', 'val_loss', 'val_mae']; monitor one of those (Keras names metrics after "
        "compile(metrics=...))"
    )


def test_a_val_monitor_without_validation_data_fails_at_the_end_of_fit(tmp_path: Path) -> None:
    """Monitoring ``val_loss`` with no validation data: each epoch is saved, and fit ends saying to pass it.

    An epoch without validation metrics may be one ``validation_freq`` skips, so only a fit
    that never validated (and a policy that never observed) is known to lack validation data.
    """
    callback = CheckpointCallback(CheckpointStore(tmp_path), StoppingPolicy(monitor="val_loss"))
    with pytest.raises(MissingMetricError, match="pass validation_data=") as info:
        fit(build(), [callback], epochs=3, validation_data=None)
    assert str(info.value) == (
        "epochs 0 to 2: the policy monitors 'val_loss', but fit computed no validation metrics "
        "(logs have only ['loss', 'mae']), so the policy never observed a value; pass "
        "validation_data= (or validation_split=) to model.fit, or monitor a training metric"
    )
    assert [r.step for r in CheckpointStore(tmp_path).records()] == [0, 1, 2]


# Its data is picked on TensorFlow's numbers (the stops and bests it asserts come from them).
@pytest.mark.tensorflow_only
@pytest.mark.filterwarnings(
    "ignore:Early stopping conditioned on metric `val_loss` which is not available:UserWarning"
)
def test_epochs_without_validation_are_saved_but_not_observed(tmp_path: Path) -> None:
    """With validation_freq=2 the policy counts only validated epochs, stopping where EarlyStopping does.

    Every epoch is saved (those without validation carry no val_loss), and a run restarted
    after an unvalidated epoch stops at the same epoch.
    """
    options = {"patience": 1, "min_delta": 0.02}
    keras_stop = keras.callbacks.EarlyStopping(monitor="val_loss", **options)
    ref_history = fit(build(), [keras_stop], epochs=40, validation_freq=2)
    assert keras_stop.stopped_epoch > 0, "the data must make EarlyStopping stop early"

    policy = StoppingPolicy(monitor="val_loss", **options)
    store = CheckpointStore(tmp_path / "whole")
    history = fit(build(), [CheckpointCallback(store, policy)], epochs=40, validation_freq=2)
    assert history.epoch == ref_history.epoch
    assert (policy.stop_step, policy.best_step) == (keras_stop.stopped_epoch, keras_stop.best_epoch)
    assert policy.state_dict()["observations"] == len(history.epoch) // 2
    records = store.records()
    assert [r.step for r in records] == history.epoch
    assert ["val_loss" in r.metrics for r in records] == [e % 2 == 1 for e in history.epoch]

    restarted = StoppingPolicy(monitor="val_loss", **options)
    run = tmp_path / "run"
    fit(build(), [CheckpointCallback(CheckpointStore(run))], epochs=3, validation_freq=2)
    again = fit(
        build(), [CheckpointCallback(CheckpointStore(run), restarted)], epochs=40, validation_freq=2
    )
    assert again.epoch == history.epoch[3:]
    assert restarted.stop_step == policy.stop_step


def test_save_freq_n_saves_every_n_batches_numbered_by_batches(tmp_path: Path) -> None:
    """With save_freq=4 and 6 batches an epoch, batch saves come every 4 batches across epochs."""
    callback = CheckpointCallback(CheckpointStore(tmp_path), save_freq=4)
    fit(build(), [callback], epochs=3)
    records = CheckpointStore(tmp_path).records()
    # After batches 4, 8, 12 and 16 counted from the start, and at each epoch's end (6, 12, 18):
    # the save due after batch 12, an epoch's last, is that epoch's end save.
    assert [r.step for r in records] == [3, 5, 7, 11, 15, 17]
    where = {r.step: r.metadata["keras_fit"] for r in records}
    place = ("epoch", "batch", "epoch_end", "batches")
    assert [where[3][k] for k in place] == [0, 4, False, 4]
    assert [where[5][k] for k in place] == [0, None, True, 6]
    assert [where[7][k] for k in place] == [1, 2, False, 8]
    assert "loss" in records[0].metrics and "val_loss" not in records[0].metrics
    assert "val_loss" in records[1].metrics


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
# PyTorch's fit runs one step at a time (Keras refuses steps_per_execution > 1 there).
@pytest.mark.parametrize(
    "steps_per_execution", [1] if keras.backend.backend() == "torch" else [1, 4]
)
def test_save_freq_n_counts_batches_as_model_checkpoint_does(
    tmp_path: Path, steps_per_execution: int
) -> None:
    """save_freq=4 saves after the very batches Keras' ModelCheckpoint(save_freq=4) saves after.

    Compared by the number of batches fit has reported at each save, counted from the start;
    the callback also saves at each epoch's end. Each epoch has 6 batches; with
    steps_per_execution=4, fit reports them as two executions of 4 (batches 0-3 and 4-7).
    """
    saver = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras-{epoch}-{batch}.weights.h5"), save_weights_only=True, save_freq=4
    )
    fit(build(steps_per_execution=steps_per_execution), [saver], epochs=3)
    reported = -(-(len(X) // BATCH) // steps_per_execution) * steps_per_execution
    keras_saves = set()
    for path in tmp_path.glob("keras-*.weights.h5"):
        _, epoch, batch = path.name.split(".")[0].split("-")
        keras_saves.add((int(epoch) - 1) * reported + int(batch))
    assert keras_saves == ({4, 8, 12, 16} if steps_per_execution == 1 else {4, 8, 12, 16, 20, 24})

    store = CheckpointStore(tmp_path / "run")
    model = build(steps_per_execution=steps_per_execution)
    fit(model, [CheckpointCallback(store, save_freq=4)], epochs=3)
    epoch_ends = {reported, 2 * reported, 3 * reported}
    assert {r.step + 1 for r in store.records()} == keras_saves | epoch_ends


def test_save_freq_n_counts_on_across_a_restart(tmp_path: Path) -> None:
    """The batch count survives a restart: a run resumed at an epoch's end saves at the same batches."""
    whole = CheckpointStore(tmp_path / "whole")
    fit(build(), [CheckpointCallback(whole, save_freq=5)], epochs=3)
    run = CheckpointStore(tmp_path / "run")
    fit(build(), [CheckpointCallback(run, save_freq=5)], epochs=1)
    fit(build(), [CheckpointCallback(run, save_freq=5)], epochs=3)
    assert [r.step for r in whole.records()] == [4, 5, 9, 11, 14, 17]
    assert [r.step for r in run.records()] == [r.step for r in whole.records()]


def test_numpy_arrays_shuffled_by_fit_resume_bit_exactly_after_set_random_seed(
    tmp_path: Path,
) -> None:
    """fit(shuffle=True) on NumPy arrays, stopped after 2 epochs and restarted, ends bit-equal."""
    reference = build()
    fit(reference, [CheckpointCallback(CheckpointStore(tmp_path / "ref"))], epochs=4, shuffle=True)
    fit(build(), [CheckpointCallback(CheckpointStore(tmp_path / "run"))], epochs=2, shuffle=True)
    model = build()  # the restart: keras.utils.set_random_seed(1) again
    history = fit(
        model, [CheckpointCallback(CheckpointStore(tmp_path / "run"))], epochs=4, shuffle=True
    )
    assert history.epoch == [2, 3]
    assert digest(model) == digest(reference)
    unshuffled = build()
    fit(unshuffled, [], epochs=4)
    assert digest(unshuffled) != digest(reference)  # the order did change


@pytest.mark.tensorflow_only  # JAX and PyTorch draw a new order each epoch
def test_fit_shuffles_numpy_arrays_with_one_permutation_per_seed() -> None:
    """After set_random_seed, fit(shuffle=True) uses the same permutation every epoch (why resume is exact)."""
    seen: list[int] = []

    class Record(keras.layers.Layer):
        def call(self, x: Any, training: bool = False) -> Any:
            if training:
                seen.extend(int(v) for v in keras.ops.convert_to_numpy(x[:, 0]))
            return x

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((1,)), Record(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    x = np.arange(12, dtype="float32")[:, None]
    model.fit(x, np.zeros((12, 1), "float32"), batch_size=4, epochs=3, shuffle=True, verbose=0)
    epochs = [seen[i : i + 12] for i in range(0, 36, 12)]
    assert epochs[0] == epochs[1] == epochs[2]
    assert sorted(epochs[0]) == list(range(12)) and epochs[0] != list(range(12))


def test_after_a_save_inside_an_epoch_fit_restarts_that_epoch(tmp_path: Path) -> None:
    """When the latest save is mid-epoch, ``initial_epoch`` is that epoch, not the next."""
    store = CheckpointStore(tmp_path)
    fit(build(), [CheckpointCallback(store, save_freq=4)], epochs=3)
    store.save(18, {}, metadata={"keras_fit": {"epoch": 2, "batch": 1, "epoch_end": False}})
    callback = CheckpointCallback(CheckpointStore(tmp_path))
    assert callback.initial_epoch == 2


def test_save_best_only_saves_improvements_and_respects_the_threshold(tmp_path: Path) -> None:
    """Only improving epochs are saved, and with initial_value_threshold only those beating it."""
    policy = StoppingPolicy(monitor="val_loss", patience=100)
    fit(
        build(),
        [CheckpointCallback(CheckpointStore(tmp_path / "a"), policy, save_best_only=True)],
        epochs=8,
    )
    values = [r.metrics["val_loss"] for r in CheckpointStore(tmp_path / "a").records()]
    assert values == sorted(values, reverse=True) and len(values) >= 2

    threshold = float(np.median(values))
    callback = CheckpointCallback(
        CheckpointStore(tmp_path / "b"),
        StoppingPolicy(monitor="val_loss", patience=100),
        save_best_only=True,
        initial_value_threshold=threshold,
    )
    fit(build(), [callback], epochs=8)
    kept = [r.metrics["val_loss"] for r in CheckpointStore(tmp_path / "b").records()]
    assert kept == [v for v in values if v < threshold]


# Its data is picked on TensorFlow's numbers (the stops and bests it asserts come from them).
@pytest.mark.tensorflow_only
def test_restore_best_weights_loads_the_best_epochs_state(tmp_path: Path) -> None:
    """At train end the model (and optimizer) hold exactly the state saved at the best epoch."""
    store = CheckpointStore(tmp_path)
    policy = StoppingPolicy(monitor="val_loss", patience=100)
    model = build()
    callback = CheckpointCallback(store, policy, restore_best_weights=True)
    fit(model, [callback], epochs=8)
    assert policy.best_step is not None and policy.best_step < 7, "pick data whose best is early"
    assert callback.best_record is not None and callback.best_record.step == policy.best_step
    lowest = min(store.records(), key=lambda r: (r.metrics["val_loss"], r.step))
    assert callback.best_record == lowest  # min_delta=0: the policy's best is the lowest
    now = KerasState(model, model.optimizer).state_dict()
    assert trees_identical(now, store.load(policy.best_step))
    assert not trees_identical(now, store.load(7))


# Keras's HDF5 weights writer calls np.array on TF variables, which NumPy 2 deprecates.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
# Its data is picked on TensorFlow's numbers (see its last line); the logic it checks is the
# same on every backend.
@pytest.mark.tensorflow_only
def test_with_min_delta_save_best_only_and_restore_best_follow_the_best_value(
    tmp_path: Path,
) -> None:
    """min_delta only delays stopping: the epochs saved are Keras ModelCheckpoint's, the best restored is the lowest.

    Keras' ``ModelCheckpoint(save_best_only=True)`` saves every epoch whose value beats the best
    so far, with no min_delta; the callback saves the same epochs and restores the lowest one,
    while its policy's patience counts from an earlier epoch.
    """
    saver = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras-{epoch}.weights.h5"),
        monitor="val_loss",
        save_best_only=True,
        save_weights_only=True,
    )
    store = CheckpointStore(tmp_path / "run")
    policy = StoppingPolicy(monitor="val_loss", patience=100, min_delta=0.01)
    callback = CheckpointCallback(store, policy, save_best_only=True, restore_best_weights=True)
    history = fit(build(), [saver, callback], epochs=8)
    keras_saved = sorted(int(p.name.split("-")[1].split(".")[0]) - 1 for p in tmp_path.glob("*.h5"))
    assert [r.step for r in store.records()] == keras_saved
    values = history.history["val_loss"]
    lowest = min(range(len(values)), key=lambda i: (values[i], i))
    assert callback.best_record is not None and callback.best_record.step == lowest
    assert policy.best_step != lowest, "pick data where min_delta holds the policy's best back"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"save_freq": 0}, ValueError, 'save_freq must be "epoch" or an int >= 1, got 0'),
        ({"save_freq": "batch"}, ValueError, 'save_freq must be "epoch" or an int >= 1'),
        ({"save_best_only": True, "policy": None}, ValueError, "need a policy to say what"),
        (
            {"initial_value_threshold": 0.5},
            ValueError,
            "initial_value_threshold applies only with save_best_only=True",
        ),
        ({"policy": "val_loss"}, TypeError, "policy must be a StoppingPolicy or None, got str"),
    ],
)
def test_invalid_options_fail_when_the_callback_is_made(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each invalid option fails at construction with a message saying what to pass."""
    kwargs.setdefault("policy", StoppingPolicy(monitor="val_loss"))
    policy = kwargs.pop("policy")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        CheckpointCallback(CheckpointStore(tmp_path), policy, **kwargs)
    with pytest.raises(TypeError, match="store must be a ckptkit CheckpointStore, got str"):
        CheckpointCallback("run")  # type: ignore[arg-type]


# Keras' get_weights reads JAX variables with np.array, which NumPy 2 deprecates.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_the_keras_tutorial_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of docs/tutorials/keras-fit.md runs here, Keras ones included, in order."""
    doc = Path(__file__).resolve().parents[3] / "docs" / "tutorials" / "keras-fit.md"
    blocks = re.findall(r"^```python\n(.*?)^```$", doc.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 6
    if keras.backend.backend() != "tensorflow":  # its TFState block is for TensorFlow's loops
        blocks = [block for block in blocks if "import tensorflow" not in block]
        assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert namespace["policy"].stop_step is not None


def test_restore_best_weights_without_any_best_is_refused_before_training(tmp_path: Path) -> None:
    """restore_best_weights with neither a policy nor a store monitor fails at once, not after fit."""
    with pytest.raises(
        ValueError, match="restore_best_weights=True needs a policy or a store with a monitor"
    ):
        CheckpointCallback(CheckpointStore(tmp_path), restore_best_weights=True)
