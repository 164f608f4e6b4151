"""Tied weights: saved once, loaded tied, from the whole tree or any part of it, old files too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import Checkpointer, CheckpointStore, CorruptCheckpointError  # noqa: E402
from ckptkit.adapters.torch import (  # noqa: E402
    TiedTensorError,
    TorchState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)
from tests.adapters.torch.models import TinyGPT, lm_loss  # noqa: E402

nn = torch.nn
DATA = Path(__file__).resolve().parents[2] / "data"
#: Written once by ``build_absolute_alias_store`` with the writer of ckptkit 0.1.0 as it was
#: before aliases became relative: each alias holds the path of its target from the root of
#: the tree it was converted from. Golden files are only ever added, never edited.
ABSOLUTE_ALIAS_STORE = DATA / "torch_alias_absolute"


class GoldenTiedLM(nn.Module):
    """The golden store's model (frozen): GPT-2's names, the embedding tied to the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(7, 4), "ln_f": nn.LayerNorm(4)})
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, tokens: Any) -> Any:
        return self.lm_head(self.transformer.ln_f(self.transformer.wte(tokens)))


def build_absolute_alias_store(root: Path) -> None:
    """The golden store's checkpoints: step 0 a TorchState, step 1 a model's tree nested deeper."""
    torch.manual_seed(0)
    model = GoldenTiedLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    store = CheckpointStore(root)
    save_state(store, 0, TorchState(model=model, optimizer=optimizer, rng=False))
    store.save(1, {"run": {"model": state_to_tree(model)}})


@pytest.fixture
def golden(tmp_path: Path) -> CheckpointStore:
    """A copy of the golden store (opening a store creates its lock file)."""
    shutil.copytree(ABSOLUTE_ALIAS_STORE, tmp_path / "golden")
    return CheckpointStore(tmp_path / "golden")


def test_old_tied_checkpoints_load_whole_into_a_tied_model(golden: CheckpointStore) -> None:
    """A TorchState checkpoint written with absolute alias paths loads, and the model stays tied."""
    model = GoldenTiedLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    load_state(golden, TorchState(model=model, optimizer=optimizer, rng=False), 0)
    assert model.lm_head.weight is model.transformer.wte.weight
    saved = golden.load(0)["model"]["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight.detach(), torch.from_numpy(saved))
    assert set(optimizer.state_dict()["state"]) == {0, 1, 2}
    whole = tree_to_state(golden.load(0))["model"]
    assert whole["lm_head.weight"] is whole["transformer.wte.weight"]


def test_old_tied_checkpoints_convert_from_any_part(golden: CheckpointStore) -> None:
    """Absolute alias paths resolve from a part, and from a tree that nests the saved one."""
    part = tree_to_state(golden.load(0)["model"])
    assert part["lm_head.weight"] is part["transformer.wte.weight"]
    nested = tree_to_state(golden.load(1))["run"]["model"]
    assert nested["lm_head.weight"] is nested["transformer.wte.weight"]
    nested_part = tree_to_state(golden.load(1)["run"]["model"])
    assert nested_part["lm_head.weight"] is nested_part["transformer.wte.weight"]
    fresh = GoldenTiedLM()
    fresh.load_state_dict(part)
    assert torch.equal(fresh.lm_head.weight, part["transformer.wte.weight"])


def test_an_old_alias_without_its_tensor_says_what_to_convert(golden: CheckpointStore) -> None:
    """An absolute alias whose tensor is not in the part raises TiedTensorError, not corruption."""
    part = golden.load(0)["model"]
    del part["transformer.wte.weight"]
    with pytest.raises(TiedTensorError) as caught:
        tree_to_state(part)
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert str(caught.value) == (
        'the tree: state["lm_head.weight"] is tied to the tensor saved at '
        'state["model"]["transformer.wte.weight"] of the tree it was saved from, which is not '
        "in the part being converted; convert the whole tree, or a part that holds both"
    )


def trained_gpt(seed: int = 0) -> tuple[Any, Any]:
    """A TinyGPT and its AdamW after two steps on random tokens."""
    torch.manual_seed(seed)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        lm_loss(model, torch.randint(0, 32, (4, 9))).backward()
        optimizer.step()
    return model, optimizer


def test_the_model_part_of_a_tied_checkpoint_converts_on_its_own(tmp_path: Path) -> None:
    """The tutorial's recipe, tree_to_state(store.load()["model"]), loads a tied model."""
    model, optimizer = trained_gpt()
    store = CheckpointStore(tmp_path)
    Checkpointer(store, None, TorchState(model=model, optimizer=optimizer)).save(5)
    state_dict = tree_to_state(store.load()["model"])
    assert state_dict["lm_head.weight"] is state_dict["transformer.wte.weight"]
    fresh = TinyGPT()
    fresh.load_state_dict(state_dict)
    assert fresh.lm_head.weight is fresh.transformer["wte"].weight
    tokens = torch.randint(0, 32, (2, 8))
    model.eval(), fresh.eval()
    assert torch.equal(fresh(tokens), model(tokens))


def test_a_tied_tree_saved_nested_converts_whole_and_by_part(tmp_path: Path) -> None:
    """A model's tree saved inside a larger one converts from the root and from any part."""
    model, _ = trained_gpt()
    store = CheckpointStore(tmp_path)
    store.save(0, {"runs": [{"model": state_to_tree(model)}]})
    for converted in (
        tree_to_state(store.load())["runs"][0]["model"],
        tree_to_state(store.load()["runs"])[0]["model"],
        tree_to_state(store.load()["runs"][0]["model"]),
    ):
        assert converted["lm_head.weight"] is converted["transformer.wte.weight"]
        assert torch.equal(converted["lm_head.weight"], model.lm_head.weight)


def test_a_part_tied_to_a_tensor_outside_it_says_what_to_convert(tmp_path: Path) -> None:
    """A part whose tensor was saved under another part raises TiedTensorError naming both."""
    model, _ = trained_gpt()
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=model, head=model.lm_head, rng=False))
    with pytest.raises(TiedTensorError) as caught:
        tree_to_state(store.load()["head"])
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert str(caught.value) == (
        'the tree: state["weight"] is tied to the tensor saved at '
        'state["model"]["transformer.wte.weight"] of the tree it was saved from, which lies '
        "outside the part being converted; convert the whole tree, or a part that holds both"
    )
    whole = tree_to_state(store.load())
    assert whole["head"]["weight"] is whole["model"]["transformer.wte.weight"]


