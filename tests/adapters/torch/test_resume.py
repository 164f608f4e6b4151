"""Exact resume of what users train: every optimizer and LR scheduler torch has, real model shapes.

Each test trains, saves through ``TorchState``, trains on; then restores into fresh objects
built from another seed (other weights, other generator states), trains the same number of
steps, and requires every byte of the two final states to be equal. The optimizers and
schedulers are enumerated from torch itself, so a class a new torch adds fails
``test_every_optimizer_and_scheduler_has_a_recipe`` until it is given one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy  # noqa: E402
from ckptkit.adapters.torch import TorchState, load_state, save_state, tree_to_state  # noqa: E402
from tests.adapters.torch.models import (  # noqa: E402
    BatchNormCNN,
    TinyGPT,
    TinyMobileNetV3,
    lm_loss,
)
from tests.adapters.torch.test_state import assert_same, assert_tree_same  # noqa: E402

nn = torch.nn
F = nn.functional
lr_scheduler = torch.optim.lr_scheduler

#: Every optimizer class torch.optim exports.
OPTIMIZERS = sorted(
    name
    for name in torch.optim.__all__
    if isinstance(cls := getattr(torch.optim, name), type)
    and issubclass(cls, torch.optim.Optimizer)
    and cls is not torch.optim.Optimizer
)
#: Every LR scheduler torch.optim.lr_scheduler exports, and SWALR from torch.optim.swa_utils.
SCHEDULERS = sorted(
    [
        name
        for name in lr_scheduler.__all__
        if isinstance(cls := getattr(lr_scheduler, name), type)
        and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
        and cls is not lr_scheduler.LRScheduler
    ]
    + ["SWALR"]
)


def assert_resumes_bit_exactly(
    root: Path, build: Callable[[int], TorchState], train: Callable[[TorchState, int], None]
) -> None:
    """Train 3 steps, save, train 3 more; a restore into ``build(1)`` trained 3 steps matches."""
    store = CheckpointStore(root)
    original = build(0)
    train(original, 3)
    save_state(store, 3, original)
    train(original, 3)
    resumed = build(1)
    load_state(store, resumed)
    train(resumed, 3)
    expected, got = tree_to_state(original.state_dict()), tree_to_state(resumed.state_dict())
    for part in sorted(expected):  # part by part, for a clear diff
        assert_tree_same(expected.pop(part), got.pop(part))


# -- every optimizer ----------------------------------------------------------------------------


def optimizers_for(name: str, model: Any) -> dict[str, Any]:
    """The optimizer(s) a user builds for ``name``, by the names TorchState gives them."""
    optim = torch.optim
    params = list(model.parameters())
    if name == "Muon":  # orthogonalised updates for hidden matrices only; AdamW for the rest
        hidden = [p for n, p in model.named_parameters() if ".h." in n and p.ndim == 2]
        rest = [p for p in params if all(p is not h for h in hidden)]
        return {"optimizer": optim.Muon(hidden, lr=0.02), "rest": optim.AdamW(rest, lr=3e-3)}
    recipes: dict[str, Callable[[], Any]] = {
        "ASGD": lambda: optim.ASGD(params, lr=0.05, t0=2),  # averaging starts at step 2
        "Adadelta": lambda: optim.Adadelta(params, lr=1.0),
        "Adafactor": lambda: optim.Adafactor(params, lr=0.01),
        "Adagrad": lambda: optim.Adagrad(params, lr=0.05, lr_decay=0.01),
        "Adam": lambda: optim.Adam(params, lr=3e-3, amsgrad=True),
        "AdamW": lambda: optim.AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1),
        "Adamax": lambda: optim.Adamax(params, lr=3e-3),
        "LBFGS": lambda: optim.LBFGS(params, lr=0.5, max_iter=3, history_size=4),
        "NAdam": lambda: optim.NAdam(params, lr=3e-3, decoupled_weight_decay=True),
        "RAdam": lambda: optim.RAdam(params, lr=3e-3),
        "RMSprop": lambda: optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True),
        "Rprop": lambda: optim.Rprop(params, lr=1e-3),
        "SGD": lambda: optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
        "SparseAdam": lambda: optim.SparseAdam(params, lr=0.01),
    }
    return {"optimizer": recipes[name]()}


class SparseBag(nn.Module):
    """Embeddings with sparse gradients, the model SparseAdam is for."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8, sparse=True)

    def forward(self, tokens: Any) -> Any:
        return self.emb(tokens).tanh().sum(-1)


