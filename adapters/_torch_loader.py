"""A DataLoader as a part of TorchState: its shuffling generators and its sampler's position.

A ``DataLoader`` has no ``state_dict()``, but what decides the batches a resumed run gets is
reachable from it: the generator it shuffles with, and a sampler that counts its position
(:class:`ResumableSampler`). Given the loader itself, :class:`TorchState` saves those, and also
sees the two ways a loader makes a resume silently wrong, and refuses them:

- a save inside an epoch when nothing saves the position in it (``shuffle=True``'s
  ``RandomSampler``, a ``SequentialSampler``, a ``DistributedSampler``): the resumed run would
  start the epoch over, in a new order. :class:`LoaderState` knows an epoch is in progress by
  remembering the loader's newest iterator (it wraps the loader's ``_get_iterator``, the one
  method ``DataLoader.__iter__`` calls to make one) and reading how many batches it has
  handed to the loop;
- a :class:`ResumableSampler` in a loader without ``generator=``, with the global generators in
  the state (``rng=True``): each ``iter(loader)`` draws a seed from torch's global generator, and a
  run resumed inside an epoch makes one iterator more than the uninterrupted run did, so its
  dropout masks differ from then on. Refused when the ``TorchState`` is made.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils.data import DataLoader

from ckptkit._errors import ConfigMismatchError, UnsupportedStateError

from ._torch_data import ResumableSampler

_NO_POSITION = (
    "use a sampler that saves its position (DataLoader(..., sampler=ResumableSampler(dataset, "
    "seed=...), generator=torch.Generator())) or save only between epochs"
)


def is_plain_loader(obj: Any) -> bool:
    """A DataLoader with no state of its own (a stateful subclass saves itself)."""
    return isinstance(obj, DataLoader) and not callable(getattr(obj, "state_dict", None))


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


class LoaderState:
    """The resumable state of a plain ``DataLoader``, as one part of a :class:`TorchState`.

    The state is ``{"generator", "sampler_generator", "sampler"}``: the states of the loader's
    ``generator=``, of its sampler's own generator when that is another one, and of its sampler
    (or batch sampler) when that has ``state_dict()``; each is None when there is none.

    Args:
        loader: the DataLoader.
        name: the part's name in the TorchState, for messages.
        rng: whether the TorchState holds the global generators.

    Raises:
        ValueError: the loader cannot resume exactly under this setting (a ResumableSampler
            without ``generator=`` and ``rng=True``, or shuffling from the global generator
            with ``rng=False``); the message says what to pass.
    """

    def __init__(self, loader: DataLoader[Any], *, name: str, rng: bool) -> None:
        self.loader = loader
        self.name = name
        sampler = loader.sampler
        batch_sampler = loader.batch_sampler
        self.position_keeper: Any = next(
            (s for s in (sampler, batch_sampler) if s is not None and _stateful(s)), None
        )
        own = getattr(sampler, "generator", None)
        self.sampler_generator = (
            own if isinstance(own, torch.Generator) and own is not loader.generator else None
        )
        shuffles_globally = type(sampler).__name__ == "RandomSampler" and own is None
        if isinstance(self.position_keeper, ResumableSampler) and loader.generator is None and rng:
            raise ValueError(
                f"TorchState({name}=...): the DataLoader has a ResumableSampler but no "
                "generator=, so each iter(loader) draws a seed from torch's global generator and "
                "a run resumed inside an epoch draws once more than the uninterrupted run "
                "(its dropout then differs); pass generator=torch.Generator() to the DataLoader"
            )
        if shuffles_globally and loader.generator is None and not rng:
            raise ValueError(
                f"TorchState({name}=...): the DataLoader shuffles with torch's global generator, "
                "which rng=False leaves out of the state, so a resumed run would see another "
                "order; pass generator=torch.Generator().manual_seed(seed) to the DataLoader, "
                "or rng=True"
            )
        self._latest: weakref.ref[Any] | None = None
        self._generator_before: torch.Tensor | None = None  # before the newest iterator's draw
        self._watch(loader)

    def _watch(self, loader: DataLoader[Any]) -> None:
        """Remember each iterator the loader makes (weakly: it still dies with the loop)."""
        make = getattr(loader, "_get_iterator", None)
        if not callable(make):
            raise TypeError(
                "this torch's DataLoader has no _get_iterator(), which TorchState watches to "
                "know whether an epoch is in progress; pass the loader's generator and sampler "
                "to TorchState instead of the loader"
            )

        def get_iterator() -> Any:
            generator = loader.generator
            before = None if generator is None else generator.get_state()
            iterator = make()  # draws the workers' base seed from the generator
            self._latest, self._generator_before = weakref.ref(iterator), before
            return iterator

        # DataLoader.__iter__ calls self._get_iterator(): an instance attribute takes its place.
        loader._get_iterator = get_iterator  # type: ignore[method-assign]

    def batches_in(self) -> tuple[int, int | None] | None:
        """``(batches handed to the loop, batches in the epoch)`` while an epoch is in progress."""
        iterator = self._latest() if self._latest is not None else None
        if iterator is None:
            return None
        done = int(getattr(iterator, "_num_yielded", 0))
        try:
            total: int | None = len(iterator)
        except TypeError:  # an IterableDataset without __len__
            total = None
        if done == 0 or (total is not None and done >= total):
            return None
        return done, total

    def state_dict(self) -> dict[str, Any]:
        """The loader's state, refusing a save inside an epoch that could not resume there.

        Raises:
            UnsupportedStateError: an epoch is in progress and nothing saves its position, or
                a ResumableSampler's count runs ahead of the loop (``num_workers > 0``).
        """
        progress = self.batches_in()
        if progress is not None:
            done, total = progress
            where = f"batch {done}" + (f" of {total}" if total is not None else "")
            keeper = self.position_keeper
            if keeper is None:
                raise UnsupportedStateError(
                    f"TorchState part {self.name!r}: saved after {where} of an epoch, but the "
                    f"DataLoader's {type(self.loader.sampler).__name__} keeps no position in it, "
                    "so a resumed run would start the epoch over in another order; " + _NO_POSITION
                )
            if (
                isinstance(keeper, ResumableSampler)
                and self.loader.num_workers > 0
                and not keeper._tracking
            ):
                raise UnsupportedStateError(
                    f"TorchState part {self.name!r}: saved after {where} of an epoch, but with "
                    f"num_workers={self.loader.num_workers} the ResumableSampler has counted the "
                    "batches the workers prefetched too; iterate sampler.track(loader) instead "
                    "of the loader"
                )
        state = self.current()
        if (
            progress is not None
            and isinstance(self.position_keeper, ResumableSampler)
            and 0 < self.position_keeper.position < len(self.position_keeper)
        ):
            # The resumed run makes this epoch's iterator again, which draws from the generator
            # again: save the generator as it was before this iterator drew, so the redrawn seed
            # and every later one are the uninterrupted run's.
            state["generator"] = self._generator_before
        return state

    def current(self) -> dict[str, Any]:
        """The loader's state as it is, without the checks (to put it back after a failure)."""
        generator = self.loader.generator
        return {
            "generator": None if generator is None else generator.get_state(),
            "sampler_generator": (
                None if self.sampler_generator is None else self.sampler_generator.get_state()
            ),
            "sampler": None if self.position_keeper is None else self.position_keeper.state_dict(),
        }

    def load_state_dict(self, state: Any) -> None:
        """Put a state from :meth:`state_dict` back into the loader's generators and sampler.

        Raises:
            ConfigMismatchError: the state was saved from a loader with other generators or
                another kind of sampler (the message says which).
        """
        if not isinstance(state, dict) or set(state) != {
            "generator",
            "sampler_generator",
            "sampler",
        }:
            raise ConfigMismatchError(
                f"TorchState part {self.name!r}: the saved state is not a DataLoader's; pass the "
                "same kind of object as when it was saved"
            )
        have = {
            "generator": self.loader.generator,
            "sampler_generator": self.sampler_generator,
            "sampler": self.position_keeper,
        }
        for key, saved in state.items():
            if (saved is None) != (have[key] is None):
                raise ConfigMismatchError(
                    f"TorchState part {self.name!r}: the DataLoader was saved "
                    f"{'without' if saved is None else 'with'} a {key.replace('_', ' ')}, and "
                    f"this one has {'none' if have[key] is None else 'one'}; build the "
                    "DataLoader as when it was saved"
                )
        if self.loader.generator is not None:
            self.loader.generator.set_state(state["generator"].cpu())
        if self.sampler_generator is not None:
            self.sampler_generator.set_state(state["sampler_generator"].cpu())
        if self.position_keeper is not None:
            self.position_keeper.load_state_dict(state["sampler"])
