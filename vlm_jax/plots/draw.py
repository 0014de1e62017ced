"""Drawing shared by every plot: figures without pyplot, grouped bars, lines over seeds, box overlays.

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas (no pyplot, no global
backend), so plotting works headless and leaves a notebook's backend alone. Every figure uses the
constrained layout at `DPI`, so a PNG is exactly `figsize * DPI` pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DPI = 120
BASELINE_COLOR = "0.55"
TRUE_BOX_COLOR = "#1a9850"
PREDICTED_BOX_COLOR = "#d73027"


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1) -> tuple[Figure, list]:
    """A figure of `width` x `height` inches and its rows x columns axes, flat in row order."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, list(axes.ravel())


def save(figure: Figure, path: epath.PathLike) -> str:
    """Writes `figure` as a PNG to `path` (local or gs://) and returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return str(path)


def row_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per row name: grey for "baseline", the tab10 cycle for the others in order."""
    cycle = colormaps["tab10"].colors
    others = [name for name in names if name != "baseline"]
    colors = {name: cycle[index % len(cycle)] for index, name in enumerate(others)}
    return {**colors, **({"baseline": BASELINE_COLOR} if "baseline" in names else {})}


def grouped_bars(ax, groups: Sequence[str], series: Sequence[str], heights: np.ndarray,
                 errors: np.ndarray | None = None, colors: Sequence[str] | None = None) -> list:
    """One cluster of bars per group, one bar per series in each: heights and errors [S, G] (NaN:
    no bar, no error bar; a series without any error gets none). Returns the BarContainer of each
    series; labels the x ticks and the legend."""
    heights = np.asarray(heights, np.float64)
    count = max(len(series), 1)
    width = 0.8 / count
    positions = np.arange(len(groups))
    containers = []
    for index, label in enumerate(series):
        offset = (index - (count - 1) / 2) * width
        finite = None if errors is None else np.isfinite(errors[index])
        error = np.where(finite, errors[index], 0.0) if finite is not None and finite.any() else None
        containers.append(ax.bar(positions + offset, np.nan_to_num(heights[index], nan=0.0), width, yerr=error,
                                 capsize=2.5, label=label, color=None if colors is None else colors[index],
                                 error_kw={"elinewidth": 1.0}))
        for patch, height in zip(containers[-1], heights[index]):
            patch.set_visible(bool(np.isfinite(height)))
    ax.set_xticks(positions, list(groups))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize="small")
    return containers


def mean_and_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over seeds of values [seeds, N], NaN left out (mean NaN where every seed
    is NaN; std 0 where fewer than two seeds have a value)."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    counts = finite.sum(axis=0)
    mean = np.where(counts > 0, np.where(finite, values, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)
    squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    return mean, np.where(counts > 1, np.sqrt(squares / np.maximum(counts - 1, 1)), 0.0)


def line_over_seeds(ax, steps: Sequence[np.ndarray], values: Sequence[np.ndarray], *, color, label: str | None,
                    linestyle: str = "-") -> None:
    """One line per seed (values [n_i] at steps [n_i]); with several seeds the seeds are thin and
    their mean, where every seed logged the same steps, is drawn over them."""
    if len(values) == 1:
        ax.plot(steps[0], values[0], color=color, linestyle=linestyle, linewidth=1.6, label=label)
        return
    same_steps = all(len(s) == len(steps[0]) and np.array_equal(s, steps[0]) for s in steps)
    for seed_steps, seed_values in zip(steps, values):
        ax.plot(seed_steps, seed_values, color=color, linestyle=linestyle, linewidth=0.7, alpha=0.4,
                label=None if same_steps else label)
        label = label if same_steps else None
    if same_steps:
        ax.plot(steps[0], mean_and_spread(np.stack(values))[0], color=color, linestyle=linestyle, linewidth=1.8,
                label=label)


def errorbar_line(ax, x: np.ndarray, mean: np.ndarray, std: np.ndarray, *, label: str, color, marker: str = "o",
                  linestyle: str = "-") -> None:
    """Mean with a band of ± std over seeds (points where the mean is NaN are left out)."""
    keep = np.isfinite(mean)
    x, mean, std = np.asarray(x)[keep], np.asarray(mean)[keep], np.asarray(std)[keep]
    ax.plot(x, mean, marker=marker, markersize=4, color=color, linestyle=linestyle, label=label)
    if np.any(std > 0):
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)


def draw_boxes(ax, boxes_xyxy: np.ndarray, *, color: str, linestyle: str = "-", labels: Sequence[str] = ()) -> list:
    """Rectangles for boxes [N, 4] (x0, y0, x1, y1 in pixels) on an image axes, each with its label
    (if any) at its top-left corner; returns the Rectangle patches in order."""
    patches = []
    for index, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy, np.float64)):
        patch = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linestyle=linestyle, linewidth=1.6)
        ax.add_patch(patch)
        patches.append(patch)
        if index < len(labels) and labels[index]:
            ax.text(x0, y0, labels[index], color="white", fontsize=6.5, va="bottom", ha="left",
                    bbox={"facecolor": color, "alpha": 0.75, "pad": 1.0, "linewidth": 0})
    return patches


def box_handle(color: str, linestyle: str, label: str) -> Rectangle:
    """A legend entry for boxes drawn by `draw_boxes`."""
    return Rectangle((0, 0), 1, 1, fill=False, edgecolor=color, linestyle=linestyle, linewidth=1.6, label=label)


def percent_axis(ax, label: str) -> None:
    """A y axis in percent starting at 0."""
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