def _optimizer_run(name: str, compiled: bool) -> Callable[[int], TorchState]:
    def build(seed: int) -> TorchState:
        torch.manual_seed(seed)
        model: Any = SparseBag() if name == "SparseAdam" else TinyGPT()
        if compiled:
            model = torch.compile(model, backend="aot_eager")
        data = torch.Generator().manual_seed(seed)
        return TorchState(model=model, data=data, **optimizers_for(name, model))

    return build


def _optimizer_train(state: TorchState, steps: int) -> None:
    o = state.objects
    optimizers = [v for v in o.values() if isinstance(v, torch.optim.Optimizer)]
    for _ in range(steps):
        tokens = torch.randint(0, 32, (4, 9), generator=o["data"])

        def closure(tokens: Any = tokens) -> Any:
            for optimizer in optimizers:
                optimizer.zero_grad()
            model = o["model"]
            loss = model(tokens).pow(2).mean() if _is_bag(model) else lm_loss(model, tokens)
            loss.backward()
            return loss

        if isinstance(o["optimizer"], torch.optim.LBFGS):
            o["optimizer"].step(closure)  # LBFGS evaluates the loss several times a step
        else:
            closure()
            for optimizer in optimizers:
                optimizer.step()


def _is_bag(model: Any) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), SparseBag)


#: Compiled too: the commonest optimizer, one that evaluates the model several times a step,
#: one in two parts. (Compiling changes the model's keys, never the optimizer's state.)
COMPILED = ("AdamW", "LBFGS", "Muon", "SGD")
OPTIMIZER_CASES = [(n, False) for n in OPTIMIZERS] + [(n, True) for n in COMPILED]


@pytest.mark.parametrize(
    ("name", "compiled"),
    OPTIMIZER_CASES,
    ids=[n + ("-compiled" if c else "") for n, c in OPTIMIZER_CASES],
)
def test_every_optimizer_resumes_a_tied_model_bit_exactly(
    tmp_path: Path, name: str, compiled: bool
) -> None:
    """Each torch.optim optimizer on the tied GPT (compiled too) resumes its state exactly."""
    assert_resumes_bit_exactly(tmp_path, _optimizer_run(name, compiled), _optimizer_train)


# -- every LR scheduler ------------------------------------------------------------------------


def scheduler_for(name: str, opt: Any) -> Any:
    """The scheduler a user builds for ``name``, stepped once a batch."""
    recipes: dict[str, Callable[[], Any]] = {
        "ChainedScheduler": lambda: lr_scheduler.ChainedScheduler(
            [lr_scheduler.ConstantLR(opt, 0.5, total_iters=3), lr_scheduler.ExponentialLR(opt, 0.9)]
        ),
        "ConstantLR": lambda: lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=4),
        "CosineAnnealingLR": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=5),
        "CosineAnnealingWarmRestarts": lambda: lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=2, T_mult=2
        ),
        "CyclicLR": lambda: lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2),
        "ExponentialLR": lambda: lr_scheduler.ExponentialLR(opt, gamma=0.9),
        "LambdaLR": lambda: lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)),
        "LinearLR": lambda: lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4),
        "MultiStepLR": lambda: lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4], gamma=0.5),
        "MultiplicativeLR": lambda: lr_scheduler.MultiplicativeLR(opt, lambda step: 0.95),
        "OneCycleLR": lambda: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        "PolynomialLR": lambda: lr_scheduler.PolynomialLR(opt, total_iters=5, power=2.0),
        "ReduceLROnPlateau": lambda: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        "SequentialLR": lambda: lr_scheduler.SequentialLR(
            opt,
            [lr_scheduler.LinearLR(opt, 0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)],
            milestones=[2],
        ),
        "StepLR": lambda: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "SWALR": lambda: torch.optim.swa_utils.SWALR(opt, swa_lr=0.02, anneal_epochs=3),
    }
    return recipes[name]()


