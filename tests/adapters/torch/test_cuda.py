"""The torch adapter on a GPU: GPU-made state restores onto the GPU and the CPU; CUDA RNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore  # noqa: E402 (after the importorskip)
from ckptkit.adapters.torch import (  # noqa: E402
    TorchState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
nn = torch.nn


def bits(t: Any) -> bytes:
    """The raw bytes of a tensor's values in C order."""
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def trained(device: str, seed: int) -> TorchState:
    """A small model with AdamW and StepLR on ``device``, after a few steps with dropout."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    state = TorchState(model=model, optimizer=opt, scheduler=sched, rng=True)
    train(state, 3)
    return state


def train(state: TorchState, steps: int) -> None:
    """Run ``steps`` optimizer steps on random data drawn on the model's device."""
    model, opt, sched = (state.objects[k] for k in ("model", "optimizer", "scheduler"))
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 4, device=device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_gpu_state_restores_onto_the_gpu_and_the_cpu(tmp_path: Path) -> None:
    """A GPU-made checkpoint loads bit-exact onto a GPU model and, map_location="cpu", a CPU one."""
    source = trained("cuda", seed=0)
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 3, source)
    src_model = source.objects["model"]

    for device, map_location in (("cuda", None), ("cpu", "cpu")):
        target = trained(device, seed=1)
        load_state(store, target, map_location=map_location)
        for a, b in zip(
            src_model.state_dict().values(),
            target.objects["model"].state_dict().values(),
            strict=True,
        ):
            assert b.device.type == device
            assert bits(a) == bits(b)
        src_opt = source.objects["optimizer"].state_dict()["state"]
        got_opt = target.objects["optimizer"].state_dict()["state"]
        for key, slots in src_opt.items():
            for name, value in slots.items():
                assert bits(value) == bits(got_opt[key][name]), (key, name)
        first = next(target.objects["model"].parameters())
        assert target.objects["optimizer"].state[first]["exp_avg"].device.type == device


def test_resume_on_the_gpu_continues_bit_exact(tmp_path: Path) -> None:
    """Training on the GPU after a restore matches never stopping, CUDA RNG (dropout) included."""
    original = trained("cuda", seed=0)
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 3, original)
    train(original, 3)
    resumed = trained("cuda", seed=5)
    load_state(store, resumed)
    train(resumed, 3)
    for a, b in zip(
        original.objects["model"].parameters(), resumed.objects["model"].parameters(), strict=True
    ):
        assert bits(a) == bits(b)


def test_cuda_rng_is_captured_and_restored() -> None:
    """rng=True holds every initialised device's CUDA generator and restores it."""
    torch.rand(1, device="cuda")  # CUDA is initialised from here on
    state = TorchState(rng=True)
    tree = state.state_dict()
    assert len(tree["rng"]["cuda"]) == torch.cuda.device_count()
    first = torch.rand(5, device="cuda")
    torch.rand(7, device="cuda")
    state.load_state_dict(tree)
    assert torch.equal(torch.rand(5, device="cuda"), first)


def test_cuda_tensors_and_generators_roundtrip() -> None:
    """GPU tensors (bfloat16 too) are copied to host arrays and come back on map_location."""
    x = torch.randn(3, 5, device="cuda").to(torch.bfloat16).t()
    gen = torch.Generator(device="cuda").manual_seed(3)
    tree = state_to_tree({"x": x, "gen": gen.get_state()})
    back = tree_to_state(tree, map_location="cuda")
    assert back["x"].device.type == "cuda" and bits(back["x"]) == bits(x)
    other = torch.Generator(device="cuda")
    other.set_state(back["gen"].cpu())
    assert torch.equal(
        torch.rand(4, device="cuda", generator=other), torch.rand(4, device="cuda", generator=gen)
    )
