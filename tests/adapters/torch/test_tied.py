"""Tied weights: saved once, loaded tied, from the whole tree or any part of it, old files too."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptkit import CheckpointStore  # noqa: E402
from ckptkit.adapters.torch import (  # noqa: E402
    TorchState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)

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
