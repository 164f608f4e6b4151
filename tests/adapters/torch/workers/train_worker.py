"""A deterministic torch training run for the SIGKILL resume tests; resumes from its store.

Usage: ``python train_worker.py ROOT MODE [SAVE_EVERY]``. MODE ``epoch``: a DataLoader shuffling
with a seeded ``torch.Generator``, saved with the state, checkpoints at each epoch's end only.
MODE ``mid``: a :class:`ResumableSampler` in the state, checkpoints every SAVE_EVERY batches
(default 4) and at each epoch's end. MODE ``lm``: as ``mid``, but a GPT-2-like language model
with tied embeddings, AdamW and a per-batch OneCycleLR, its DataLoader itself in the state.
Steps count the batches trained, so they only ever grow. Prints
``saving N`` before and ``saved N`` after each save (flushed), and ``digest HEX`` (SHA-256 of
every parameter's bytes) at the end. With ``CKPTKIT_KILL_IN_SAVE=K`` in the environment, the
process SIGKILLs itself at the K-th ``os.replace`` after resuming: inside the commit of its K-th
save, after the checkpoint's directory is written and before the manifest lists it.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy
from ckptkit.adapters.torch import ResumableSampler, TorchState

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository, for tests.*
from tests.adapters.torch.models import TinyGPT, lm_loss

SAMPLES, FEATURES, HIDDEN, BATCH, EPOCHS = 320, 12, 48, 16, 5  # 256 to train on: 16 batches
VOCAB, CONTEXT = 32, 8


def make_data() -> TensorDataset:
    """A noisy regression task from its own seeded generator."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    w = torch.randn(FEATURES, 1, generator=gen)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(SAMPLES, 1, generator=gen)
    return TensorDataset(x, y)


def make_tokens() -> TensorDataset:
    """Token rows with structure to learn: each is an arithmetic run modulo the vocabulary."""
    gen = torch.Generator().manual_seed(4321)
    start = torch.randint(0, VOCAB, (SAMPLES, 1), generator=gen)
    stride = torch.randint(1, 4, (SAMPLES, 1), generator=gen)
    return TensorDataset((start + stride * torch.arange(CONTEXT + 1)) % VOCAB)


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters' bytes, in registration order."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def say(line: str) -> None:
    print(line, flush=True)


def kill_at_replace(k: int) -> None:
    """Make the k-th ``os.replace`` from now (the k-th save's commit) kill the process instead."""
    calls = 0
    real = os.replace

    def replace(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args, **kwargs)

    os.replace = replace


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    save_every = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    assert mode in ("epoch", "mid", "lm"), mode
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # Every generator TorchState(rng=True) saves starts from a seed, so that the uninterrupted
    # run's checkpoints can be compared with a resumed run's, byte for byte.
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)

    if mode == "lm":
        return train_lm(root, save_every)
    data = make_data()
    train, val = torch.utils.data.Subset(data, range(256)), data[256:]
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    objects: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if mode == "epoch":
        shuffle = torch.Generator().manual_seed(7)
        loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=shuffle)
        objects["loader"] = shuffle
        sampler = None
    else:
        sampler = ResumableSampler(train, seed=7)
        # generator=: iter(loader) must not draw from the global generator dropout uses.
        loader = DataLoader(train, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
        objects["sampler"] = sampler
    store = CheckpointStore(root, keep_last=2)
    policy = StoppingPolicy(monitor="val_loss", patience=10)
    ckpt = Checkpointer(store, policy, TorchState(rng=True, **objects))

    ckpt.resume()
    step = 0 if ckpt.resumed_from is None else ckpt.resumed_from.step
    say(f"resumed {step}")
    if os.environ.get("CKPTKIT_KILL_IN_SAVE"):
        kill_at_replace(int(os.environ["CKPTKIT_KILL_IN_SAVE"]))
    first = sampler.next_epoch if sampler is not None else step // len(loader)

    def save(step: int, metrics: dict[str, float] | None = None) -> None:
        say(f"saving {step}")
        if metrics is None:
            ckpt.save(step)
        else:
            ckpt.step(step, metrics)
        say(f"saved {step}")

    for epoch in range(first, EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)  # keeps the position when resuming inside this epoch
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            step += 1
            inside = sampler is not None and sampler.position < len(sampler)
            if inside and step % save_every == 0:
                save(step)
        scheduler.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(model(val[0]), val[1]).item()
        save(step, {"val_loss": val_loss})
    say(f"digest {digest(model)}")


def train_lm(root: str, save_every: int) -> None:
    """The ``lm`` mode: a tied GPT-2-like model, its DataLoader (a ResumableSampler) in the state."""
    data = make_tokens()
    train, val = torch.utils.data.Subset(data, range(256)), data[256:][0]
    model = TinyGPT(vocab=VOCAB, context=CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=EPOCHS * 16)
    sampler = ResumableSampler(train, seed=7)
    loader = DataLoader(train, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    state = TorchState(
        rng=True, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader
    )
    ckpt = Checkpointer(
        CheckpointStore(root, keep_last=2), StoppingPolicy(monitor="val_loss"), state
    )
    ckpt.resume()
    step = 0 if ckpt.resumed_from is None else ckpt.resumed_from.step
    say(f"resumed {step}")
    if os.environ.get("CKPTKIT_KILL_IN_SAVE"):
        kill_at_replace(int(os.environ["CKPTKIT_KILL_IN_SAVE"]))
    for epoch in range(sampler.next_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        model.train()
        for (tokens,) in loader:
            optimizer.zero_grad()
            lm_loss(model, tokens).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if sampler.position < len(sampler) and step % save_every == 0:
                say(f"saving {step}")
                ckpt.save(step)
                say(f"saved {step}")
        model.eval()
        with torch.no_grad():
            val_loss = lm_loss(model, val).item()
        say(f"saving {step}")
        ckpt.step(step, {"val_loss": val_loss})
        say(f"saved {step}")
    say(f"digest {digest(model)}")


if __name__ == "__main__":
    main()
