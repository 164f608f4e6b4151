"""The PNG chart: one panel per group, medians with min-max whiskers and ratio labels."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from ckptkit.bench._report import Row


def chart(path: Path, rows: list[Row]) -> str:
    """Draw one panel per group (median, min-max whiskers, ratio labels); say what was done."""
    try:
        # matplotlib is optional and absent from the CI type-check environment.
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.status == "ok" and row.samples:
            groups.setdefault(row.group, []).append(row)
    if not groups:
        return "no chart: nothing was measured"
    ncols = 2
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, 2.6 * nrows), squeeze=False)
    for ax, (group, members) in zip(axes.flat, groups.items(), strict=False):
        scale, unit = (1e6, "us") if max(r.median or 0 for r in members) < 1e-3 else (1e3, "ms")
        medians = [(r.median or 0) * scale for r in members]
        lows = [m - min(r.samples) * scale for m, r in zip(medians, members, strict=True)]
        highs = [max(r.samples) * scale - m for m, r in zip(medians, members, strict=True)]
        y = list(range(len(members)))
        ax.barh(y, medians, xerr=[lows, highs], color="tab:blue", alpha=0.7, capsize=3)
        ax.set_yticks(y, [r.method for r in members], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(group, 80), fontsize=8)
        ax.set_xlabel(unit, fontsize=8)
        for yi, r in enumerate(members):
            label = f" {r.ratio:.2f}x" if r.ratio is not None else ""
            if r.verdict:
                label += f" {r.verdict}"
            ax.text(max(r.samples) * scale, yi, label, va="center", fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"
