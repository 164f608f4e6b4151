"""Tests for the state tree codec: exact round trips, tensor naming and the errors it raises."""

from __future__ import annotations

import enum
import io
import json
import math
import struct
from collections import OrderedDict, namedtuple
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given

from ckptkit import CheckpointStore, CorruptCheckpointError, UnsupportedStateError
from ckptkit._safetensors import write_safetensors
from ckptkit._safetensors_read import parse_safetensors
from ckptkit._tree import (
    ArrayAlias,
    encode_json_value,
    flatten_for_store,
    flatten_state,
)
from ckptkit._tree_read import decode_json_value, unflatten_state
from tests.strategies import DTYPE_CODES, assert_same_state, numpy_scalars, state_trees


def _round_trip(state: object) -> object:
    skeleton, arrays = flatten_state(state)
    text = json.dumps(skeleton, allow_nan=False)
    out = io.BytesIO()
    write_safetensors(out, arrays)
    parsed, _ = parse_safetensors(bytearray(out.getvalue()), source="arrays.safetensors")
    return unflatten_state(json.loads(text), parsed, source="ckpt")


def _bits(bits: int) -> float:
    return float(struct.unpack(">d", bits.to_bytes(8, "big"))[0])


@given(state_trees())
def test_any_state_tree_round_trips_exactly(state: object) -> None:
    """Any generated tree survives flatten, JSON, the safetensors file and unflatten unchanged."""
    assert_same_state(state, _round_trip(state))


@given(state_trees(with_arrays=False))
def test_json_values_round_trip_through_encode_and_decode(value: object) -> None:
    """encode_json_value output is strict JSON and decodes to the same value."""
    text = json.dumps(encode_json_value(value, what="metadata"), allow_nan=False)
    assert_same_state(value, decode_json_value(json.loads(text), what="metadata"))


@pytest.mark.parametrize(
    "bits",
    [
        0x8000000000000000,
        0x7FF8000000000000,
        0xFFF8000000000000,
        0x7FF0000000000001,
        0x7FF4000000000123,
        0x7FF0000000000000,
        0xFFF0000000000000,
        0x0000000000000001,
    ],
    ids=["-0.0", "nan", "-nan", "snan", "nan-payload", "inf", "-inf", "subnormal"],
)
def test_float_bits_survive_exactly(bits: int) -> None:
    """Negative zero, infinities, subnormals and NaNs with any sign or payload keep their bits."""
    value = _bits(bits)
    skeleton, _ = flatten_state({"x": value})
    if math.isfinite(value):
        assert skeleton == {"x": value}
    else:
        assert skeleton == {"x": {"$float": f"{bits:016x}"}}
    assert_same_state({"x": value}, _round_trip({"x": value}))


def test_plain_json_tree_is_its_own_skeleton() -> None:
    """A tree of plain JSON values encodes to itself, so state.json stays readable."""
    state = {"epoch": 3, "lr": 0.001, "done": False, "name": "run", "hist": [1.5, None]}
    skeleton, arrays = flatten_state(state)
    assert skeleton == state and arrays == {}


def test_types_are_kept_apart() -> None:
    """bool stays bool, int stays int, tuples stay tuples and lists stay lists, nested too."""
    state = {"b": True, "i": 1, "f": 1.0, "t": (1, [2, (3,)], ()), "l": [(), []]}
    skeleton, _ = flatten_state(state)
    assert skeleton["t"] == {"$tuple": [1, [2, {"$tuple": [3]}], {"$tuple": []}]}
    assert_same_state(state, _round_trip(state))


def test_huge_ints_are_tagged_and_round_trip() -> None:
    """Ints too long for JSON digit limits are stored as hex and come back equal."""
    big = -(3**5000)
    skeleton, _ = flatten_state({"n": big, "small": 2**64})
    assert skeleton["n"] == {"$int": hex(big)}
    assert skeleton["small"] == 2**64
    assert_same_state({"n": big, "small": 2**64}, _round_trip({"n": big, "small": 2**64}))


