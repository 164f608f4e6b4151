"""The torch adapter's state conversion: exact round trips of tensors, optimizers, schedulers, RNG."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from ckptkit import (  # noqa: E402 (after the importorskip)
    CheckpointStore,
    CkptkitError,
    ConfigMismatchError,
    CorruptCheckpointError,
    UnsupportedStateError,
)
from ckptkit._tree import flatten_state  # noqa: E402
from ckptkit._tree_read import unflatten_state  # noqa: E402
from ckptkit.adapters._torch_convert import DTYPES  # noqa: E402
from ckptkit.adapters.torch import (  # noqa: E402
    RngStateWarning,
    TorchState,
    load_state,
    save_state,
    state_to_tree,
    tree_to_state,
)
from tests.strategies import arrays, json_leaves, keys  # noqa: E402

nn = torch.nn
lr_scheduler = torch.optim.lr_scheduler


def bits(t: Any) -> bytes:
    """The raw bytes of a tensor's values in C order (NaN payloads and -0.0 included)."""
    if t.numel() == 0:
        return b""  # an empty tensor may have any strides, which view(uint8) refuses
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same(a: Any, b: Any) -> None:
    """Assert two tensors have the same dtype, shape and bytes."""
    assert isinstance(b, torch.Tensor), type(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert bits(a) == bits(b)


def assert_tree_same(a: Any, b: Any) -> None:
    """Assert two torch states are equal: same types throughout, tensors bit for bit."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert_same(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_tree_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_tree_same(x, y)
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    else:
        assert a == b


def random_tensor(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    """A tensor of random bytes (NaNs and odd payloads included) of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def roundtrip(tmp_path: Path, obj: Any) -> Any:
    """Save ``obj``'s state through a real store and return the loaded torch state."""
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, obj)
    return tree_to_state(store.load(0))


# -- tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DTYPES, key=str), ids=str)
def test_every_dtype_roundtrips_bit_exact(tmp_path: Path, dtype: Any) -> None:
    """Tensors of every shared dtype, 0-d and non-contiguous ones too, load with the same bytes."""
    state = {
        "plain": random_tensor(dtype, (3, 4), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "transposed": random_tensor(dtype, (5, 3), seed=3).t(),
        "strided": random_tensor(dtype, (4, 6), seed=4)[::2, 1::2],
        "empty": random_tensor(dtype, (0, 3), seed=5),
    }
    loaded = roundtrip(tmp_path, state)
    assert_tree_same(state, loaded)


def test_dtype_table_covers_the_shared_dtypes() -> None:
    """bfloat16, the float8 kinds and the unsigned ints of this torch are all supported."""
    names = {str(d).removeprefix("torch.") for d in DTYPES}
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "uint16", "uint64", "bool"} <= names
    assert {"float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"} <= names


def test_contiguous_cpu_tensors_are_not_copied() -> None:
    """The tree's arrays view the model's own parameters; only non-CPU tensors are copied."""
    model = nn.Linear(3, 2)
    tree = state_to_tree(model)
    assert np.shares_memory(tree["weight"], model.weight.detach().numpy())
    bf16 = torch.ones(4, dtype=torch.bfloat16)
    array = state_to_tree({"x": bf16})["x"]
    assert array.dtype.name == "bfloat16"
    assert np.shares_memory(array, bf16.view(torch.int16).numpy())


def test_unsupported_tensors_are_refused_with_their_path() -> None:
    """complex128, sparse and meta tensors raise UnsupportedStateError naming the key path."""
    with pytest.raises(
        UnsupportedStateError, match=r'state\["a"\]\[0\]: a tensor of dtype torch.complex128'
    ):
        state_to_tree({"a": [torch.zeros(2, dtype=torch.complex128)]})
    with pytest.raises(UnsupportedStateError, match=r'state\["s"\]: a torch.sparse_coo tensor'):
        state_to_tree({"s": torch.eye(2).to_sparse()})
    with pytest.raises(UnsupportedStateError, match=r"tensor on meta cannot be saved"):
        state_to_tree({"m": torch.empty(2, device="meta")})


def test_unsupported_values_are_refused_with_their_path() -> None:
    """Objects, defaultdicts, sets and cycles raise UnsupportedStateError naming where they are."""
    with pytest.raises(UnsupportedStateError, match=r'state\["f"\]: a function cannot be saved'):
        state_to_tree({"f": lambda: 0})
    from collections import defaultdict

    with pytest.raises(UnsupportedStateError, match=r"a defaultdict cannot be saved"):
        state_to_tree({"d": defaultdict(int)})
    with pytest.raises(UnsupportedStateError, match=r'state\["s"\]: a set cannot be saved'):
        state_to_tree({"s": {1}})
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(UnsupportedStateError, match=r"contains itself"):
        state_to_tree({"c": cycle})


