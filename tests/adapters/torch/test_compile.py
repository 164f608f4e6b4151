"""torch.compile and DataParallel wrappers: a state saved through any wrapping loads into any other."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore, ConfigMismatchError  # noqa: E402
from ckptkit.adapters.torch import TorchState, load_state, save_state, tree_to_state  # noqa: E402
from tests.adapters.torch.models import TinyGPT, lm_loss  # noqa: E402
from tests.adapters.torch.test_state import assert_same, assert_tree_same  # noqa: E402

nn = torch.nn


def compiled(module: Any) -> Any:
    """``torch.compile`` with the eager backend: the same wrapper, compiled in a blink."""
    return torch.compile(module, backend="eager")


WRAPPINGS: dict[str, Callable[[Any], Any]] = {
    "bare": lambda m: m,
    "dp": nn.DataParallel,
    "compiled": compiled,
    "dp-of-compiled": lambda m: nn.DataParallel(compiled(m)),
    "compiled-dp": lambda m: compiled(nn.DataParallel(m)),
}
PAIRS = [(a, b) for a, b in itertools.product(WRAPPINGS, repeat=2) if "compiled" in a + b]


class Versioned(nn.Module):
    """A module whose loading reads its version from the state dict's ``_metadata``."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)
        self.loaded_version: object = None

    def forward(self, x: Any) -> Any:
        return self.bn(self.lin(x))

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        self.loaded_version = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.mark.parametrize(("saved", "loaded"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_a_compiled_model_state_loads_through_any_wrapping(
    tmp_path: Path, saved: str, loaded: str
) -> None:
    """_orig_mod. and module. prefixes are mapped both ways, in any order, _metadata included."""
    torch.manual_seed(1)
    source, target = Versioned(), Versioned()
    source(torch.randn(4, 2))  # BatchNorm statistics that differ from a fresh module's
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=WRAPPINGS[saved](source), rng=False))
    load_state(store, TorchState(model=WRAPPINGS[loaded](target), rng=False))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert target.loaded_version == 3  # the inner module's _metadata reached it


def test_every_backend_prefixes_keys_alike() -> None:
    """The default (inductor) backend's wrapper names keys as the eager backend's does."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    keys = list(torch.compile(model).state_dict())
    assert (
        keys == list(compiled(model).state_dict()) == [f"_orig_mod.{k}" for k in model.state_dict()]
    )


def test_a_mismatch_names_the_model_inside_the_wrappers(tmp_path: Path) -> None:
    """A state that fits no wrapping of the model is refused, naming the compiled model's class."""
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=nn.Sequential(nn.Linear(2, 2)), rng=False))
    wider = compiled(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(
        ConfigMismatchError,
        match=r"does not fit Sequential: missing keys \['_orig_mod.1.bias', '_orig_mod.1.weight'\]",
    ):
        load_state(store, TorchState(model=wider, rng=False))


def _gpt_run(seed: int, backend: str | None) -> TorchState:
    torch.manual_seed(seed)
    model = TinyGPT()
    if backend is not None:
        model = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=20)
    return TorchState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=torch.Generator().manual_seed(seed),
    )


def _gpt_train(state: TorchState, steps: int) -> None:
    o = state.objects
    for _ in range(steps):
        tokens = torch.randint(0, 32, (4, 9), generator=o["data"])
        o["optimizer"].zero_grad()
        lm_loss(o["model"], tokens).backward()
        o["optimizer"].step()
        o["scheduler"].step()


def test_a_compiled_tied_model_and_its_optimizer_resume_bit_exactly(tmp_path: Path) -> None:
    """A compiled GPT with AdamW and OneCycleLR, resumed into fresh compiled objects, ends the same."""
    store = CheckpointStore(tmp_path)
    original = _gpt_run(0, "aot_eager")
    _gpt_train(original, 3)
    save_state(store, 3, original)
    _gpt_train(original, 3)

    resumed = _gpt_run(1, "aot_eager")
    load_state(store, resumed)
    model = resumed.objects["model"]
    assert model.lm_head.weight is model.transformer["wte"].weight
    _gpt_train(resumed, 3)
    assert_tree_same(tree_to_state(original.state_dict()), tree_to_state(resumed.state_dict()))


def test_a_compiled_run_resumes_into_the_plain_model_and_back(tmp_path: Path) -> None:
    """Model, AdamW moments and schedule cross the compile boundary both ways, bit for bit."""
    compiled_run, plain_run = _gpt_run(0, "eager"), _gpt_run(1, None)
    _gpt_train(compiled_run, 2)
    store = CheckpointStore(tmp_path)
    save_state(store, 2, compiled_run)
    load_state(store, plain_run)
    saved = tree_to_state(compiled_run.state_dict())
    loaded = tree_to_state(plain_run.state_dict())
    saved["model"] = {k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()}
    loaded["model"] = dict(loaded["model"])
    assert_tree_same(saved, loaded)

    save_state(store, 3, plain_run)
    back = _gpt_run(2, "eager")
    load_state(store, back)
    assert_tree_same(
        tree_to_state(plain_run.state_dict())["optimizer"],
        tree_to_state(back.state_dict())["optimizer"],
    )


def test_named_parameter_groups_keep_this_model_s_names_across_compile(tmp_path: Path) -> None:
    """An optimizer built from a compiled model's named_parameters loads into the plain one's."""
    torch.manual_seed(0)
    compiled = torch.compile(TinyGPT(), backend="eager")
    optimizer = torch.optim.AdamW(compiled.named_parameters(), lr=0.01)
    lm_loss(compiled, torch.randint(0, 32, (4, 9))).backward()
    optimizer.step()
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=compiled, optimizer=optimizer, rng=False))
    assert store.load(0)["optimizer"]["param_groups"][0]["param_names"][0] == (
        "_orig_mod.transformer.wte.weight"
    )
    plain = TinyGPT()
    plain_optimizer = torch.optim.AdamW(plain.named_parameters(), lr=0.01)
    load_state(store, TorchState(model=plain, optimizer=plain_optimizer, rng=False))
    names = plain_optimizer.state_dict()["param_groups"][0]["param_names"]
    assert names == [name for name, _ in plain.named_parameters()]
    first = plain_optimizer.state_dict()["state"][0]["exp_avg"]
    assert_same(first, optimizer.state_dict()["state"][0]["exp_avg"])
