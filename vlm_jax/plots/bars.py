"""Bar charts of a results table: rows (baseline and variants) x columns, with seed error bars.

`table_figure` draws any subset of a runner table's columns (RECO's and GRAIN's accuracy bars, the
recap hard negatives); `top1_figure` the top-1 of every zero-shot eval of a single run
(`zero_shot_eval`, `train`), from results keys "<eval>/top1" and "<eval>/top1_<subset>".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from vlm_jax.plots import draw
from vlm_jax.plots.results import MissingData, Workdir, finite


def table_figure(workdir: Workdir, columns: Sequence[tuple[str, str]], *, title: str, ylabel: str, xlabel: str,
                 chance: float | None = None):
    """Grouped bars, one group per (metric, label) column and one bar per table row, in %, error
    bars the sample std over seeds; a row or column without any value is left out. `chance`: a dashed line
    there (a fraction)."""
    if not columns:
        raise MissingData("the config's table names no column this plot draws")
    metrics = [metric for metric, _ in columns]
    rows = workdir.rows()
    means, stds = workdir.stats(rows, metrics)
    keep, measured = np.isfinite(means).any(axis=1), np.isfinite(means).any(axis=0)
    if not keep.any():
        raise MissingData(f"results.json has no value of {metrics} for any row")
    rows = [row for row, kept in zip(rows, keep) if kept]
    means, stds = means[keep][:, measured], stds[keep][:, measured]
    columns = [column for column, kept in zip(columns, measured) if kept]
    width = min(16.0, max(7.0, 1.0 + 0.32 * len(rows) * len(columns)))
    fig, (ax,) = draw.new_figure(width, 4.6)
    colors = draw.row_colors([row.name for row in rows])
    draw.grouped_bars(ax, [label for _, label in columns], [row.label for row in rows], 100 * means, 100 * stds,
                      colors=[colors[row.name] for row in rows])
    if chance is not None:
        ax.axhline(100 * chance, color="black", linestyle="--", linewidth=1.0, label=f"chance ({100 * chance:g}%)")
        ax.legend(fontsize="small")
    draw.percent_axis(ax, ylabel)
    ax.set_xlabel(xlabel)
    seeds = int(workdir.config.get("seeds") or 1)
    ax.set_title(title + (f" (mean ± sample std over {seeds} seeds)" if seeds > 1 else ""))
    return fig


def top1_metrics(results: dict) -> tuple[list[str], list[str]]:
    """(eval names with a "<eval>/top1", the series "top1" and every "top1_<subset>" among them)."""
    names = sorted(key[: -len("/top1")] for key, value in results.items() if key.endswith("/top1") and finite(value))
    subsets = sorted({match.group(1) for key in results for name in names
                      if (match := re.fullmatch(re.escape(name) + r"/(top1_\w+)", key))})
    return names, ["top1", *subsets]


def top1_figure(workdir: Workdir):
    """Top-1 of every eval in results.json, one group per eval, one bar per subset ("all" first)."""
    names, series = top1_metrics(workdir.results)
    if not names:
        raise MissingData("results.json has no <eval>/top1")
    values = workdir.results
    heights = np.asarray([[values[f"{name}/{metric}"] if finite(values.get(f"{name}/{metric}")) else np.nan
                           for name in names] for metric in series], np.float64)
    fig, (ax,) = draw.new_figure(max(6.0, 1.2 + 0.5 * len(names) * len(series)), 4.4)
    labels = ["all" if metric == "top1" else metric[len("top1_"):] for metric in series]
    draw.grouped_bars(ax, names, labels, 100 * heights)
    draw.percent_axis(ax, "zero-shot top-1 (%)")
    ax.set(xlabel="eval set", title=f"Zero-shot top-1 by eval set ({workdir.task or 'run'})")
    return fig