def test_python_types_and_markers_roundtrip(tmp_path: Path) -> None:
    """int keys, mixed keys, Counter, OrderedDict, '$' keys, dtypes, devices and numpy arrays come back."""
    state = {
        "int_keys": {0: torch.ones(1), 7: "x"},
        "mixed": {1: "a", "b": 2, (3, 4): 5.5, None: 0, 2.5: "f"},
        "counter": Counter({4: 2, 2: 1}),
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
        "$torch": {"$x": 1, "$$y": 2},
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "numpy": np.arange(3, dtype=np.int32),
        "tuple": (1, 2.5, float("nan"), float("-inf")),
        "tensor_list": [torch.tensor(3), torch.tensor([True, False])],
    }
    loaded = roundtrip(tmp_path, state)
    assert type(loaded["numpy"]) is np.ndarray
    assert loaded["numpy"].tolist() == [0, 1, 2]
    del state["numpy"], loaded["numpy"]
    assert_tree_same(state, loaded)


def test_module_state_dict_keeps_its_metadata(tmp_path: Path) -> None:
    """A module's state dict loads as an OrderedDict with its _metadata (module versions)."""
    sd = nn.BatchNorm1d(3).state_dict()
    loaded = roundtrip(tmp_path, sd)
    assert type(loaded) is OrderedDict
    assert loaded._metadata == sd._metadata
    assert_tree_same(dict(sd), dict(loaded))


def test_malformed_markers_are_corrupt() -> None:
    """A damaged {"$torch": ...} marker raises CorruptCheckpointError naming its path."""
    with pytest.raises(CorruptCheckpointError, match=r'state\["a"\]: malformed marker'):
        tree_to_state({"a": {"$torch": {"kind": "nope"}}})
    with pytest.raises(CorruptCheckpointError, match=r'state\["a"\]: malformed alias marker'):
        tree_to_state({"a": {"$torch": {"kind": "alias", "path": ["b"], "up": -1, "down": []}}})
    with pytest.raises(CorruptCheckpointError, match=r"key '\$x' is neither a marker nor escaped"):
        tree_to_state({"a": {"$x": 1}})


def test_map_location_places_tensors() -> None:
    """tree_to_state makes CPU tensors by default and honours map_location."""
    tree = state_to_tree({"w": torch.ones(2)})
    assert tree_to_state(tree)["w"].device.type == "cpu"
    assert tree_to_state(tree, map_location="meta")["w"].device.type == "meta"


def as_tensor(array: np.ndarray) -> Any:
    """The tensor for an array of any supported dtype, built without the adapter."""
    array = np.array(array, order="C")
    dtype = getattr(torch, array.dtype.name)
    if hasattr(np, array.dtype.name):
        return torch.from_numpy(array.copy())
    as_int = array.view(np.int16 if array.dtype.itemsize == 2 else np.uint8).copy()
    return torch.from_numpy(as_int).view(dtype)


def torch_states() -> st.SearchStrategy[object]:
    """Nested torch states: tensors of every dtype and layout, int/str/tuple keys, dict types."""
    dict_keys = st.one_of(keys(), st.integers(-5, 10**20), st.tuples(st.integers(0, 3)))
    return st.recursive(
        st.one_of(json_leaves(), arrays().map(as_tensor), arrays(max_dims=1)),
        lambda children: st.one_of(
            st.dictionaries(keys(), children, max_size=4),
            st.dictionaries(dict_keys, children, max_size=4),
            st.dictionaries(st.integers(0, 9), children, max_size=3).map(OrderedDict),
            st.dictionaries(st.integers(0, 9), st.integers(), max_size=3).map(Counter),
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
        ),
        max_leaves=20,
    )


@settings(max_examples=150)
@given(torch_states())
def test_any_torch_state_roundtrips_through_the_core(state: object) -> None:
    """Any nested torch state survives the tree, the core's JSON + arrays split, and back."""
    skeleton, named = flatten_state(state_to_tree(state))
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    written = {name: np.array(a, order="C") for name, a in named.items()}
    assert_tree_same(state, tree_to_state(unflatten_state(skeleton, written)))


def test_read_only_arrays_load_without_warnings() -> None:
    """A read-only array (a memory map, say) becomes a tensor by copy, with no torch warning."""
    array = np.arange(4, dtype=np.float32)
    array.flags.writeable = False
    tensor = tree_to_state({"w": array})["w"]
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not np.shares_memory(tensor.numpy(), array)