@pytest.mark.parametrize("code", DTYPE_CODES)
def test_numpy_scalars_keep_type_dtype_and_bits(code: str) -> None:
    """Numpy scalars of every dtype, including NaN and -0.0 bit patterns, come back identical."""
    from ckptkit._safetensors import numpy_dtype

    dtype = numpy_dtype(code)
    raws = [bytes([b] * dtype.itemsize) for b in (0x00, 0x01, 0x7F, 0x80, 0xFF)]
    if code == "BOOL":
        raws = [b"\x00", b"\x01"]
    scalars = [np.frombuffer(raw, dtype=dtype)[0] for raw in raws]
    assert_same_state(scalars, _round_trip(scalars))


@given(numpy_scalars())
def test_generated_numpy_scalars_round_trip(scalar: np.generic) -> None:
    """Numpy scalars with arbitrary bits round-trip through the metadata encoding."""
    text = json.dumps(encode_json_value(scalar, what="metadata"), allow_nan=False)
    assert_same_state(scalar, decode_json_value(json.loads(text), what="metadata"))


def test_finite_float_scalars_are_readable_numbers() -> None:
    """A finite float32 scalar is stored as a JSON number, a NaN one as its bytes."""
    assert encode_json_value(np.float32(0.5), what="m") == {"$scalar": ["F32", 0.5]}
    nan = encode_json_value(np.float32("nan"), what="m")
    assert nan == {"$scalar": ["F32", np.float32("nan").tobytes().hex()]}
    assert encode_json_value(np.int64(-3), what="m") == {"$scalar": ["I64", -3]}


def test_dollar_keys_are_escaped_and_survive() -> None:
    """Keys that look like tags or start with $ come back unchanged."""
    state = {"$x": 1, "$$y": 2, "$": 3, "$tuple": [4], "plain": {"$array": "not a tensor"}}
    skeleton, _ = flatten_state(state)
    assert list(skeleton) == ["$$x", "$$$y", "$$", "$$tuple", "plain"]
    assert skeleton["plain"] == {"$$array": "not a tensor"}
    assert_same_state(state, _round_trip(state))


def test_tensor_names_are_key_paths() -> None:
    """Tensors are named by their dotted key path, list positions as numbers."""
    w = np.ones((2, 2), np.float32)
    state = {"model": {"layer1": {"weight": w}}, "opt": {"state": [{"exp_avg": w}]}}
    _, arrays = flatten_state(state)
    assert list(arrays) == ["model.layer1.weight", "opt.state.0.exp_avg"]


def test_reference_loader_sees_a_state_dict(tmp_path: Path) -> None:
    """The written arrays file loads in the reference package under the dotted key paths."""
    state = {"model": {"w": np.arange(3.0), "b": np.zeros(2, np.int64)}, "epoch": 4}
    _, arrays = flatten_state(state)
    out = io.BytesIO()
    write_safetensors(out, arrays)
    loaded = safetensors.numpy.load(out.getvalue())
    assert sorted(loaded) == ["model.b", "model.w"]
    assert loaded["model.w"].tolist() == [0.0, 1.0, 2.0]


def test_colliding_tensor_names_are_made_unique_deterministically() -> None:
    """Paths that join to the same name get #1, #2 in traversal order, and reload correctly."""
    a, b, c = np.zeros(1), np.ones(1), np.full(1, 2.0)
    state = {"a.b": a, "a": {"b": b}, "a.b#1": c, "__metadata__": a, "": {"": b}}
    skeleton, arrays = flatten_state(state)
    assert list(arrays) == ["a.b", "a.b#1", "a.b#1#1", "__metadata__#1", "."]
    assert skeleton["a.b#1"] == {"$array": "a.b#1#1"}
    assert flatten_state(state)[0] == skeleton
    assert_same_state(state, _round_trip(state))


