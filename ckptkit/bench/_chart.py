"""The PNG charts: one per group, sized to be read at a documentation page's column width.

Each chart is ``results-<section>-<size>.png`` (e.g. ``results-save-100m.png``): 7.4 inches wide
at 100 dpi (740 pixels, mkdocs-material's content column), 0.4 inch per method. A bar is the
median, its whisker the min-max range, its label the ratio and the verdict; a target that is a
ratio to the group's reference is a dashed line across its method's bar, at the limit times the
reference's median.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from ckptkit.bench._report import Row, target_of

WIDTH = 7.4
DPI = 100
FONT = 9


def chart_name(row: Row) -> str:
    """The name, less ``.png``, of the chart of a row's group: ``results-<section>-<size>``."""
    parts = [row.section] if row.size == "-" else [row.section, row.size]
    return "results-" + "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def charts(out: Path, rows: list[Row]) -> tuple[list[str], str]:
    """Draw one chart per group into ``out``; return the files' names and a line saying so."""
    try:
        # matplotlib is optional and absent from the CI type-check environment.
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return [], "no chart: matplotlib is not installed (pip install matplotlib)"
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.status == "ok" and row.samples:
            groups.setdefault(row.group, []).append(row)
    if not groups:
        return [], "no chart: nothing was measured"
    names: list[str] = []
    for members in groups.values():
        stem = chart_name(members[0])
        name = f"{stem}.png"
        n = 2
        while name in names:  # the same size given twice in --sizes
            name, n = f"{stem}-{n}.png", n + 1
        fig = _draw(plt, members)
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        names.append(name)
    return names, f"charts, one per group, in {out}: " + ", ".join(names)


def _unit(seconds: float) -> tuple[float, str]:
    if seconds < 1e-3:
        return 1e6, "us"
    if seconds < 1:
        return 1e3, "ms"
    return 1.0, "s"


def _draw(plt: Any, members: list[Row]) -> Any:
    fig, ax = plt.subplots(figsize=(WIDTH, 0.4 * len(members) + 1.2))
    lines = _title(fig, members[0].group)
    fig.set_figheight(0.4 * len(members) + 1.2 + 0.2 * (lines - 1))
    scale, unit = _unit(max(max(r.samples) for r in members))
    medians = [(r.median or 0.0) * scale for r in members]
    lows = [m - min(r.samples) * scale for m, r in zip(medians, members, strict=True)]
    highs = [max(r.samples) * scale - m for m, r in zip(medians, members, strict=True)]
    y = list(range(len(members)))
    colors = ["tab:blue" if r.method.startswith("ckptkit") else "tab:gray" for r in members]
    ax.barh(y, medians, xerr=[lows, highs], color=colors, alpha=0.8, capsize=3, height=0.6)
    ax.set_yticks(y, [r.method for r in members], fontsize=FONT)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=FONT)
    drawn_target = False
    ends = []
    for yi, (row, median) in enumerate(zip(members, medians, strict=True)):
        end = max(row.samples) * scale
        target = target_of(row)
        if target is not None and target.limit is not None and row.ratio_of_medians:
            # The limit times the reference's median: the row's median over its ratio of medians.
            x = target.limit * median / row.ratio_of_medians
            ax.vlines(x, yi - 0.4, yi + 0.4, colors="tab:red", linestyles="dashed", linewidth=1.5)
            end, drawn_target = max(end, x), True
        ends.append(end)
    xlabel = f"{unit} per operation: bar median, whisker min-max"
    ax.set_xlabel(xlabel + ("; dashed: target" if drawn_target else ""), fontsize=FONT)
    labels = []
    for yi, (row, end) in enumerate(zip(members, ends, strict=True)):
        text = f"{row.ratio:.2f}x {row.ratio_to}" if row.ratio is not None else ""
        if row.verdict:
            text += f" {row.verdict}" if row.ratio is not None else f"{row.verdict} ({row.target})"
        labels.append(ax.text(end, yi, " " + text, va="center", fontsize=FONT))
    fig.tight_layout()
    _fit_labels(fig, ax, labels, ends)
    fig.tight_layout()
    return fig


def _title(fig: Any, text: str) -> int:
    """Set the group as the figure's title, wrapped to the figure's width; return its lines."""
    renderer = fig.canvas.get_renderer()
    room = fig.get_figwidth() * fig.dpi - 16
    for chars in range(len(text), 20, -4):
        lines = textwrap.wrap(text, chars)
        title = fig.suptitle("\n".join(lines), x=0.01, ha="left", fontsize=FONT)
        if title.get_window_extent(renderer).width <= room:
            break
    return len(lines)


def _fit_labels(fig: Any, ax: Any, labels: list[Any], ends: list[float]) -> None:
    """Widen the x axis so every label ends inside the axes, whatever its length."""
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    right = max(ends)
    for label, end in zip(labels, ends, strict=True):
        text = label.get_window_extent(renderer).width + 6  # a little margin, in pixels
        if text < width:
            # end / right * width + text <= width, for the new right.
            right = max(right, end * width / (width - text))
    ax.set_xlim(0, right)