# -- tied parameters ------------------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding whose weight is shared with the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.out = nn.Linear(4, 11, bias=False)
        self.out.weight = self.emb.weight


def test_tied_parameters_are_saved_once_and_stay_tied(tmp_path: Path) -> None:
    """Two keys of one storage are one tensor in the file, and a fresh model stays tied."""
    torch.manual_seed(0)
    model = TiedLM()
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=model, rng=False))
    skeleton = json.loads((tmp_path / "store/step_000000000000/state.json").read_text())
    assert skeleton["tree"]["model"]["out.weight"] == {
        "$$torch": {
            "kind": "alias",
            "up": 1,
            "down": ["emb.weight"],
            "path": ["model", "emb.weight"],
        }
    }
    fresh = TiedLM()
    load_state(store, TorchState(model=fresh, rng=False))
    assert fresh.out.weight is fresh.emb.weight
    assert_same(fresh.emb.weight, model.emb.weight)
    loaded = tree_to_state(store.load(0))["model"]
    assert loaded["out.weight"] is loaded["emb.weight"]


def test_loaded_optimizer_state_is_fresh_memory_not_views_of_the_file(tmp_path: Path) -> None:
    """Tensors an object keeps are copies in torch's allocation; modules copy theirs anyway.

    Views into the file buffer sit at arbitrary offsets, where vectorised kernels may round
    differently (LBFGS drifted after a resume), and would keep the whole buffer alive.
    """

    def mlp() -> Any:
        return nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 7), nn.Linear(7, 1))

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=model, optimizer=opt, rng=False))
    save_state(store, 1, opt)
    fresh_model = mlp()
    in_state = torch.optim.Adam(fresh_model.parameters(), lr=0.1)
    load_state(store, TorchState(model=fresh_model, optimizer=in_state, rng=False), 0)
    alone = torch.optim.Adam(mlp().parameters(), lr=0.1)
    load_state(store, alone, 1)
    for optimizer in (in_state, alone):
        kept = [t for s in optimizer.state.values() for t in s.values()]
        assert len(kept) == 18  # step, exp_avg, exp_avg_sq of 6 parameters
        for tensor in kept:
            storage = tensor.untyped_storage()
            assert storage.data_ptr() % 64 == 0 and storage.nbytes() == tensor.nbytes


def test_views_of_one_storage_that_differ_are_saved_apart(tmp_path: Path) -> None:
    """Tensors sharing a storage at other offsets or strides are saved as their own values."""
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "t": base.t(), "row": base[1], "again": base}
    loaded = roundtrip(tmp_path, state)
    assert_tree_same(state, loaded)
    assert loaded["again"] is loaded["a"]
    assert loaded["t"] is not loaded["a"]


# -- optimizers, schedulers, scalers, generators ---------------------------------------------


def test_param_groups_keep_python_types(tmp_path: Path) -> None:
    """betas stays a tuple, lr a float, or a tensor when it was one; an unstepped state is empty."""
    model = nn.Linear(2, 1)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    loaded = roundtrip(tmp_path / "a", adam)
    assert loaded["state"] == {}
    group = loaded["param_groups"][0]
    assert type(group["betas"]) is tuple and type(group["lr"]) is float
    assert_tree_same(adam.state_dict(), loaded)
    tensor_lr = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.02))
    loaded = roundtrip(tmp_path / "b", tensor_lr)
    assert isinstance(loaded["param_groups"][0]["lr"], torch.Tensor)
    assert_tree_same(tensor_lr.state_dict(), loaded)


def test_multisteplr_milestones_stay_a_counter(tmp_path: Path) -> None:
    """MultiStepLR's milestones (a Counter with int keys) load as the same Counter."""
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    sched = lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4])
    loaded = roundtrip(tmp_path, sched)
    assert type(loaded["milestones"]) is Counter
    assert loaded["milestones"] == Counter({4: 2, 2: 1})
    other = lr_scheduler.MultiStepLR(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), [9])
    other.load_state_dict(loaded)
    assert other.milestones == sched.milestones


def test_lambdalr_is_saved_without_its_function(tmp_path: Path) -> None:
    """LambdaLR's state holds no function; the one loaded into keeps its own."""
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    sched = lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    opt.step()
    sched.step()
    loaded = roundtrip(tmp_path, sched)
    assert loaded["lr_lambdas"] == [None]
    fn = lambda epoch: 0.5**epoch  # noqa: E731 (a function like the original)
    other = lr_scheduler.LambdaLR(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), fn)
    other.load_state_dict(loaded)
    assert other.lr_lambdas == [fn] and other.last_epoch == 1