def test_root_array_and_unicode_keys() -> None:
    """A bare array as the whole state, and keys with non-ASCII or lone surrogates, work."""
    assert list(flatten_state(np.zeros(2))[1]) == ["state"]
    state = {"\u00e9": {"\ud800": np.arange(2)}, "\U0001f600": (np.int8(1),)}
    _, arrays = flatten_state(state)
    assert list(arrays) == ["\u00e9.\\ud800"]
    assert_same_state(state, _round_trip(state))


def test_aliases_are_named_in_the_arrays_header_and_save_their_items() -> None:
    """An ArrayAlias saves its items as a dict and adds alias name -> tensor name to the header."""
    w = np.arange(4, dtype=np.float32)
    state = {"model": {"wte": w, "head": ArrayAlias({"tied": ["wte"]}, target=w)}, "step": 3}
    skeleton, arrays, header = flatten_for_store(state)
    assert skeleton == {
        "model": {"wte": {"$array": "model.wte"}, "head": {"tied": ["wte"]}},
        "step": 3,
    }
    assert list(arrays) == ["model.wte"] and arrays["model.wte"] is w
    assert header == {"ckptkit.aliases": '{"model.head":"model.wte"}'}
    assert flatten_for_store({"w": w}).header == {}
    assert flatten_state(state) == (skeleton, arrays)


def test_alias_names_never_take_a_tensor_name() -> None:
    """An alias and an array whose paths join to one name get distinct names, #1 to the later."""
    w = np.zeros(2)
    state = {
        "a": {"b": ArrayAlias({}, target=w)},
        "a.b": w,
        "c": {"d": w},
        "c.d": ArrayAlias({}, target=w),
    }
    _, arrays, header = flatten_for_store(state)
    assert list(arrays) == ["a.b#1", "c.d"]
    assert json.loads(header["ckptkit.aliases"]) == {"a.b": "a.b#1", "c.d#1": "a.b#1"}


def test_an_alias_of_an_array_saved_nowhere_is_refused() -> None:
    """An alias must stand for an array the state saves elsewhere; the message names its path."""
    state = {"w": np.zeros(2), "tied": ArrayAlias({}, target=np.zeros(2))}
    with pytest.raises(UnsupportedStateError) as info:
        flatten_for_store(state)
    assert str(info.value) == (
        'state["tied"]: an alias of an array that the state does not hold at any other place; '
        "put the array itself in the state"
    )
    with pytest.raises(UnsupportedStateError, match=r'metadata\["x"\]: an array alias cannot'):
        encode_json_value({"x": ArrayAlias({}, target=np.zeros(1))}, what="metadata")
    with pytest.raises(TypeError, match="ArrayAlias target must be a numpy array, not list"):
        ArrayAlias({}, target=[1.0])  # type: ignore[arg-type]


def test_a_store_writes_aliases_to_the_header_and_loads_plain_dicts(tmp_path: Path) -> None:
    """A saved alias is a plain dict when loaded and an alias in the file's __metadata__."""
    w = np.arange(3, dtype=np.int64)
    store = CheckpointStore(tmp_path)
    store.save(0, {"emb": w, "head": ArrayAlias({"same as": "emb"}, target=w)})
    loaded = store.load(0)
    assert type(loaded["head"]) is dict and loaded["head"] == {"same as": "emb"}
    store.save_async(1, {"emb": w, "x": [ArrayAlias({}, target=w)]}).result()
    for directory, aliases in (
        ("step_000000000000", '{"head":"emb"}'),
        ("step_000000000001", '{"x.0":"emb"}'),
    ):
        with safetensors.safe_open(str(tmp_path / directory / "arrays.safetensors"), "np") as f:
            assert f.metadata() == {"ckptkit.aliases": aliases}
            assert list(f.keys()) == ["emb"]


def test_unflatten_returns_the_given_arrays_without_copying() -> None:
    """Arrays parsed from the file are placed in the tree as the same objects."""
    parsed = {"w": np.arange(3)}
    state = unflatten_state({"w": {"$array": "w"}}, parsed)
    assert isinstance(state, dict) and state["w"] is parsed["w"]


