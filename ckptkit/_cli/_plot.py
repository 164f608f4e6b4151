"""``ckptkit plot``: a metric's history over the kept checkpoints, as an image file.

matplotlib is an optional extra, imported only here and only when a plot is drawn; the figure
is made without pyplot, so no GUI backend or global figure state is involved.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ckptkit._cli._common import (
    USAGE,
    CliError,
    PolicyState,
    best_record,
    fmt_number,
    open_store,
    policy_state,
    resolve,
)
from ckptkit._record import CheckpointRecord

INSTALL_HINT = "pip install 'ckptkit-ml[plot]'"


def plot(args: argparse.Namespace) -> int:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise CliError(
            f"ckptkit plot needs matplotlib, which is not installed: {INSTALL_HINT}", USAGE
        ) from e
    store = open_store(args)
    records = store.records()
    policy = policy_state(records[-1] if records else None)
    metric = args.metric or (None if policy is None else policy.monitor)
    if metric is None:
        raise CliError(
            "pass --metric NAME (the latest checkpoint holds no stopping policy to take it from)"
        )
    kept = [r for r in records if metric in r.metrics]
    if not kept:
        names = sorted({name for r in records for name in r.metrics})
        raise CliError(f"no checkpoint has a {metric!r} metric; the metrics there are: {names}")
    points = [(r.step, float(r.metrics[metric]), r.pinned) for r in kept]
    finite = [(s, v, p) for s, v, p in points if math.isfinite(v)]
    best, note = _best(kept, metric, args.mode, policy)
    stop = policy.stop_step if policy is not None and policy.stopped else None

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(
        [s for s, _, _ in finite],
        [v for _, v, _ in finite],
        "-o",
        ms=4,
        label=f"{metric} (kept checkpoints)",
    )
    pinned = [(s, v) for s, v, p in finite if p]
    if pinned:
        ax.plot(
            *zip(*pinned, strict=True), "s", ms=10, mfc="none", color="tab:green", label="pinned"
        )
    best_text = "" if best is None else f"best {fmt_number(best[1])} at step {best[0]}"
    if best is not None and best[0] not in {r.step for r in kept}:
        best_text += " (checkpoint deleted)"
    if best is not None:
        ax.plot([best[0]], [best[1]], "*", ms=16, color="tab:orange", label=best_text)
    if stop is not None:
        ax.axvline(stop, color="tab:red", ls="--", lw=1, label=f"stopped at step {stop}")
    skipped = len(points) - len(finite)
    name = store.root.name if isinstance(store.root, Path) else ""
    title = f"{metric} in {name or store.root}"
    ax.set_title(title + (f" ({skipped} NaN/inf values not drawn)" if skipped else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.output)

    parts = [f"wrote {args.output}: {len(points)} steps of {metric}"]
    parts.append(note if best is None else best_text)
    if stop is not None:
        parts.append(f"stopped at step {stop}")
    print(", ".join(parts))
    return 0


def _best(
    kept: list[CheckpointRecord], metric: str, mode: str | None, policy: PolicyState | None
) -> tuple[tuple[int, float] | None, str]:
    """The best point to mark, and a note when there is none.

    The best kept checkpoint by the metric (earliest on a tie), as ``ls``, ``show best`` and
    ``Checkpointer.restore_best`` rank it.
    """
    try:
        ranking = resolve(metric, mode, policy)
    except CliError:
        return None, "no best marked (pass --mode min or --mode max to mark one)"
    best = best_record(kept, ranking)
    if best is None:
        return None, f"no finite {metric}, so no best"
    return (best.step, float(best.metrics[metric])), ""