def test_gradscaler_roundtrips_and_a_disabled_one_is_empty(tmp_path: Path) -> None:
    """A CPU GradScaler's state round-trips; a disabled one saves {} and loads it as a no-op."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    other = torch.amp.GradScaler("cpu")
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, scaler)
    load_state(store, other)
    assert other.state_dict() == scaler.state_dict() == {**other.state_dict(), "_growth_tracker": 1}
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert state_to_tree(disabled) == {}
    save_state(store, 1, disabled)
    load_state(store, torch.amp.GradScaler("cpu", enabled=False), 1)


def test_generator_roundtrips(tmp_path: Path) -> None:
    """A torch.Generator's state is saved with get_state and restored with set_state."""
    gen = torch.Generator().manual_seed(5)
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(loader=gen, rng=False))
    expected = torch.randperm(20, generator=gen)
    other = torch.Generator().manual_seed(6)
    load_state(store, TorchState(loader=other, rng=False))
    assert torch.equal(torch.randperm(20, generator=other), expected)
    save_state(store, 1, gen)
    load_state(store, other, 1)
    assert torch.equal(torch.randperm(20, generator=other), torch.randperm(20, generator=gen))


def test_global_rng_is_captured_and_restored(tmp_path: Path) -> None:
    """rng=True restores Python's, NumPy's and torch's generators: the same draws again."""
    store = CheckpointStore(tmp_path / "store")
    state = TorchState(rng=True)
    save_state(store, 0, state)

    def draw() -> tuple[Any, ...]:
        return (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())

    first = draw()
    load_state(store, state)
    assert draw() == first
    np.random.standard_normal()  # leaves a cached Gaussian (has_gauss) in the saved state
    save_state(store, 1, state)
    first = draw()
    load_state(store, state, 1)
    assert draw() == first


def test_cuda_rng_of_more_devices_than_here_is_skipped_with_a_warning() -> None:
    """CUDA RNG states of devices this machine lacks (all, without CUDA) are skipped with a warning."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    states = [torch.cuda.get_rng_state(i).numpy() for i in range(count)]
    tree = TorchState(rng=True).state_dict()
    tree["rng"]["cuda"] = [*states, states[0] if states else np.zeros(16, dtype=np.uint8)]
    expected = torch.get_rng_state()
    torch.rand(5)
    here = f"this machine has {count}" if count else "CUDA is not available here"
    with pytest.warns(
        RngStateWarning,
        match=rf"random states of {count + 1} CUDA device\(s\) and {here}: restored the first {count} ",
    ):
        TorchState(rng=True).load_state_dict(tree)
    assert torch.equal(torch.get_rng_state(), expected)  # the CPU generators are restored


# -- fitting saved state to objects -----------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    """Loading into a different architecture raises ConfigMismatchError listing the keys."""
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=nn.Sequential(nn.Linear(2, 2)), rng=False))
    other = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    before = bits(other[0].weight)
    with pytest.raises(
        ConfigMismatchError,
        match=r"step 0: part 'model': the saved state does not fit Sequential: missing keys \['1.bias', '1.weight'\], unexpected keys \[\]; load it into the model",
    ):
        load_state(store, TorchState(model=other, rng=False))
    assert bits(other[0].weight) == before  # nothing was loaded
    save_state(store, 1, nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(
        ConfigMismatchError, match=r"step 1: .* missing keys \[\], unexpected keys \['0.bias'\]"
    ):
        load_state(store, nn.Sequential(nn.Linear(2, 2, bias=False)))


def test_parts_must_match_the_names(tmp_path: Path) -> None:
    """A TorchState with other part names (or rng) than the saved one raises, naming them."""
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=nn.Linear(2, 1), rng=True))
    with pytest.raises(
        ConfigMismatchError,
        match=r"missing \['net'\], unexpected \['model', 'rng'\]; pass the same names",
    ):
        load_state(store, TorchState(net=nn.Linear(2, 1), rng=False))


def test_optimizer_groups_must_match(tmp_path: Path) -> None:
    """An optimizer over other parameters raises ConfigMismatchError with the group sizes."""
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, torch.optim.Adam(nn.Linear(2, 1).parameters()))
    other = torch.optim.Adam(nn.Linear(2, 1, bias=False).parameters())
    with pytest.raises(ConfigMismatchError, match=r"groups of sizes \[2\], this one \[1\]"):
        load_state(store, other)


@pytest.mark.parametrize("saved_wrapped", [True, False], ids=["wrapped-to-bare", "bare-to-wrapped"])
def test_dataparallel_prefix_is_handled_both_ways(tmp_path: Path, saved_wrapped: bool) -> None:
    """A state saved from DataParallel loads into the bare model, and the other way round."""
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    saved, loaded_into = (
        (nn.DataParallel(source), target) if saved_wrapped else (source, nn.DataParallel(target))
    )
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=saved, rng=False))
    load_state(store, TorchState(model=loaded_into, rng=False))
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert_same(a, b)


def test_map_location_option_loads_onto_the_cpu(tmp_path: Path) -> None:
    """map_location="cpu" (on the state or per load) loads a CPU-made checkpoint exactly."""
    model = nn.Linear(3, 3)
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=model, rng=False))
    other = nn.Linear(3, 3)
    load_state(store, TorchState(model=other, rng=False, map_location="cpu"))
    assert_same(other.weight, model.weight)
    save_state(store, 1, model)
    other = nn.Linear(3, 3)
    load_state(store, other, map_location=torch.device("cpu"))
    assert_same(other.weight, model.weight)


def test_torchstate_checks_its_objects() -> None:
    """Objects without state_dict/load_state_dict, or an empty state, are refused at once."""
    with pytest.raises(TypeError, match=r"TorchState\(x=...\) is a int, which has no state_dict"):
        TorchState(x=3)
    with pytest.raises(ValueError, match=r"holds nothing"):
        TorchState(rng=False)
    assert repr(TorchState(model=nn.Linear(1, 1))) == "TorchState(model=Linear, rng=True)"


# -- loading never runs code -------------------------------------------------------------------


class Payload:
    """Creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("victim", ["arrays.safetensors", "state.json"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path, victim: str) -> None:
    """A checkpoint file swapped for a pickle (manifest fixed up to match) is refused, unrun."""
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload).close()  # the payload is live: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    store = CheckpointStore(tmp_path / "store")
    save_state(store, 0, TorchState(model=nn.Linear(2, 1), rng=False))
    record = store.latest()
    assert record is not None
    (store.root / record.directory / victim).write_bytes(payload)
    manifest = json.loads(store.manifest_path.read_text())
    for entry in manifest["checkpoints"][0]["files"]:
        if entry["name"] == victim:
            entry["size"] = len(payload)
            entry["checksum"] = "sha256:" + hashlib.sha256(payload).hexdigest()
    store.manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    store.verify(0)  # the integrity checks pass: only the format can refuse it
    with pytest.raises(CkptkitError, match=victim.replace(".", r"\.")):
        load_state(store, TorchState(model=nn.Linear(2, 1), rng=False))
    assert not marker.exists()