def test_ordered_dict_and_shared_values() -> None:
    """OrderedDict loads as dict in order; a value reachable twice loads as two equal copies."""
    shared = [1, 2]
    state = OrderedDict([("z", shared), ("a", shared)])
    loaded = _round_trip(state)
    assert type(loaded) is dict and list(loaded) == ["z", "a"]
    assert loaded["z"] == loaded["a"] and loaded["z"] is not loaded["a"]


def test_memmap_is_saved_as_a_plain_array(tmp_path: Path) -> None:
    """A numpy memmap is accepted and loads as an ndarray with the same values."""
    mapped = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(3,))
    mapped[:] = [1.5, -0.0, 3.0]
    loaded = _round_trip({"m": mapped})
    assert isinstance(loaded, dict) and type(loaded["m"]) is np.ndarray
    assert loaded["m"].tobytes() == np.asarray(mapped).tobytes()
    del mapped


def test_big_endian_array_loads_with_native_dtype() -> None:
    """A big-endian array comes back with the native-order dtype and the same values."""
    loaded = _round_trip({"a": np.arange(4, dtype=">f8")})
    assert isinstance(loaded, dict)
    assert loaded["a"].dtype == np.dtype("float64") and loaded["a"].tolist() == [0, 1, 2, 3]


class _Color(enum.IntEnum):
    RED = 1


_Pair = namedtuple("_Pair", "x y")
_cycle: list[object] = []
_cycle.append({"again": _cycle})

UNSUPPORTED = [
    (
        "set",
        {"optimizer": {"param_groups": [{"foo": {1}}]}},
        'state["optimizer"]["param_groups"][0]["foo"]: unsupported type set; convert it to',
    ),
    ("bytes", {"b": b"x"}, 'state["b"]: unsupported type bytes; store it as a numpy uint8 array'),
    ("object", {"o": object()}, 'state["o"]: unsupported type object; convert it to one of'),
    ("int-key", {"m": {3: 1}}, 'state["m"]: dict key 3 has type int; only str keys'),
    ("tuple-key", {(1, 2): 1}, "state: dict key (1, 2) has type tuple"),
    ("cycle", _cycle, 'state[0]["again"]: the state contains itself (a cycle)'),
    (
        "int-subclass",
        {"c": _Color.RED},
        'state["c"]: unsupported type _Color; it is a subclass of int',
    ),
    ("namedtuple", [_Pair(1, 2)], "state[0]: unsupported type _Pair; it is a subclass of tuple"),
    (
        "object-array",
        {"a": np.array([{}], dtype=object)},
        'state["a"]: numpy array of dtype object cannot be saved; convert it to a numeric dtype',
    ),
    ("str-array", {"a": np.array(["x"])}, "dtype <U1 cannot be saved; store the strings as a list"),
    ("struct-array", {"a": np.zeros(2, "i4,f4")}, "save each field as its own array"),
    ("datetime-array", {"a": np.zeros(2, "M8[s]")}, "store it as int64 (arr.astype('int64'))"),
    ("complex128", {"a": np.zeros(2, complex)}, "dtype complex128 cannot be saved; convert it to"),
    ("ieee-float8", {"a": np.zeros(2, ml_dtypes.float8_e4m3)}, "dtype float8_e4m3 cannot"),
    ("str-scalar", {"s": np.str_("x")}, 'state["s"]: numpy scalar of dtype <U1 cannot be saved'),
    ("datetime-scalar", {"d": np.datetime64(1, "s")}, "numpy scalar of dtype datetime64[s]"),
    (
        "masked-array",
        {"m": np.ma.masked_array([1, 2], mask=[0, 1])},
        'state["m"]: unsupported type MaskedArray; it is a subclass of numpy.ndarray',
    ),
]


