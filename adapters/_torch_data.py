"""Resume a PyTorch data pipeline inside an epoch, at the very next batch.

A checkpoint taken after batch k of an epoch resumes exactly only if the resumed run's loader
yields batch k + 1 next, in the same order as the uninterrupted run would have.
:class:`ResumableSampler` makes that possible: the order of epoch ``e`` is a pure function of
``(seed, e)`` (drawn from its own ``torch.Generator``, never from torch's global one), and its
``state_dict()`` records how far into that order the epoch has got. Loaded back, the next
iteration skips what was already consumed, without re-drawing anything.

Put the ``DataLoader`` itself in the state (``TorchState(..., loader=loader)``): that saves
the sampler's position and the loader's generator, and refuses the setups below that would
resume wrongly. Two things outside the sampler matter for a bit-exact resume:

- Pass ``generator=torch.Generator()`` to the ``DataLoader``. Otherwise each ``iter(loader)``
  draws its workers' base seed from torch's global generator, and a run resumed mid-epoch
  starts one iterator more than the uninterrupted run did, so its dropout (which reads the
  global generator, saved with ``rng=True``) no longer matches. ``TorchState`` refuses such a
  loader; a sampler put in the state without its loader raises instead at the resumed
  epoch's first batch, when it finds the global generator drawn from since the resume.
- ``num_workers > 0``: the loader asks the sampler for indices ahead of the loop, up to
  ``num_workers * prefetch_factor`` batches, so the sampler's own count runs ahead of what the
  loop has trained on. Iterate ``sampler.track(loader)`` instead of ``loader``: the sampler then
  counts the batches the loop has received, and a resumed run re-reads the prefetched ones.
  Keep the loader's default ``in_order=True`` (torch 2.6+). With ``num_workers=0`` there is no prefetch
  and plain iteration counts exactly. With the loader in the state, a save inside an epoch of
  an untracked loader with workers raises. (Random numbers drawn inside the workers, by data
  augmentation say, cannot resume inside an epoch: the resumed run starts new workers.)

The common alternative, ``DataLoader(..., shuffle=True, generator=g)`` with ``g`` a seeded
``torch.Generator``, in the state (``TorchState(..., loader=loader)``), resumes exactly from a
checkpoint taken at an epoch boundary: the generator's state then decides the next epoch's
order. It cannot resume inside an epoch, because the order of the epoch in progress was drawn
when it began and the loader keeps no count of what it has handed out, so a save inside an
epoch raises; use :class:`ResumableSampler` for that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any, TypeVar

import torch
from torch.utils.data import Sampler

from ckptkit._errors import ConfigMismatchError

_T = TypeVar("_T")
_KEYS = ("epoch", "position", "seed", "shuffle", "length")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's order: nearby (seed, epoch) pairs give unrelated orders."""
    digest = hashlib.sha256(f"ckptkit.ResumableSampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {type(value).__name__}: {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


class ResumableSampler(Sampler[int]):
    """A shuffling sampler whose position inside an epoch is saved and restored.

    Why: a loader that shuffles with ``RandomSampler`` keeps no record of how far into an
    epoch it is, so a checkpoint taken mid-epoch cannot resume at the next batch. This sampler
    derives epoch ``e``'s order from ``(seed, e)`` alone and counts the indices it has handed
    out; put its DataLoader (or the sampler itself) in the checkpointed state
    (``TorchState(..., loader=loader)``) and a resumed run continues with exactly the batch the
    interrupted run would have trained on next.

    Epochs: ``set_epoch(e)`` moves to epoch ``e`` at its start; called with the epoch the
    sampler is already in, it keeps the position, so a resumed loop that calls
    ``set_epoch(epoch)`` at the top of each epoch continues where it was. An iteration that
    begins once the whole epoch has been handed out starts the next epoch, so a loop that never
    calls ``set_epoch`` still gets a new order every epoch. After loading a checkpoint, the
    epoch the next batch belongs to is :attr:`next_epoch`.

    ``len(sampler)`` is the number of samples in a whole epoch, also after a mid-epoch resume.
    See the module documentation for ``num_workers > 0`` (use :meth:`track`) and for the
    ``DataLoader``'s ``generator=`` argument.

    Args:
        data_source: the dataset (anything with ``len()``) or its number of samples.
        shuffle: a new random order every epoch; False: ``0, 1, ..., n - 1`` every epoch.
        seed: the run's seed; epoch ``e``'s order depends only on ``(seed, e)``.
        batch_size: the number of samples in each batch, for :meth:`track` when the iterable
            it wraps has no ``batch_size`` attribute.

    Raises:
        TypeError: ``data_source`` has no length, or ``seed``/``batch_size`` is not an int.
        ValueError: the dataset is empty, or ``batch_size`` is below 1.

    Example:
        >>> sampler = ResumableSampler(dataset, seed=0)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler,
        ...                     generator=torch.Generator())
        >>> ckpt = Checkpointer(store, None, TorchState(model=model, loader=loader, rng=True))
        >>> step = ckpt.resume()
        >>> for epoch in range(sampler.next_epoch, epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         train(x, y)
        ...         if step % 100 == 0:
        ...             ckpt.save(step)
        ...         step += 1
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if isinstance(data_source, bool) or not isinstance(data_source, (int, Sized)):
            raise TypeError(
                "data_source must be a dataset with len() or its number of samples, got "
                f"{type(data_source).__name__}"
            )
        length = data_source if isinstance(data_source, int) else len(data_source)
        if length < 1:
            raise ValueError(
                f"ResumableSampler needs at least one sample, but the dataset has {length}"
            )
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
        if batch_size is not None:
            _check_int(batch_size, "batch_size", minimum=1)
        self._length = length
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self._epoch = 0
        self._position = 0  # indices of this epoch handed out
        self._consumed: int | None = None  # indices the loop has received, under track()
        self._tracking = False
        self._generation = 0  # bumped whenever the state is replaced: live iterations go stale
        # Set by TorchState after a resume inside an epoch: the global generator's state then,
        # which must be unchanged when the resumed epoch's first index is drawn.
        self._resumed_rng: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._length

    @property
    def epoch(self) -> int:
        """The epoch the sampler is in."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many samples of this epoch count as consumed: what a checkpoint records."""
        return self._position if self._consumed is None else self._consumed

    @property
    def next_epoch(self) -> int:
        """The epoch the next sample belongs to: :attr:`epoch`, or the one after if it is done."""
        return self._epoch + 1 if self.position >= self._length else self._epoch

    def order(self, epoch: int) -> list[int]:
        """The whole order of ``epoch``'s indices: the same in every process, for a torch version."""
        _check_int(epoch, "epoch", minimum=0)
        if not self.shuffle:
            return list(range(self._length))
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order: list[int] = torch.randperm(self._length, generator=generator).tolist()
        return order

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; the epoch the sampler is in keeps its position."""
        epoch = _check_int(epoch, "epoch", minimum=0)
        if epoch != self._epoch:
            self._epoch, self._position, self._consumed = epoch, 0, None
            self._generation += 1
            self._resumed_rng = None

    def _expect_global_rng(self, state: torch.Tensor) -> None:
        """After a resume inside an epoch: check at the next iteration that ``state`` is intact."""
        if 0 < self.position < self._length:
            self._resumed_rng = state

    def _check_global_rng(self) -> None:
        expected, self._resumed_rng = self._resumed_rng, None
        if expected is not None and not torch.equal(torch.get_rng_state(), expected):
            raise ConfigMismatchError(
                f"ResumableSampler: resumed inside epoch {self._epoch} at sample "
                f"{self.position}, but torch's global random generator was drawn from between "
                "the resume and this epoch's next batch, which the uninterrupted run did not "
                "do, so the runs no longer match (dropout differs from here on). Usually the "
                "DataLoader drew its workers' seed from it: pass generator=torch.Generator() to "
                "the DataLoader, and draw no random numbers between the resume and the loop"
            )

    def __iter__(self) -> Iterator[int]:
        self._check_global_rng()
        start = self.position
        if start >= self._length:  # the epoch is done: begin the next one
            self._epoch, start = self._epoch + 1, 0
        self._generation += 1
        generation = self._generation
        self._position = start
        self._consumed = start if self._tracking else None
        order = self.order(self._epoch)
        for i in range(start, self._length):
            if self._generation != generation:
                raise RuntimeError(
                    "the ResumableSampler's state changed (set_epoch, load_state_dict or a new "
                    "iteration) while this iteration was in progress; start a new one with "
                    "iter(loader)"
                )
            # Counted before the index goes out: once the loader has a batch, it is counted.
            self._position = i + 1
            yield order[i]

    def track(self, loader: Iterable[_T]) -> Iterator[_T]:
        """Iterate ``loader``, counting the batches the loop receives rather than those prefetched.

        Needed for exact resume when ``loader`` is a ``DataLoader`` with ``num_workers > 0``
        (see the module documentation); harmless with ``num_workers=0``. Each batch counts
        ``batch_size`` samples (the loader's, or this sampler's when the loader has none); the
        epoch's last, possibly smaller, batch counts as the rest of the epoch.

        Raises:
            ValueError: neither the loader nor the sampler says what the batch size is, or
                they say different things.
        """
        unit = getattr(loader, "batch_size", None)
        if unit is None:
            unit = self.batch_size
        elif self.batch_size is not None and unit != self.batch_size:
            raise ValueError(
                f"the loader's batch_size is {unit} but the sampler's is {self.batch_size}; "
                "pass the same batch_size to both"
            )
        if unit is None:
            raise ValueError(
                "track() needs the batch size: the loader has no batch_size attribute, so pass "
                "batch_size= to ResumableSampler"
            )
        unit = _check_int(unit, "batch_size", minimum=1)
        self._tracking = True
        try:
            for batch in loader:
                self._consumed = min(self.position + unit, self._position)
                yield batch
            self._consumed = None  # the loader is exhausted: so is the epoch
        finally:
            self._tracking = False

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state: ``{"epoch", "position", "seed", "shuffle", "length"}``."""
        return {
            "epoch": self._epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self._length,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next iteration continues after it.

        The seed comes from the state (it is part of the run being resumed). An iteration
        in progress when this is called raises on its next index.

        Raises:
            ConfigMismatchError: the state was saved for a dataset of another length, or with
                another ``shuffle``.
            ValueError: the state is not a sampler state (the message names the bad key).
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"a ResumableSampler state must be a dict, got {type(state).__name__}; pass "
                "what ResumableSampler.state_dict() returned"
            )
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise ValueError(
                f"the ResumableSampler state has no {missing} (keys: {sorted(state)}); pass "
                "what ResumableSampler.state_dict() returned"
            )
        for key in ("epoch", "position", "length", "seed"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ResumableSampler state[{key!r}] must be an int, got {value!r}")
        if state["length"] != self._length:
            raise ConfigMismatchError(
                f"the ResumableSampler state was saved for a dataset of {state['length']} "
                f"samples, but this sampler's dataset has {self._length}; resume with the "
                "same dataset, or start a new run"
            )
        if state["shuffle"] is not self.shuffle:
            raise ConfigMismatchError(
                f"the ResumableSampler state was saved with shuffle={state['shuffle']!r}, but "
                f"this sampler has shuffle={self.shuffle!r}; construct it as the saved run did"
            )
        if state["epoch"] < 0 or not 0 <= state["position"] <= self._length:
            raise ValueError(
                f"ResumableSampler state has epoch {state['epoch']} and position "
                f"{state['position']}; they must be >= 0 and the position at most "
                f"{self._length}"
            )
        self._epoch, self._position = state["epoch"], state["position"]
        self.seed = state["seed"]
        self._consumed = None
        self._generation += 1
        self._resumed_rng = None