def _snapshot(*objects: Any) -> list[bytes]:
    """The exact bytes of the objects' states: the JSON skeleton and every array."""
    from ckptkit._tree import flatten_state

    out = []
    for obj in objects:
        skeleton, arrays = flatten_state(state_to_tree(obj))
        out.append(json.dumps(skeleton).encode())
        out.extend(name.encode() + a.tobytes() for name, a in sorted(arrays.items()))
    return out


def test_a_failed_load_leaves_every_object_unchanged(tmp_path: Path) -> None:
    """A checkpoint that fails to fit (a shape, a sampler's length) changes no object."""
    from ckptkit import CheckpointStore, ConfigMismatchError
    from ckptkit.adapters.torch import ResumableSampler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(opt=opt, model=model, sampler=ResumableSampler(10)))

    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(other, other_opt)
    with pytest.raises(
        ConfigMismatchError, match=r"1\.weight: saved \(2, 4\) torch.float32, here \(3, 4\)"
    ):
        load_state(store, TorchState(opt=other_opt, model=other, sampler=ResumableSampler(10)))
    assert _snapshot(other, other_opt) == before

    torch.manual_seed(1)
    same = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    same_opt = torch.optim.SGD(same.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(same, same_opt)
    with pytest.raises(
        ConfigMismatchError, match=r"part 'sampler' could not be loaded .*nothing was changed"
    ):
        load_state(store, TorchState(opt=same_opt, model=same, sampler=ResumableSampler(11)))
    assert _snapshot(same, same_opt) == before


def test_a_state_is_not_loaded_into_another_kind_of_object(tmp_path: Path) -> None:
    """An Adam state does not load into SGD (it would fail or drift much later)."""
    from ckptkit import CheckpointStore, ConfigMismatchError

    model = nn.Linear(2, 2)
    store = CheckpointStore(tmp_path)
    save_state(store, 0, TorchState(model=model, opt=torch.optim.Adam(model.parameters())))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(
        ConfigMismatchError, match="part 'opt' was saved from a Adam, and this TorchState has a SGD"
    ):
        load_state(store, TorchState(model=model, opt=sgd))