def _scheduler_run(name: str) -> Callable[[int], TorchState]:
    def build(seed: int) -> TorchState:
        torch.manual_seed(seed)
        model = TinyGPT()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(seed)
        return TorchState(
            model=model, optimizer=optimizer, scheduler=scheduler_for(name, optimizer), data=data
        )

    return build


def _scheduler_train(state: TorchState, steps: int) -> None:
    o = state.objects
    for _ in range(steps):
        o["optimizer"].zero_grad()
        loss = lm_loss(o["model"], torch.randint(0, 32, (4, 9), generator=o["data"]))
        loss.backward()
        o["optimizer"].step()
        if isinstance(o["scheduler"], lr_scheduler.ReduceLROnPlateau):
            o["scheduler"].step(loss.item())
        else:
            o["scheduler"].step()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_resumes_bit_exactly(tmp_path: Path, name: str) -> None:
    """Each LR scheduler, stepped every batch, resumes its schedule (and the run) exactly."""
    assert_resumes_bit_exactly(tmp_path, _scheduler_run(name), _scheduler_train)


def test_every_optimizer_and_scheduler_has_a_recipe() -> None:
    """The lists come from torch itself and every class in them has a recipe above."""
    assert {"Adam", "LBFGS", "Muon", "SparseAdam", "Adafactor"} <= set(OPTIMIZERS)
    assert {"ChainedScheduler", "OneCycleLR", "ReduceLROnPlateau", "SequentialLR"} <= set(
        SCHEDULERS
    )
    model = TinyGPT()
    for name in OPTIMIZERS:
        assert optimizers_for(name, SparseBag() if name == "SparseAdam" else model), name
    for name in SCHEDULERS:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        assert scheduler_for(name, opt) is not None, name


# -- the setups the defects were found in -------------------------------------------------------


def test_a_batchnorm_cnn_with_onecycle_bf16_autocast_and_gradscaler_resumes_bit_exactly(
    tmp_path: Path,
) -> None:
    """BatchNorm statistics, OneCycleLR, a GradScaler and bf16 autocast come back exactly."""

    def build(seed: int) -> TorchState:
        torch.manual_seed(seed)
        model = BatchNormCNN()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        return TorchState(
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=12),
            scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2),
            data=torch.Generator().manual_seed(seed),
        )

    def train(state: TorchState, steps: int) -> None:
        o = state.objects
        o["model"].train()
        for _ in range(steps):
            x = torch.randn(8, 1, 12, 12, generator=o["data"])
            y = torch.randint(0, 10, (8,), generator=o["data"])
            o["optimizer"].zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(o["model"](x), y)
            o["scaler"].scale(loss).backward()
            o["scaler"].step(o["optimizer"])
            o["scaler"].update()
            o["scheduler"].step()

    assert_resumes_bit_exactly(tmp_path, build, train)


def test_a_mobilenet_with_adamw_and_cosine_decay_resumes_bit_exactly(tmp_path: Path) -> None:
    """Depthwise convolutions, squeeze-excite, hard-swish, BatchNorm and AdamW come back exactly."""

    def build(seed: int) -> TorchState:
        torch.manual_seed(seed)
        model = TinyMobileNetV3()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        return TorchState(
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler.CosineAnnealingLR(optimizer, T_max=6),
            data=torch.Generator().manual_seed(seed),
        )

    def train(state: TorchState, steps: int) -> None:
        o = state.objects
        o["model"].train()
        for _ in range(steps):
            x = torch.randn(8, 3, 16, 16, generator=o["data"])
            y = torch.randint(0, 10, (8,), generator=o["data"])
            o["optimizer"].zero_grad()
            F.cross_entropy(o["model"](x), y, label_smoothing=0.1).backward()
            o["optimizer"].step()
            o["scheduler"].step()

    assert_resumes_bit_exactly(tmp_path, build, train)


