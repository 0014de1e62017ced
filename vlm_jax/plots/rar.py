"""rar_candidates.png: RAR's accuracy against k, the number of candidate classes the MLLM ranks.

At the experiment's shot count (`rar.shots`), each variant with its own k gives a point of RAR by
ranking (one MLLM call per image and k) and by scoring, and recall@k (RAR's ceiling); with
`rar.sweep` a run also reports scoring and recall for every prefix j <= k of its candidates
("rar_score_top1@j", "recall@j": the same scores, no more MLLM calls), drawn as curves from the run
with the largest k. CLIP+kNN (the first candidate) does not depend on k: a horizontal line.
"""

from __future__ import annotations

import re

import numpy as np

from vlm_jax.plots import draw
from vlm_jax.plots.results import BASELINE, MissingData, Workdir, finite

# (metric, label, colour, marker, line style)
SERIES = (("rar_top1", "RAR (ranking)", "tab:blue", "o", "-"),
          ("rar_score_top1", "RAR (scoring)", "tab:orange", "s", "-"),
          ("recall", "recall@k (ceiling)", "tab:green", "^", "--"))


def candidate_points(workdir: Workdir) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(shots, {metric: (ks, means, stds)}) over the variants at the experiment's shot count: from the
    sweep of the largest-k run where it has one, else one point per variant."""
    shots = int((workdir.config.get("rar") or {}).get("shots", 0))
    variants = [row.name for row in workdir.rows(baseline=False)
                if int(workdir.variant_value(row.name, "rar", "shots", default=0)) == shots]
    k_of = {variant: int(workdir.variant_value(variant, "rar", "k", default=0)) for variant in variants}
    points = {}
    for metric, *_ in SERIES:
        by_k = {k_of[v]: (workdir.results.get(f"{v}/{metric}"), workdir.results.get(f"{v}/{metric}/std", 0.0))
                for v in sorted(variants, key=k_of.get) if finite(workdir.results.get(f"{v}/{metric}"))}
        widest = max(variants, key=k_of.get, default=None)
        seeds = workdir.seed_results(widest) if widest is not None else []
        swept = (re.fullmatch(re.escape(metric) + r"@(\d+)", key) for results in seeds for key in results)
        sweep = sorted({int(match[1]) for match in swept if match})
        if metric != "rar_top1" and sweep:
            values = np.asarray([[r.get(f"{metric}@{j}", np.nan) for j in sweep] for r in seeds], np.float64)
            mean, std = draw.mean_and_spread(values)
            by_k.update({j: (m, s) for j, m, s in zip(sweep, mean, std) if np.isfinite(m)})
        if by_k:
            ks = np.asarray(sorted(by_k))
            points[metric] = (ks, np.asarray([by_k[k][0] for k in ks], np.float64),
                              np.asarray([by_k[k][1] if finite(by_k[k][1]) else 0.0 for k in ks], np.float64))
    return shots, points


def tick_ks(ks: list[int]) -> list[int]:
    """The k axis' labelled ticks: every k up to 8 of them, else the powers of two, 5, the multiples of
    10 and the largest k (on a log axis, a sweep's every k from 1 to 20 would print labels over each other)."""
    if len(ks) <= 8:
        return ks
    return [k for k in ks if k & (k - 1) == 0 or k == 5 or k % 10 == 0 or k == ks[-1]]


def candidates_figure(workdir: Workdir):
    shots, points = candidate_points(workdir)
    if not points:
        raise MissingData("results.json has no rar_top1, rar_score_top1 or recall of any variant")
    fig, (ax,) = draw.new_figure(7.5, 4.6)
    for metric, label, color, marker, linestyle in SERIES:
        if metric in points:
            ks, mean, std = points[metric]
            draw.errorbar_line(ax, ks, 100 * mean, 100 * std, label=label, color=color, marker=marker,
                               linestyle=linestyle)
    main = workdir.rows(baseline=False)[0].name if workdir.rows(baseline=False) else ""
    for row, label, style in ((main, "CLIP+kNN (the first candidate)", "-."),
                              (BASELINE, "CLIP zero-shot (frozen)", ":")):
        value = workdir.results.get(f"{row}/knn_top1")
        if finite(value):
            ax.axhline(100 * value, color=draw.BASELINE_COLOR, linestyle=style, linewidth=1.3, label=label)
    ks = tick_ks(sorted({int(k) for ks, _, _ in points.values() for k in ks}))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="candidate classes ranked, k", title=f"RAR, {shots}-shot memory: accuracy against candidates"
           if shots else "RAR, zero-shot memory: accuracy against candidates")
    draw.percent_axis(ax, "top-1 / recall (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
