"""What every command shares: opening a store safely, choosing steps, and formatting values.

The command line never creates a store: the root is checked first and anything that is not a
store is refused before the store is opened. Commands that only read (``ls``, ``show``,
``verify``, ``plot``, ``prune --dry-run``) open it with ``read_only=True``, so they never create
a lock file or sweep a crash's leftovers: looking at a store never changes it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ckptkit._checkpointer import RESERVED_METADATA_KEY
from ckptkit._errors import CheckpointNotFoundError
from ckptkit._manifest import MANIFEST_NAME
from ckptkit._modes import Mode, resolve_mode
from ckptkit._record import CheckpointRecord
from ckptkit._retention import RetentionPolicy
from ckptkit._store import CheckpointStore

#: Exit status of a command that failed (a bad checkpoint, a store that cannot be read or
#: changed); a usage problem (bad arguments, not a store, no such step) exits with ``USAGE``.
FAILED = 1
USAGE = 2

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


class CliError(Exception):
    """A failure to report as one ``ckptkit: error: ...`` line, with the exit status to use."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def storage_option(text: str) -> tuple[str, str]:
    """argparse type of ``--storage-option KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or key not in _STORAGE_KEYS:
        raise argparse.ArgumentTypeError(
            f"invalid --storage-option {text!r}: give KEY=VALUE with KEY one of "
            f"{', '.join(_STORAGE_KEYS)}"
        )
    return key, value


#: ``--storage-option`` keys: where each goes in ``storage_options``.
_STORAGE_KEYS = {
    "endpoint_url": "client",
    "region_name": "client",
    "key": "top",
    "secret": "top",
    "token": "top",
    "anon": "top",
    "project": "top",
}


def storage_options(pairs: list[tuple[str, str]]) -> dict[str, Any] | None:
    """``storage_options`` for ``CheckpointStore`` from ``--storage-option`` pairs."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for key, value in pairs:
        if _STORAGE_KEYS[key] == "client":
            options.setdefault("client_kwargs", {})[key] = value
        elif key == "anon":
            options[key] = value.lower() in ("1", "true", "yes")
        else:
            options[key] = value
    return options


def open_store(
    args: argparse.Namespace, *, writable: bool = False, **retention: Any
) -> CheckpointStore:
    """Open the store ``args.root`` names, refusing one that is not a store (never creating it).

    Read-only unless ``writable``: only ``prune``, ``pin`` and ``unpin`` change a store.
    """
    root: str = args.root
    options = storage_options(getattr(args, "storage_option", []))
    if "://" in root:
        store = CheckpointStore(root, read_only=not writable, storage_options=options, **retention)
        if not store.records() and store._reader.read_manifest().data is None:
            raise CliError(f"{root} is not a ckptkit store (no {MANIFEST_NAME})")
        return store
    if options is not None:
        raise CliError(f"{root}: --storage-option applies to s3:// stores, not to a directory")
    path = Path(root)
    if not path.exists():
        reason = "no such directory"
    elif not path.is_dir():
        reason = "not a directory"
    elif not (path / MANIFEST_NAME).exists():
        reason = f"no {MANIFEST_NAME}"
    else:
        return CheckpointStore(path, read_only=not writable, **retention)
    raise CliError(f"{root} is not a ckptkit store ({reason})")


def parse_step(text: str) -> int | str:
    """argparse type of a STEP argument: an int >= 0, ``latest`` or ``best``."""
    if text in ("latest", "best"):
        return text
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise ValueError(text)
    return step


def count(least: int) -> Any:
    """argparse type of a count option that must be an int >= ``least``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise ValueError(text)
        return value

    parse.__name__ = f"int >= {least}"
    return parse


# -- the stopping policy's state, as the Checkpointer keeps it in each record ----------------


@dataclass(frozen=True, kw_only=True)
class PolicyState:
    """The part of a saved stopping policy the command line shows."""

    monitor: str
    mode: Mode
    best: float | None
    best_step: int | None
    wait: int | None
    stopped: bool
    stop_step: int | None
    stop_reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped": self.stopped,
            "stop_step": self.stop_step,
            "stop_reason": self.stop_reason,
        }

    def describe(self) -> str:
        # The policy's best is where patience counts from (min_delta applies); the best
        # checkpoint is ranked by value, so the two are named apart.
        best = (
            "no improvement yet"
            if self.best_step is None
            else f"last improvement {fmt_number(self.best)} at step {self.best_step}"
        )
        text = f"{self.monitor} ({self.mode}), {best}"
        if self.stopped:
            text += f"; stopped at step {self.stop_step}"
        elif self.wait is not None:
            text += f"; {self.wait} evaluation{'' if self.wait == 1 else 's'} without improvement"
        return text


def policy_state(record: CheckpointRecord | None) -> PolicyState | None:
    """The stopping policy saved in ``record``'s metadata, or None (also when it is malformed)."""
    own = None if record is None else record.metadata.get(RESERVED_METADATA_KEY)
    state = own.get("policy") if isinstance(own, Mapping) else None
    config = state.get("config") if isinstance(state, Mapping) else None
    if not isinstance(state, Mapping) or not isinstance(config, Mapping):
        return None
    monitor, mode = config.get("monitor"), config.get("mode")
    if not isinstance(monitor, str) or mode not in ("min", "max"):
        return None

    def number(key: str) -> Any:
        value = state.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    best_step, wait, stop_step = number("best_step"), number("wait"), number("stop_step")
    reason = state.get("stop_reason")
    return PolicyState(
        monitor=monitor,
        mode="min" if mode == "min" else "max",
        best=None if number("best") is None else float(number("best")),
        best_step=None if best_step is None else int(best_step),
        wait=None if wait is None else int(wait),
        stopped=state.get("stopped") is True,
        stop_step=None if stop_step is None else int(stop_step),
        stop_reason=reason if isinstance(reason, str) else None,
    )