def test_a_tie_whose_entry_was_removed_says_so(tmp_path: Path) -> None:
    """A relative alias whose tensor was taken out of the tree names the missing entry."""
    model, _ = trained_gpt()
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=model, rng=False))
    part = store.load()["model"]
    del part["transformer.wte.weight"]
    with pytest.raises(TiedTensorError, match=r'state\["lm_head.weight"\] is tied to '):
        tree_to_state(part)
    with pytest.raises(TiedTensorError, match=r'state\["transformer.wte.weight"\], which holds no'):
        tree_to_state(part)


# -- readers without ckptkit ---------------------------------------------------------------------


def test_the_arrays_header_lets_safetensors_readers_retie_the_model(tmp_path: Path) -> None:
    """The header lists lm_head.weight as an alias; re-tied, a plain safetensors read loads."""
    from safetensors import safe_open
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    model, optimizer = trained_gpt()
    store = CheckpointStore(tmp_path)
    save_state(store, 3, TorchState(model=model, optimizer=optimizer))
    path = str(tmp_path / store.latest().directory / "arrays.safetensors")  # type: ignore[union-attr]

    with safe_open(path, "np") as f:
        aliases = json.loads(f.metadata()["ckptkit.aliases"])
    assert aliases == {"model.lm_head.weight": "model.transformer.wte.weight"}
    arrays = load_numpy(path)
    assert "model.lm_head.weight" not in arrays  # saved once, under the first key
    arrays.update({alias: arrays[name] for alias, name in aliases.items()})

    tensors = load_torch(path)
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    state_dict = {k[len("model.") :]: t for k, t in tensors.items() if k.startswith("model.")}
    fresh = TinyGPT()
    fresh.load_state_dict(state_dict)  # strict: lm_head.weight is there again
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert torch.equal(torch.from_numpy(arrays["model.lm_head.weight"]), model.lm_head.weight)


def test_a_checkpoint_without_ties_has_no_header_metadata(tmp_path: Path) -> None:
    """Untied states keep the arrays file exactly as before: no __metadata__ at all."""
    from safetensors import safe_open

    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=nn.Linear(2, 2), rng=False))
    with safe_open(str(tmp_path / "step_000000000000" / "arrays.safetensors"), "np") as f:
        assert f.metadata() is None