# -- optimizer and scheduler pairs on an MLP, with a GradScaler ----------------------------------


PAIRS = [
    ("Adam", "StepLR"),
    ("AdamW", "MultiStepLR"),
    ("SGD", "CosineAnnealingLR"),
    ("RMSprop", "OneCycleLR"),
    ("Adam", "SequentialLR"),
    ("SGD", "ReduceLROnPlateau"),
    ("AdamW", "LambdaLR"),
    ("Adam-tensor-lr", "StepLR"),
]


def _run(opt_name: str, sched_name: str, *, seed: int, scaler: bool) -> TorchState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    if opt_name == "Adam-tensor-lr":
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.05))
    else:
        opt = optimizers_for(opt_name, model)["optimizer"]
    parts: dict[str, Any] = {
        "model": model,
        "optimizer": opt,
        "scheduler": scheduler_for(sched_name, opt),
        "loader": torch.Generator().manual_seed(seed + 1),
    }
    if scaler:
        parts["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return TorchState(rng=True, **parts)


def _train(state: TorchState, steps: int) -> None:
    o = state.objects
    for _ in range(steps):
        x = torch.randn(8, 4, generator=o["loader"]) * (1 + random.random())
        y = x.sum(1, keepdim=True) + float(np.random.standard_normal())
        loss = ((o["model"](x) - y) ** 2).mean()
        o["optimizer"].zero_grad()
        if "scaler" in o:
            o["scaler"].scale(loss).backward()
            o["scaler"].step(o["optimizer"])
            o["scaler"].update()
        else:
            loss.backward()
            o["optimizer"].step()
        if isinstance(o["scheduler"], lr_scheduler.ReduceLROnPlateau):
            o["scheduler"].step(loss.item())
        else:
            o["scheduler"].step()


@pytest.mark.parametrize(("opt_name", "sched_name"), PAIRS, ids=["+".join(p) for p in PAIRS])
def test_resume_continues_bit_exact(tmp_path: Path, opt_name: str, sched_name: str) -> None:
    """Training on after a restore into fresh objects gives the same bytes as never stopping."""
    scaler = opt_name == "Adam" and sched_name == "StepLR"
    store = CheckpointStore(tmp_path / "store")
    original = _run(opt_name, sched_name, seed=0, scaler=scaler)
    _train(original, 3)
    save_state(store, 3, original)
    _train(original, 4)

    resumed = _run(opt_name, sched_name, seed=100, scaler=scaler)  # other weights and RNG
    random.seed(7)
    np.random.seed(7)
    load_state(store, resumed)
    _train(resumed, 4)

    expected = tree_to_state(original.state_dict())
    got = tree_to_state(resumed.state_dict())
    for part in ("rng", "scheduler"):  # identical, but compare them separately for a clear diff
        assert_tree_same(expected.pop(part), got.pop(part))
    assert_tree_same(expected, got)
    for a, b in zip(
        original.objects["model"].parameters(), resumed.objects["model"].parameters(), strict=True
    ):
        assert_same(a, b)


def test_a_checkpointer_resumes_a_torchstate(tmp_path: Path) -> None:
    """TorchState plugs into Checkpointer: a run stopped after 3 epochs and resumed ends the same."""

    def fit(root: Path, epochs: int) -> TorchState:
        random.seed(0)
        np.random.seed(0)
        state = _run("AdamW", "OneCycleLR", seed=0, scaler=False)
        store = CheckpointStore(root, keep_last=2)
        ckpt = Checkpointer(store, StoppingPolicy(monitor="loss", patience=50), state)
        for epoch in range(ckpt.resume(), epochs):
            _train(state, 1)
            ckpt.step(epoch, {"loss": 1.0 / (epoch + 1)})
        return state

    straight = fit(tmp_path / "straight", 6)
    fit(tmp_path / "stopped", 3)
    resumed = fit(tmp_path / "stopped", 6)
    assert_tree_same(tree_to_state(straight.state_dict()), tree_to_state(resumed.state_dict()))
