"""RECO's plots: reco_accuracy.png, the table's zero-shot top-1 columns per row, and reco_k.png,
zero-shot top-1 against k, the number of retrieved items the trained fusion attends over.

The k curve reads each run's results.json: `reco.eval_ks` (`vlm_jax.methods.reco.RecoConfig`)
evaluates every zero-shot eval "<eval>" again as "<eval>@k<j>" with the fusion given j items; the
run's own "<eval>/<metric>" is the point at the k it trained with.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from vlm_jax.plots import bars, draw
from vlm_jax.plots.results import BASELINE, MissingData, Workdir, finite

SWEPT = re.compile(r"(?P<eval>.+)@k(?P<k>\d+)/(?P<metric>top1\w*)")


def top1_columns(workdir: Workdir) -> list[tuple[str, str]]:
    """The table's (metric, label) columns that are a top-1 ("<eval>/top1", "<eval>/top1_<subset>")."""
    return [(metric, label) for metric, label in workdir.table() if metric.partition("/")[2].startswith("top1")]


def accuracy_figure(workdir: Workdir):
    return bars.table_figure(workdir, top1_columns(workdir), title="RECO: zero-shot top-1 by class frequency",
                             ylabel="zero-shot top-1 (%)", xlabel="classes scored (table column)")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One variant's metric at each k: ks [K], per-seed values [seeds, K] (NaN: not measured)."""

    ks: np.ndarray
    values: np.ndarray
    trained_k: int | None


def k_curves(workdir: Workdir) -> dict[tuple[str, str], dict[str, Curve]]:
    """{(eval, metric): {variant: Curve}} of every swept zero-shot metric in the runs' results."""
    curves: dict[tuple[str, str], dict[str, Curve]] = collections.defaultdict(dict)
    for row in workdir.rows(baseline=False):
        seeds = workdir.seed_results(row.name)
        trained_k = workdir.variant_value(row.name, "reco", "k")
        points: dict[tuple[str, str], dict[int, list[float]]] = collections.defaultdict(dict)
        for index, results in enumerate(seeds):
            for key, value in results.items():
                match = SWEPT.fullmatch(key)
                if match and finite(value):
                    ks = points[match["eval"], match["metric"]]
                    ks.setdefault(int(match["k"]), [np.nan] * len(seeds))[index] = float(value)
        for (name, metric), by_k in points.items():
            if trained_k is not None and int(trained_k) not in by_k:  # the run's own metric is the point at its k
                by_k[int(trained_k)] = [float(r[f"{name}/{metric}"]) if finite(r.get(f"{name}/{metric}")) else np.nan
                                        for r in seeds]
            ks = np.asarray(sorted(by_k))
            curves[name, metric][row.name] = Curve(ks, np.asarray([by_k[k] for k in ks], np.float64).T,
                                                   None if trained_k is None else int(trained_k))
    return dict(curves)


def k_figure(workdir: Workdir):
    """One panel per swept table column (else per swept eval's top-1): a line per variant, mean ± std
    over seeds; the frozen CLIP dashed, the trained k dotted."""
    curves = k_curves(workdir)
    if not curves:
        raise MissingData("no run's results.json holds a k sweep (<eval>@k<j>/top1); set reco.eval_ks")
    labels = {tuple(metric.split("/", 1)): label for metric, label in workdir.table() if "/" in metric}
    panels = [key for key in labels if key in curves] or sorted(key for key in curves if key[1] == "top1")
    panels = panels or sorted(curves)
    fig, axes = draw.new_figure(3.9 * min(len(panels), 4), 3.6 * -(-len(panels) // 4), -(-len(panels) // 4),
                                min(len(panels), 4))
    rows = workdir.rows()
    colors = draw.row_colors([row.name for row in rows])
    for ax, (name, metric) in zip(axes, panels):
        trained = set()
        for row in rows[1:]:
            curve = curves[name, metric].get(row.name)
            if curve is None:
                continue
            mean, std = draw.mean_and_spread(curve.values)
            draw.errorbar_line(ax, curve.ks, 100 * mean, 100 * std, label=row.label, color=colors[row.name])
            trained.update({curve.trained_k} - {None})
        baseline = workdir.results.get(f"{BASELINE}/{name}/{metric}")
        if finite(baseline):
            ax.axhline(100 * baseline, color=draw.BASELINE_COLOR, linestyle="--", linewidth=1.2,
                       label=rows[0].label)
        for k in sorted(trained):
            ax.axvline(k, color="black", linestyle=":", linewidth=1.0, label=f"trained with k={k}")
        ks = sorted({int(k) for curve in curves[name, metric].values() for k in curve.ks})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set(title=labels.get((name, metric), f"{name} {metric}"), xlabel="retrieved items fused, k")
        draw.percent_axis(ax, "zero-shot top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("RECO: zero-shot top-1 against the number of retrieved items")
    return fig
