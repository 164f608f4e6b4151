"""A DataLoader in TorchState: saved and resumed exactly, and the setups that would resume wrongly refused."""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ckptkit import (  # noqa: E402
    Checkpointer,
    CheckpointStore,
    ConfigMismatchError,
    UnsupportedStateError,
)
from ckptkit.adapters.torch import ResumableSampler, TorchState, tree_to_state  # noqa: E402
from tests.adapters.torch.test_data import FORK_WARNING  # noqa: E402
from tests.adapters.torch.test_state import assert_tree_same  # noqa: E402

N, BATCH = 22, 4  # 6 batches an epoch, the last one short


def dataset() -> Any:
    """Samples that are their own indices, with a feature vector for a small model."""
    return TensorDataset(torch.arange(N), torch.linspace(-1, 1, N * 3).reshape(N, 3))


def shuffling_loader(seed: int = 5, **options: Any) -> Any:
    """The common loader: shuffle=True with a seeded generator."""
    return DataLoader(
        dataset(),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def resumable_loader(seed: int = 5, **options: Any) -> Any:
    """A loader whose ResumableSampler saves its place in the epoch."""
    generator = options.pop("generator", torch.Generator())
    sampler = ResumableSampler(dataset(), seed=seed)
    return DataLoader(dataset(), batch_size=BATCH, sampler=sampler, generator=generator, **options)


def ids(batch: Any) -> list[int]:
    return [int(i) for i in batch[0]]


# -- trap 1: a save inside an epoch that nothing can resume ------------------------------------


@pytest.mark.parametrize("shuffle", [True, False], ids=["RandomSampler", "SequentialSampler"])
def test_a_save_inside_an_epoch_of_a_loader_without_a_position_is_refused(
    tmp_path: Path, shuffle: bool
) -> None:
    """Saving after batch 3 of 6 of a shuffle=True (or False) loader raises and writes nothing."""
    loader = DataLoader(
        dataset(), batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(1)
    )
    store = CheckpointStore(tmp_path)
    ckpt = Checkpointer(store, None, TorchState(loader=loader))
    ckpt.save(0)  # before the first epoch: nothing is in progress
    sampler = "RandomSampler" if shuffle else "SequentialSampler"
    for batch_index, _ in enumerate(loader):
        if batch_index == 2:
            with pytest.raises(UnsupportedStateError) as caught:
                ckpt.save(3)
            assert str(caught.value) == (
                "TorchState part 'loader': saved after batch 3 of 6 of an epoch, but the "
                f"DataLoader's {sampler} keeps no position in it, so a resumed run would start "
                "the epoch over in another order; use a sampler that saves its position "
                "(DataLoader(..., sampler=ResumableSampler(dataset, seed=...), "
                "generator=torch.Generator())) or save only between epochs"
            )
        if batch_index == 5:
            ckpt.save(6)  # the epoch's last batch is in: the next epoch starts afresh
    ckpt.save(7)  # between epochs
    assert [r.step for r in store.records()] == [0, 6, 7]


def test_a_held_iterator_left_inside_an_epoch_still_counts(tmp_path: Path) -> None:
    """An iterator kept past a break is in progress until a new epoch's iterator replaces it."""
    loader = shuffling_loader()
    state = TorchState(loader=loader, rng=False)
    it = iter(loader)
    next(it)
    with pytest.raises(UnsupportedStateError, match=r"saved after batch 1 of 6 of an epoch"):
        state.state_dict()
    list(loader)  # a whole new epoch
    state.state_dict()
    del it


def test_a_shuffling_loader_resumes_exactly_between_epochs(tmp_path: Path) -> None:
    """The generator saved with the loader at an epoch's end gives the next epochs' order."""
    loader = shuffling_loader()
    epochs = [[ids(b) for b in loader] for _ in range(3)]
    assert epochs[1] != epochs[0]
    first = shuffling_loader()
    list(first)
    store = CheckpointStore(tmp_path)
    Checkpointer(store, None, TorchState(loader=first, rng=False)).save(1)
    resumed = shuffling_loader(seed=99)
    Checkpointer(store, None, TorchState(loader=resumed, rng=False)).resume()
    assert [[ids(b) for b in resumed] for _ in range(2)] == epochs[1:]


# -- trap 2: a ResumableSampler whose loader draws from the global generator ------------------


def test_a_resumable_loader_without_a_generator_is_refused_with_rng() -> None:
    """TorchState refuses a ResumableSampler loader without generator= when it holds the RNG."""
    loader = resumable_loader(generator=None)
    message = (
        "TorchState(loader=...): the DataLoader has a ResumableSampler but no generator=, so "
        "each iter(loader) draws a seed from torch's global generator and a run resumed inside "
        "an epoch draws once more than the uninterrupted run (its dropout then differs); pass "
        "generator=torch.Generator() to the DataLoader"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        TorchState(loader=loader)
    TorchState(loader=loader, rng=False)  # nothing global is restored, so nothing to break


def test_a_loader_shuffling_from_the_global_generator_needs_rng() -> None:
    """shuffle=True without generator= draws each epoch's order globally: rng=False is refused."""
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    with pytest.raises(
        ValueError, match=r"shuffles with torch's global generator, which rng=False"
    ):
        TorchState(loader=loader, rng=False)
    TorchState(loader=loader)


def _run_sampler_in_state(
    root: Path, *, generator: Any, resume: bool, batches: int
) -> list[list[int]]:
    """Train-like loop: a sampler in the state (not its loader), dropout on the global generator."""
    torch.manual_seed(0)
    sampler = ResumableSampler(dataset(), seed=3)
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=sampler, generator=generator)
    ckpt = Checkpointer(CheckpointStore(root), None, TorchState(sampler=sampler))
    if resume:
        ckpt.resume()
    seen = []
    for batch in islice(loader, batches):
        seen.append(ids(batch))
        torch.rand(1)  # dropout's draw
        if not resume and len(seen) == 2:
            ckpt.save(2)
    return seen


def test_a_sampler_resumed_inside_an_epoch_catches_a_loader_drawing_global_seeds(
    tmp_path: Path,
) -> None:
    """Resumed mid-epoch, a sampler whose loader lacks generator= raises at the next batch."""
    _run_sampler_in_state(tmp_path / "a", generator=None, resume=False, batches=3)
    with pytest.raises(ConfigMismatchError) as caught:
        _run_sampler_in_state(tmp_path / "a", generator=None, resume=True, batches=1)
    assert str(caught.value).startswith(
        "ResumableSampler: resumed inside epoch 0 at sample 8, but torch's global random "
        "generator was drawn from between the resume and this epoch's next batch"
    )
    assert "pass generator=torch.Generator() to the DataLoader" in str(caught.value)

    first = _run_sampler_in_state(
        tmp_path / "b", generator=torch.Generator(), resume=False, batches=6
    )
    rest = _run_sampler_in_state(
        tmp_path / "b", generator=torch.Generator(), resume=True, batches=4
    )
    assert first[:2] + rest == first


# -- the fixed setup resumes exactly ------------------------------------------------------------


def _train(root: Path, *, stop_after: int | None, seed: int) -> TorchState:
    """Two epochs of a dropout model on a ResumableSampler loader, saving every 2 batches."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = resumable_loader()
    state = TorchState(model=model, optimizer=optimizer, loader=loader)
    ckpt = Checkpointer(CheckpointStore(root), None, state)
    ckpt.resume()
    step = 0 if ckpt.resumed_from is None else ckpt.resumed_from.step
    sampler = loader.sampler
    for epoch in range(sampler.next_epoch, 2):
        sampler.set_epoch(epoch)
        for _, x in loader:
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            step += 1
            if step % 2 == 0:
                ckpt.save(step)
            if step == stop_after:
                return state
    ckpt.save(step + 1000)
    return state


def test_a_loader_in_the_state_resumes_inside_an_epoch_bit_exactly(tmp_path: Path) -> None:
    """Stopped after batch 4 of epoch 0 and resumed in fresh objects, the run ends the same."""
    straight = _train(tmp_path / "straight", stop_after=None, seed=0)
    _train(tmp_path / "stopped", stop_after=5, seed=0)  # its last save: after batch 4
    resumed = _train(tmp_path / "stopped", stop_after=None, seed=1)
    assert_tree_same(tree_to_state(straight.state_dict()), tree_to_state(resumed.state_dict()))
    last = [CheckpointStore(tmp_path / d).latest() for d in ("straight", "stopped")]
    assert last[0] is not None and last[1] is not None and last[0].step == last[1].step == 1012
    assert_tree_same(
        tree_to_state(CheckpointStore(tmp_path / "straight").load()),
        tree_to_state(CheckpointStore(tmp_path / "stopped").load()),
    )


@pytest.mark.filterwarnings(FORK_WARNING)
def test_an_untracked_loader_with_workers_is_refused_inside_an_epoch() -> None:
    """num_workers > 0: the sampler counts prefetched batches, so only track() may save mid-epoch."""
    loader = resumable_loader(num_workers=2)
    state = TorchState(loader=loader, rng=False)
    it = iter(loader)
    next(it)
    with pytest.raises(UnsupportedStateError, match=r"iterate sampler\.track\(loader\) instead"):
        state.state_dict()
    del it
    sampler = loader.sampler
    for batch_index, _ in enumerate(sampler.track(loader)):
        if batch_index == 1:
            assert state.state_dict()["loader"]["sampler"]["position"] == 2 * BATCH
            break


# -- what is saved, and loading into another loader ---------------------------------------------


def test_a_loader_state_loads_only_into_a_loader_built_alike(tmp_path: Path) -> None:
    """A loader saved with a generator and a sampler refuses a loader without them, by name."""
    store = CheckpointStore(tmp_path)
    Checkpointer(store, None, TorchState(loader=resumable_loader(), rng=False)).save(0)
    saved = store.load(0)["loader"]
    assert set(saved) == {"generator", "sampler_generator", "sampler"}
    assert saved["sampler_generator"] is None and saved["sampler"]["length"] == N
    other = DataLoader(dataset(), batch_size=BATCH)
    with pytest.raises(
        ConfigMismatchError, match=r"was saved with a generator, and this one has none"
    ):
        Checkpointer(store, None, TorchState(loader=other, rng=False)).resume()
    with pytest.raises(
        ConfigMismatchError, match=r"saved from a DataLoader, and this TorchState has a Generator"
    ):
        Checkpointer(store, None, TorchState(loader=torch.Generator(), rng=False)).resume()
