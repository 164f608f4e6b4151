"""``ckptkit ls`` and ``ckptkit show``: what a store holds, without changing it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from ckptkit._checkpointer import RESERVED_METADATA_KEY
from ckptkit._cli._common import (
    FAILED,
    best_record,
    fmt_number,
    human_size,
    local_time,
    metrics_json,
    open_store,
    policy_state,
    print_json,
    resolve,
    select,
    table,
    to_json,
)
from ckptkit._errors import CheckpointNotFoundError, CkptkitError
from ckptkit._record import CheckpointRecord, TensorInfo

#: Without --all: lists and dicts longer than this show their first ``_HEAD`` entries,
#: strings longer than ``_MAX_CHARS`` their start, and at most ``_MAX_TENSORS`` tensor rows.
_MAX_ITEMS = 20
_HEAD = 10
_MAX_CHARS = 200
_MAX_TENSORS = 50
_WIDTH = 100


def ls(args: argparse.Namespace) -> int:
    store = open_store(args)
    records = store.records()
    latest = records[-1] if records else None
    policy = policy_state(latest)
    ranking = resolve(args.monitor, args.mode, policy)
    best = best_record(records, ranking)
    total = sum(r.size for r in records)
    if args.json:
        print_json(
            {
                "root": str(store.root),
                "count": len(records),
                "total_size": total,
                "monitor": None if ranking is None else ranking[0],
                "mode": None if ranking is None else ranking[1],
                "policy": None if policy is None else policy.to_json(),
                "checkpoints": [
                    {
                        "step": r.step,
                        "directory": r.directory,
                        "created": local_time(r.created, offset=True),
                        "size": r.size,
                        "metrics": metrics_json(r.metrics),
                        "latest": r is latest,
                        "best": None if ranking is None else r is best,
                        "pinned": r.pinned,
                    }
                    for r in records
                ],
            }
        )
        return 0
    names = list(dict.fromkeys(name for r in records for name in r.metrics))
    rows = []
    for r in records:
        flags = [f for f, on in (("latest", r is latest), ("best", r is best)) if on]
        flags += ["pinned"] if r.pinned else []
        rows.append(
            [str(r.step)]
            + [fmt_number(r.metrics.get(name)) for name in names]
            + [human_size(r.size), local_time(r.created), " ".join(flags)]
        )
    header = ["step", *names, "size", "created", "flags"]
    numeric = {0, *range(1, len(names) + 2)}
    for line in table(header, rows, right=numeric):
        print(line)
    summary = f"{len(records)} checkpoint{'' if len(records) == 1 else 's'}, {human_size(total)}"
    if ranking is None:
        summary += "; no monitor to rank by (--monitor NAME marks the best)"
    elif best is None:
        summary += f"; none has a finite {ranking[0]}, so none is best"
    else:
        summary += f"; best by {ranking[0]} ({ranking[1]}, from {ranking[2]}): step {best.step}"
    print(summary)
    if policy is not None:
        print(f"stopping policy: {policy.describe()}")
    return 0


def show(args: argparse.Namespace) -> int:
    store = open_store(args)
    records = store.records()
    ranking = resolve(args.monitor, args.mode, policy_state(records[-1] if records else None))
    record = select(store, records, args.step, ranking)
    best = best_record(records, ranking)
    error = None
    tensors: list[TensorInfo] | None = None
    state: Any = None
    try:
        tensors = list(store.tensor_info(record.step).values())
        # Sizes are checked, checksums are not: that is `verify`'s job, and it reads every byte.
        state = store.load(record.step, verify=False, mmap=True)
    except CheckpointNotFoundError:
        raise
    except CkptkitError as e:
        error = str(e)
    metadata = dict(record.metadata)
    if not args.all:
        metadata.pop(RESERVED_METADATA_KEY, None)
    policy = policy_state(record)
    flags = {"latest": record is records[-1], "best": None if ranking is None else record is best}
    if args.json:
        print_json(
            {
                "root": str(store.root),
                "step": record.step,
                "directory": record.directory,
                "created": local_time(record.created, offset=True),
                "size": record.size,
                **flags,
                "pinned": record.pinned,
                "metrics": metrics_json(record.metrics),
                "metadata": to_json(metadata),
                "policy": None if policy is None else policy.to_json(),
                "files": [
                    {"name": f.name, "size": f.size, "checksum": f.checksum} for f in record.files
                ],
                "tensors": None if tensors is None else [_tensor_json(t) for t in tensors],
                "state": None if error else _shorten(to_json(state), args.all),
                "error": error,
            }
        )
        return FAILED if error else 0
    _print_record(record, flags, metadata)
    if policy is not None:
        print(f"stopping policy: {policy.describe()}")
        if policy.stop_reason:
            print(f"  {policy.stop_reason}")
    print("files")
    rows = [[f.name, human_size(f.size), f.checksum] for f in record.files]
    for line in table(["name", "size", "checksum"], rows, right={1}):
        print(f"  {line}")
    if error is not None:
        print(f"ckptkit: error: {error}", file=sys.stderr)
        return FAILED
    assert tensors is not None
    _print_tensors(tensors, args.all)
    print("state")
    for line in _pretty(_shorten(to_json(state), args.all), indent=2):
        print(line)
    return 0


def _print_record(
    record: CheckpointRecord, flags: Mapping[str, bool | None], metadata: dict[str, Any]
) -> None:
    on = [name for name, value in flags.items() if value] + (["pinned"] if record.pinned else [])
    print(f"step {record.step}" + (f" ({', '.join(on)})" if on else ""))
    print(f"  directory  {record.directory}")
    print(f"  created    {local_time(record.created)}")
    print(f"  size       {human_size(record.size)} ({record.size} bytes)")
    print("metrics" + ("" if record.metrics else ": none"))
    rows = [[name, fmt_number(value)] for name, value in record.metrics.items()]
    for line in table(["name", "value"], rows, right={1}) if rows else []:
        print(f"  {line}")
    print("metadata" + ("" if metadata else ": none"))
    if metadata:
        for line in _pretty(to_json(metadata), indent=2):
            print(line)


def _print_tensors(tensors: list[TensorInfo], everything: bool) -> None:
    total = sum(t.nbytes for t in tensors)
    print(f"tensors: {len(tensors)}, {human_size(total)}")
    shown = tensors if everything or len(tensors) <= _MAX_TENSORS else tensors[:_MAX_TENSORS]
    rows = [[t.name, t.dtype, str(list(t.shape)), human_size(t.nbytes)] for t in shown]
    for line in table(["name", "dtype", "shape", "size"], rows, right={3}) if rows else []:
        print(f"  {line}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more tensors (--all shows every one)")


def _tensor_json(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes}


def _shorten(value: Any, everything: bool) -> Any:
    """Cut long lists, dicts and strings of a JSON value, saying how much was left out."""
    if everything:
        return value
    if isinstance(value, str) and len(value) > _MAX_CHARS:
        return f"{value[:_MAX_CHARS]}... ({len(value) - _MAX_CHARS} more characters)"
    if isinstance(value, list):
        items = [
            _shorten(v, everything) for v in value[: _HEAD if len(value) > _MAX_ITEMS else None]
        ]
        if len(value) > _MAX_ITEMS:
            items.append(f"... {len(value) - _HEAD} more items")
        return items
    if isinstance(value, dict):
        keys = list(value)[: _HEAD if len(value) > _MAX_ITEMS else None]
        out = {k: _shorten(value[k], everything) for k in keys}
        if len(value) > _MAX_ITEMS:
            out["..."] = f"{len(value) - _HEAD} more keys"
        return out
    return value


def _pretty(value: Any, *, indent: int) -> list[str]:
    """JSON lines: a container that fits on one line stays on one line."""
    pad = " " * indent
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or indent + len(flat) <= _WIDTH:
        return [pad + flat]
    if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
        return [pad + "[", *_packed(value, indent + 2), pad + "]"]
    if isinstance(value, list):
        inner = [_pretty(v, indent=indent + 2) for v in value]
        opening, closing = "[", "]"
    else:
        inner = []
        for key, v in value.items():
            lines = _pretty(v, indent=indent + 2)
            lines[0] = f"{pad}  {json.dumps(key, ensure_ascii=False)}: {lines[0].lstrip()}"
            inner.append(lines)
        opening, closing = "{", "}"
    out = [pad + opening]
    for i, lines in enumerate(inner):
        out += [*lines[:-1], lines[-1] + ("," if i < len(inner) - 1 else "")]
    return [*out, pad + closing]


def _packed(items: list[Any], indent: int) -> list[str]:
    """Scalars, comma-separated, as many to a line as fit in the width."""
    lines: list[str] = []
    line = ""
    for i, item in enumerate(items):
        text = json.dumps(item, ensure_ascii=False) + ("," if i < len(items) - 1 else "")
        if line and indent + len(line) + 1 + len(text) > _WIDTH:
            lines.append(" " * indent + line)
            line = text
        else:
            line = f"{line} {text}" if line else text
    return [*lines, " " * indent + line]