def resolve(
    monitor: str | None, mode: str | None, policy: PolicyState | None
) -> tuple[str, Mode, str] | None:
    """The monitor and mode to rank by, and where they came from; None when there is none.

    ``--monitor`` wins; without it, the monitor of the stopping policy saved in the latest
    checkpoint. ``--mode`` wins over the policy's mode; ``auto`` infers it from the name.
    """
    if mode == "auto":
        mode = None
    if monitor is None:
        if policy is None:
            return None
        monitor, source = policy.monitor, "the stopping policy"
    else:
        source = "--monitor"
    if mode is None and policy is not None and policy.monitor == monitor:
        return monitor, policy.mode, source
    try:
        return monitor, resolve_mode(mode or "auto", monitor), source
    except ValueError:
        raise CliError(
            f"cannot tell whether {monitor!r} is better low or high; pass --mode min or --mode max"
        ) from None


def best_record(
    records: Sequence[CheckpointRecord], ranking: tuple[str, Mode, str] | None
) -> CheckpointRecord | None:
    """The best of ``records`` by the ranking's monitor (ties: the earliest step)."""
    if ranking is None:
        return None
    ranked = RetentionPolicy(monitor=ranking[0], mode=ranking[1]).best(records)
    return ranked[0] if ranked else None


def select(
    store: CheckpointStore,
    records: Sequence[CheckpointRecord],
    step: int | str,
    ranking: tuple[str, Mode, str] | None,
) -> CheckpointRecord:
    """The record STEP names: an int, ``latest`` or ``best`` (by ``ranking``)."""
    if step != "best":
        return store._reader.select(list(records), step if isinstance(step, int) else "latest")
    if ranking is None:
        raise CliError(
            "STEP 'best' needs a metric to rank by: pass --monitor NAME (the latest checkpoint "
            "holds no stopping policy to take it from)"
        )
    best = best_record(records, ranking)
    if best is None:
        raise CheckpointNotFoundError(
            f"{store.root}: no checkpoint has a finite {ranking[0]!r} metric, so none is best"
        )
    return best


# -- formatting ------------------------------------------------------------------------------


def human_size(nbytes: int) -> str:
    """``nbytes`` in B, KiB, MiB, GiB, ... with one decimal."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def local_time(timestamp: float, *, offset: bool = False) -> str:
    """Seconds since the epoch as local ISO 8601 to the second (with the UTC offset if asked)."""
    moment = datetime.fromtimestamp(timestamp).astimezone()
    return (moment if offset else moment.replace(tzinfo=None)).isoformat(timespec="seconds")


def fmt_number(value: float | None) -> str:
    """A metric value for a table: 6 significant digits; NaN and infinities spelled out."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(json_number(value))
    return f"{value:.6g}"


def json_number(value: float) -> float | str:
    """A float for JSON output: non-finite values as the strings the manifest uses."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def metrics_json(metrics: Mapping[str, float]) -> dict[str, float | str]:
    return {name: json_number(float(value)) for name, value in metrics.items()}


def to_json(value: object) -> Any:
    """A JSON-safe copy of a metadata or state value: tuples as lists, NaN/inf as strings."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return f"<array {value.dtype} {list(value.shape)}>"
    if isinstance(value, np.generic):
        kind = value.dtype.kind
        if kind == "f":
            return json_number(float(value))
        if kind in "iub":
            return value.item()
        return str(value)
    return value


def print_json(document: object) -> None:
    """Write one JSON document to stdout (NaN/inf must already be strings)."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> list[str]:
    """Align ``rows`` under ``header``; columns in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
