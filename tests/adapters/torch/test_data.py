"""ResumableSampler: per-epoch orders, exact mid-epoch resume, DataLoader prefetch, bad input."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ckptkit import CheckpointStore, ConfigMismatchError  # noqa: E402
from ckptkit.adapters.torch import ResumableSampler, TorchState  # noqa: E402

N = 23  # not a multiple of the batch size: the last batch is short
BATCH = 4
# Python 3.12+ warns when a process with threads forks (DataLoader workers fork on Linux).
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"


def dataset(n: int = N) -> Any:
    """A dataset whose samples are their own indices, so a batch shows which samples it holds."""
    return TensorDataset(torch.arange(n))


def loader(sampler: ResumableSampler, **options: Any) -> Any:
    """A DataLoader over ``dataset()`` drawing its order from ``sampler``."""
    return DataLoader(
        dataset(), batch_size=BATCH, sampler=sampler, generator=torch.Generator(), **options
    )


def batches(iterable: Any) -> list[list[int]]:
    """The sample indices of each batch."""
    return [b[0].tolist() for b in iterable]


def test_order_is_a_deterministic_permutation_that_changes_every_epoch() -> None:
    """Epoch e's order depends only on (seed, e): repeatable, a permutation, new each epoch."""
    a, b = ResumableSampler(N, seed=7), ResumableSampler(dataset(), seed=7)
    orders = [a.order(e) for e in range(4)]
    assert orders == [b.order(e) for e in range(4)]
    assert all(sorted(o) == list(range(N)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert ResumableSampler(N, seed=8).order(0) != orders[0]
    assert ResumableSampler(N, seed=0).order(1) != ResumableSampler(N, seed=1).order(0)
    assert ResumableSampler(N, shuffle=False).order(3) == list(range(N))


def test_iteration_follows_the_order_and_leaves_the_global_generator_alone() -> None:
    """Iterating yields order(epoch) and draws nothing from torch's global generator."""
    sampler = ResumableSampler(N, seed=3)
    before = torch.get_rng_state()
    assert list(sampler) == sampler.order(0)
    assert torch.equal(torch.get_rng_state(), before)
    assert (sampler.epoch, sampler.position, len(sampler)) == (0, N, N)


def test_state_round_trip_at_every_position_gives_the_same_remaining_order() -> None:
    """Stopped after any number of indices, a sampler loaded with the state yields the rest."""
    for epoch in (0, 5):
        for p in range(N + 1):
            first = ResumableSampler(N, seed=11)
            first.set_epoch(epoch)
            head = list(islice(iter(first), p))
            state = first.state_dict()
            assert state == {
                "epoch": epoch,
                "position": p,
                "seed": 11,
                "shuffle": True,
                "length": N,
            }
            second = ResumableSampler(N, seed=999)  # the seed comes from the state
            second.load_state_dict(state)
            second.set_epoch(epoch)  # a resumed loop calls this: it keeps the position
            rest = list(second) if p < N else []
            assert head + rest == first.order(epoch)


def test_loader_resumes_at_the_next_batch_after_every_batch() -> None:
    """A DataLoader (num_workers=0) over a sampler saved after batch k resumes with batch k + 1."""
    reference = batches(loader(ResumableSampler(N, seed=5)))
    assert len(reference) == 6 and len(reference[-1]) == N % BATCH
    for k in range(len(reference) + 1):
        sampler = ResumableSampler(N, seed=5)
        seen = batches(islice(iter(loader(sampler)), k))
        # With num_workers=0 the position is exactly what the loop received.
        assert sampler.position == min(k * BATCH, N)
        state = sampler.state_dict()
        resumed = ResumableSampler(N, seed=5)
        resumed.load_state_dict(state)
        rest = batches(loader(resumed)) if resumed.next_epoch == 0 else []
        assert seen + rest == reference


def test_state_round_trips_through_a_store(tmp_path: Path) -> None:
    """The state is a plain tree: saved in a CheckpointStore and loaded back, it resumes the same."""
    sampler = ResumableSampler(N, seed=2)
    sampler.set_epoch(4)
    head = list(islice(iter(sampler), 9))
    store = CheckpointStore(tmp_path / "store")
    store.save(0, {"sampler": sampler.state_dict()})
    resumed = ResumableSampler(N, seed=2)
    resumed.load_state_dict(store.load(0)["sampler"])
    assert (resumed.epoch, resumed.position) == (4, 9)
    assert head + list(resumed) == sampler.order(4)


def test_sampler_inside_a_torch_state_resumes_mid_epoch(tmp_path: Path) -> None:
    """TorchState(sampler=...) saves the position; loading it into a new sampler continues there."""
    sampler = ResumableSampler(N, seed=12)
    it = iter(loader(sampler))
    seen = batches(islice(it, 3))
    store = CheckpointStore(tmp_path / "store")
    store.save(3, TorchState(sampler=sampler, rng=False).state_dict())
    resumed = ResumableSampler(N, seed=12)
    TorchState(sampler=resumed, rng=False).load_state_dict(store.load(3))
    assert seen + batches(loader(resumed)) == batches(loader(ResumableSampler(N, seed=12)))


def test_a_loader_given_a_generator_leaves_the_global_generator_alone() -> None:
    """Without generator=, each iter(loader) draws from torch's global generator; with it, never.

    This is why a mid-epoch resume needs generator=: the resumed run starts one iterator more.
    """
    before = torch.get_rng_state()
    batches(loader(ResumableSampler(N)))
    assert torch.equal(torch.get_rng_state(), before)
    batches(DataLoader(dataset(), batch_size=BATCH, sampler=ResumableSampler(N)))
    assert not torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(before)


def test_set_epoch_moves_to_an_epoch_start_and_keeps_the_current_epoch() -> None:
    """set_epoch(e) starts epoch e; set_epoch(current) keeps the position; a done epoch advances."""
    sampler = ResumableSampler(N, seed=1)
    head = list(islice(iter(sampler), 5))
    sampler.set_epoch(0)
    assert (sampler.epoch, sampler.position, sampler.next_epoch) == (0, 5, 0)
    assert head + list(sampler) == sampler.order(0)
    assert sampler.next_epoch == 1
    sampler.set_epoch(2)
    assert (sampler.epoch, sampler.position) == (2, 0)
    assert list(sampler) == sampler.order(2)
    # Without set_epoch, iterating again after a finished epoch begins the next one.
    assert list(sampler) == sampler.order(3)
    assert sampler.epoch == 3


def test_drop_last_resume_after_the_last_full_batch_yields_nothing_more() -> None:
    """With drop_last, a state saved after the last full batch resumes into an empty remainder."""
    sampler = ResumableSampler(N, seed=4)
    got = batches(loader(sampler, drop_last=True))
    assert len(got) == N // BATCH
    resumed = ResumableSampler(N, seed=4)
    resumed.load_state_dict({**sampler.state_dict(), "position": (N // BATCH) * BATCH})
    assert resumed.next_epoch == 0
    assert batches(loader(resumed, drop_last=True)) == []
    assert resumed.next_epoch == 1


def test_changing_the_state_during_an_iteration_makes_it_fail_loudly() -> None:
    """An iteration whose sampler was moved to another epoch raises instead of mixing orders."""
    sampler = ResumableSampler(N)
    it = iter(sampler)
    next(it)
    sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match=r"state changed .* start a new one with iter\(loader\)"):
        next(it)


@pytest.mark.filterwarnings(FORK_WARNING)
def test_workers_prefetch_ahead_of_the_loop_unless_tracked() -> None:
    """num_workers=2: the plain position runs ahead of the loop; track() counts what the loop got."""
    reference = batches(loader(ResumableSampler(N, seed=6)))
    sampler = ResumableSampler(N, seed=6)
    it = iter(loader(sampler, num_workers=2, prefetch_factor=2))
    next(it)
    # The loader keeps num_workers * prefetch_factor batches in flight beyond the loop's.
    assert sampler.position == min((1 + 2 * 2) * BATCH, N)
    del it

    for k in (1, 3):
        sampler = ResumableSampler(N, seed=6)
        seen = []
        for batch in sampler.track(loader(sampler, num_workers=2)):
            seen.append(batch[0].tolist())
            if len(seen) == k:
                state = sampler.state_dict()
                break
        assert state["position"] == k * BATCH
        resumed = ResumableSampler(N, seed=6)
        resumed.load_state_dict(state)
        assert seen + batches(resumed.track(loader(resumed, num_workers=2))) == reference
        assert (resumed.position, resumed.next_epoch) == (N, 1)


def test_track_counts_exactly_without_workers_and_needs_a_batch_size() -> None:
    """track() matches plain counting with num_workers=0 and says when it lacks a batch size."""
    sampler = ResumableSampler(N, seed=6)
    positions = [sampler.position for _ in sampler.track(loader(sampler))]
    assert positions == [4, 8, 12, 16, 20, 23]
    plain = ResumableSampler(N, batch_size=5)
    assert [len(b) for b in plain.track(_chunks(plain, 5))] == [5, 5, 5, 5, 3]
    with pytest.raises(ValueError, match=r"track\(\) needs the batch size.*pass batch_size="):
        next(ResumableSampler(N).track(_chunks(ResumableSampler(N), 5)))
    with pytest.raises(ValueError, match="loader's batch_size is 4 but the sampler's is 5"):
        next(ResumableSampler(N, batch_size=5).track(loader(ResumableSampler(N))))


def _chunks(sampler: ResumableSampler, size: int) -> Any:
    """A minimal batch iterable with no ``batch_size`` attribute."""
    it = iter(sampler)
    while chunk := list(islice(it, size)):
        yield chunk


def test_plain_loader_generator_resumes_exactly_at_an_epoch_boundary() -> None:
    """shuffle=True with a seeded generator: its state saved between epochs gives the next order."""
    gen = torch.Generator().manual_seed(9)
    plain = DataLoader(dataset(), batch_size=BATCH, shuffle=True, generator=gen)
    epochs = [batches(plain) for _ in range(3)]
    assert epochs[0] != epochs[1]
    gen2 = torch.Generator().manual_seed(9)
    again = DataLoader(dataset(), batch_size=BATCH, shuffle=True, generator=gen2)
    batches(again)
    saved = gen2.get_state()  # what TorchState(loader=gen2) stores at the end of epoch 0
    gen3 = torch.Generator()
    gen3.set_state(saved)
    resumed = DataLoader(dataset(), batch_size=BATCH, shuffle=True, generator=gen3)
    assert [batches(resumed), batches(resumed)] == epochs[1:]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((object(),), {}, TypeError, "data_source must be a dataset with len"),
        ((True,), {}, TypeError, "data_source must be a dataset with len"),
        ((0,), {}, ValueError, "needs at least one sample, but the dataset has 0"),
        ((N,), {"seed": 1.5}, TypeError, "seed must be an int, got float"),
        ((N,), {"shuffle": 1}, TypeError, "shuffle must be True or False"),
        ((N,), {"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_say_what_is_wrong(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Constructor arguments that cannot work are refused with the reason."""
    with pytest.raises(error, match=message):
        ResumableSampler(*args, **kwargs)


def test_bad_epochs_are_refused() -> None:
    """set_epoch and order take non-negative int epochs only."""
    sampler = ResumableSampler(N)
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch must be an int >= 0, got float"):
        sampler.order(1.0)  # type: ignore[arg-type]


def test_loading_a_state_of_another_dataset_or_setting_is_refused() -> None:
    """A state saved for another dataset length or shuffle setting raises ConfigMismatchError."""
    state = ResumableSampler(N).state_dict()
    with pytest.raises(
        ConfigMismatchError,
        match=f"saved for a dataset of {N} samples, but this sampler's dataset has {N + 1}",
    ):
        ResumableSampler(N + 1).load_state_dict(state)
    with pytest.raises(ConfigMismatchError, match="saved with shuffle=True, but this sampler has"):
        ResumableSampler(N, shuffle=False).load_state_dict(state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([1, 2], "must be a dict, got list"),
        ({"epoch": 0}, r"state has no \['position', 'seed', 'shuffle', 'length'\]"),
        ({"position": "3"}, r"state\['position'\] must be an int, got '3'"),
        ({"position": N + 1}, f"position {N + 1}; .* the position at most {N}"),
        ({"epoch": -2}, "epoch -2 and position 0; they must be >= 0"),
    ],
)
def test_malformed_states_are_refused(state: Any, message: str) -> None:
    """A state that is not a sampler's raises ValueError naming the problem, changing nothing."""
    sampler = ResumableSampler(N)
    if isinstance(state, dict) and state != {"epoch": 0}:
        state = {**sampler.state_dict(), **state}  # one bad value in an otherwise good state
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)
    assert (sampler.epoch, sampler.position) == (0, 0)