@pytest.mark.parametrize(
    ("state", "message"), [u[1:] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED]
)
def test_unsupported_values_name_their_key_path(state: object, message: str) -> None:
    """Each value that cannot round-trip raises UnsupportedStateError with its path and a fix."""
    with pytest.raises(UnsupportedStateError) as info:
        flatten_state(state)
    assert message in str(info.value)


def test_metadata_refuses_arrays_with_path() -> None:
    """encode_json_value names the path of an array and suggests tolist()."""
    with pytest.raises(UnsupportedStateError, match=r'metadata\["x"\]\[1\]: numpy arrays cannot'):
        encode_json_value({"x": [1, np.zeros(1)]}, what="metadata")


CORRUPT = [
    ("missing", {"w": {"$array": "w"}}, {}, "ckpt: state[\"w\"]: refers to tensor 'w', which"),
    (
        "twice",
        [{"$array": "w"}, {"$array": "w"}],
        {"w": np.zeros(1)},
        "state[1]: tensor 'w' is referenced a second time",
    ),
    ("unknown-tag", {"a": {"$set": [1]}}, {}, "state[\"a\"]: malformed tag '$set'"),
    ("bad-float", {"$float": "zz"}, {}, "state: malformed tag '$float'"),
    ("bad-int", {"$int": "ab12"}, {}, "malformed tag '$int' with value 'ab12'"),
    ("long-body", {"$float": "9" * 100}, {}, "with value '99999999999999999999"),
    ("tuple-not-list", {"$tuple": 3}, {}, "malformed tag '$tuple'"),
    ("stray-dollar", {"$x": 1, "y": 2}, {}, "state: key '$x' is neither a tag nor an escaped key"),
    ("scalar-code", {"$scalar": ["F128", 1.0]}, {}, "unknown numpy scalar dtype 'F128'"),
    ("scalar-range", {"$scalar": ["U8", 256]}, {}, "malformed U8 scalar value 256"),
    ("scalar-hex", {"$scalar": ["F32", "00"]}, {}, "malformed F32 scalar value '00'"),
    ("scalar-bool", {"$scalar": ["BOOL", 1]}, {}, "malformed BOOL scalar value 1"),
    ("not-json", {"a": (1,)}, {}, 'state["a"]: unexpected JSON value of type tuple'),
]


@pytest.mark.parametrize(
    ("skeleton", "arrays", "message"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT]
)
def test_malformed_skeletons_are_corrupt(
    skeleton: object, arrays: dict[str, np.ndarray], message: str
) -> None:
    """A skeleton that is malformed or disagrees with the arrays names the source and key path."""
    with pytest.raises(CorruptCheckpointError) as info:
        unflatten_state(skeleton, arrays, source="ckpt")  # type: ignore[arg-type]
    assert str(info.value).startswith("ckpt: ")
    assert message in str(info.value)


def test_unreferenced_tensor_is_corrupt() -> None:
    """A tensor in the arrays file that the skeleton never mentions is reported by name."""
    with pytest.raises(CorruptCheckpointError, match=r"ckpt: .* never refers to: 'extra'"):
        unflatten_state(
            {"w": {"$array": "w"}}, {"w": np.zeros(1), "extra": np.zeros(1)}, source="ckpt"
        )


def test_array_reference_in_metadata_is_corrupt() -> None:
    """decode_json_value refuses array references, naming what was decoded."""
    with pytest.raises(CorruptCheckpointError, match=r"^metadata: metadata\[\"w\"\]: an array"):
        decode_json_value({"w": {"$array": "w"}}, what="metadata")


def test_too_deep_nesting_is_reported_not_crashed() -> None:
    """A state nested past the recursion limit raises UnsupportedStateError, not RecursionError."""
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UnsupportedStateError, match="nested too deeply"):
        flatten_state({"a": deep})
    with pytest.raises(CorruptCheckpointError, match="ckpt: the saved state is nested too deeply"):
        unflatten_state(deep, {}, source="ckpt")  # type: ignore[arg-type]
