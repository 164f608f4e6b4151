"""The store's behaviour, the same on every storage: a local directory, memory://, S3 and GCS.

Each test runs once per backend (the ``backend`` fixture, ``tests/helpers/backends.py``); S3 is
moto's server and GCS is fake-gcs-server, both on 127.0.0.1, started by the tests. What only a local disk has (links, FIFOs,
fsync, the file lock) is tested in ``test_store.py``, ``test_hostile.py`` and ``test_crash.py``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import pytest

from ckptkit import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointStore,
    CorruptCheckpointError,
    FallbackWarning,
    ReadOnlyStoreError,
)
from tests.helpers.backends import Backend


def state(step: int, n: int = 1000) -> dict[str, Any]:
    return {
        "model": {"w": np.full(n, float(step), dtype=np.float32), "b": np.arange(3) + step},
        "step": step,
        "name": f"run-{step}",
    }


def test_save_and_load_round_trip_bit_exactly(backend: Backend) -> None:
    store = backend.store()
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((64, 33)).astype(np.float32), "k": rng.integers(0, 9, 7)}
    record = store.save(5, tree, metrics={"loss": 0.25}, metadata={"note": "x"})
    assert record.step == 5 and dict(record.metrics) == {"loss": 0.25}
    loaded = backend.store().load(5)
    assert loaded["w"].tobytes() == tree["w"].tobytes() and loaded["w"].dtype == np.float32
    assert loaded["k"].tolist() == tree["k"].tolist()
    assert backend.store().record(5).metadata["note"] == "x"
    assert backend.store().verify(5).step == 5


def test_a_second_store_object_sees_what_the_first_committed(backend: Backend) -> None:
    first, second = backend.store(), backend.store()
    first.save(1, state(1))
    assert [r.step for r in second.records()] == [1] and 1 in second and len(second) == 1
    assert second.latest() is not None and second.latest().step == 1  # type: ignore[union-attr]


def test_an_existing_step_is_refused_unless_overwrite(backend: Backend) -> None:
    store = backend.store()
    first = store.save(3, state(3))
    with pytest.raises(CheckpointExistsError, match="step 3 is already committed"):
        store.save(3, state(4))
    assert store.load(3)["step"] == 3
    second = store.save(3, state(4), overwrite=True)
    store.wait()  # the replaced checkpoint is deleted after save returns
    assert store.load(3)["step"] == 4
    assert second.directory != first.directory
    assert first.directory not in backend.checkpoint_names()


def test_a_missing_step_lists_the_steps_there_are(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints yet"):
        store.load()
    for step in (1, 2):
        store.save(step, state(step))
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint for step 7; .*\[1, 2\]"):
        store.load(7)


def test_retention_keeps_last_best_every_and_pinned_and_deletes_the_rest(
    backend: Backend,
) -> None:
    store = backend.store(keep_last=2, keep_best=1, monitor="loss", keep_every=5)
    losses = {0: 0.9, 1: 0.1, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4, 7: 0.3}
    for step, loss in losses.items():
        store.save(step, state(step, 10), metrics={"loss": loss})
        if step == 2:
            store.pin(2)
    kept = [r.step for r in store.records()]
    assert kept == [0, 1, 2, 5, 6, 7]
    assert sorted(backend.checkpoint_names()) == sorted(r.directory for r in store.records())
    assert store.best() is not None and store.best().step == 1  # type: ignore[union-attr]
    store.unpin(2)
    plan = store.prune()
    assert 2 in plan.delete and 2 not in store
    assert sorted(backend.checkpoint_names()) == sorted(r.directory for r in store.records())


def test_corruption_is_found_on_load_and_verify_and_fallback_skips_it(backend: Backend) -> None:
    store = backend.store()
    for step in range(3):
        store.save(step, state(step))
    backend.corrupt(store.record(2).directory, "arrays.safetensors")
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.load(2)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.verify(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = store.load_checkpoint(fallback=True)
    assert checkpoint.record.step == 1 and checkpoint.state["step"] == 1
    assert any(issubclass(w.category, FallbackWarning) for w in caught)


def test_single_tensors_are_read_from_their_bytes_alone(backend: Backend) -> None:
    store = backend.store()
    store.save(0, state(7))
    info = store.tensor_info()
    assert set(info) == {"model.w", "model.b"} and info["model.w"].nbytes == 4000
    arrays = store.read_arrays(0, ["model.b"], verify=True)
    assert arrays["model.b"].tolist() == [7, 8, 9]


def test_an_async_save_commits_the_values_of_the_call(backend: Backend) -> None:
    store = backend.store()
    weights = np.zeros(1 << 16, dtype=np.float64)
    pending = store.save_async(0, {"w": weights})
    weights += 1
    assert pending.result().step == 0
    assert backend.store().load(0)["w"].sum() == 0
    store.close()


def test_a_read_only_store_reads_and_refuses_changes(backend: Backend) -> None:
    backend.store().save(0, state(0))
    reader = backend.store(read_only=True)
    assert reader.load()["step"] == 0
    with pytest.raises(ReadOnlyStoreError):
        reader.save(1, state(1))
    with pytest.raises(ReadOnlyStoreError):
        reader.prune()
    assert reader.prune(dry_run=True).keep == frozenset({0})


def test_concurrent_writers_lose_no_commit(backend: Backend) -> None:
    """Writers saving different steps at once: every step is committed and none is lost.

    On a local disk the lock serialises them; on an object store each commit is conditional,
    and a writer that lost the race decides again on the winner's manifest.
    """
    writers, steps_each = 4, 3
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            store = backend.store()
            for k in range(steps_each):
                step = index * 100 + k
                store.save(step, state(step, 10))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = backend.store()
    expected = sorted(i * 100 + k for i in range(writers) for k in range(steps_each))
    assert [r.step for r in store.records()] == expected
    for step in expected:
        assert store.load(step)["step"] == step
    assert sorted(backend.checkpoint_names()) == sorted(r.directory for r in store.records())


def test_two_writers_of_one_step_never_both_commit(backend: Backend) -> None:
    """Two writers save the same new step at once: one commits, the other is told it exists."""
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def write(value: int) -> None:
        store = backend.store()
        barrier.wait()
        try:
            store.save(9, {"v": np.full(10, value)})
            outcomes.append(f"committed {value}")
        except CheckpointExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split()[0] for o in outcomes) == ["committed", "exists"]
    winner = int(next(o for o in outcomes if o.startswith("committed")).split()[1])
    store = backend.store()
    assert store.load(9)["v"][0] == winner
    assert backend.checkpoint_names() == [store.record(9).directory]


def test_the_how_to_example_runs_against_an_s3_server(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/how-to/object-stores.md's first example, with the server given by the environment."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs/how-to/object-stores.md").read_text()
    source = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "s3://my-bucket/runs/exp1" in source
    s3_bucket.client.create_bucket(Bucket="my-bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    exec(compile(source, "object-stores.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "[0. 0. 0. 0.]"
    listed = s3_bucket.client.list_objects_v2(Bucket="my-bucket", Prefix="runs/exp1/")
    assert "runs/exp1/manifest.json" in [item["Key"] for item in listed["Contents"]]


def test_the_command_line_reads_and_maintains_an_s3_store(
    s3_bucket: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """ckptkit ls/show/verify/pin/prune take an s3:// ROOT and --storage-option."""
    import json

    from ckptkit._cli import main

    url = s3_bucket.url("cli")
    store = CheckpointStore(url, storage_options=s3_bucket.options)
    for step in range(4):
        store.save(step, state(step, 10), metrics={"loss": 1.0 / (step + 1)})
    options = [
        f"--storage-option=endpoint_url={s3_bucket.endpoint}",
        "--storage-option=region_name=us-east-1",
        "--storage-option=key=testing",
        "--storage-option=secret=testing",
    ]

    def run(command: str, *rest: str) -> Any:
        code = main([command, url, *rest, *options, "--json"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), err
        return json.loads(out)

    listed = run("ls")
    assert [c["step"] for c in listed["checkpoints"]] == [0, 1, 2, 3]
    assert run("verify")["ok"] is True
    assert run("pin", "1")["pinned"] is True
    plan = run("prune", "--keep-last", "1", "--dry-run")
    assert sorted(plan["deleted"]) == [0, 2]
    assert [r.step for r in store.records()] == [0, 1, 2, 3]  # a dry run changes nothing
    run("prune", "--keep-last", "1")
    assert [r.step for r in store.records()] == [1, 3]
    # Without the endpoint the store is not found there; a bad option is a usage error.
    assert main(["ls", "s3://no-such-bucket-here/x", *options]) != 0
    capsys.readouterr()
    assert main(["ls", url, "--storage-option", "colour=blue"]) == 2
    assert "invalid --storage-option 'colour=blue'" in capsys.readouterr().err
