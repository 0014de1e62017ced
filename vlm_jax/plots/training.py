"""training.png: the logged train scalars against the step (`vlm_jax.train.metrics`).

A `train` workdir has one run (`<workdir>/metrics.jsonl`); a runner workdir one per variant and seed
(`runs/<variant>/seed_<i>/metrics.jsonl`): one colour per variant, each seed a thin line with the
seeds' mean drawn bold over them. One panel per group of scalars any run logged: the loss, the
method's loss terms, the learning rate, the temperature and the in-batch accuracies.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vlm_jax.plots import draw
from vlm_jax.plots.results import MissingData, Row, Workdir
from vlm_jax.train.metrics import METRICS_FILE, read_metrics


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    keys: tuple[str, ...]
    percent: bool = False


PANELS = (
    Panel("Training loss", "loss (nats)", ("train/loss",)),
    Panel("Loss terms", "loss term (nats)",
          ("train/caption_loss", "train/region_loss", "train/box_l1", "train/box_giou_loss",
           "train/loss_refined_refined", "train/loss_refined_image", "train/loss_refined_text")),
    Panel("Learning rate", "learning rate", ("train/lr",)),
    Panel("Temperature", "logit scale 1/τ", ("train/logit_scale", "train/scale")),
    Panel("In-batch accuracy", "accuracy (%)",
          ("train/i2t_accuracy", "train/t2i_accuracy", "train/token_accuracy", "train/region_accuracy",
           "train/i2t_accuracy_refined_refined", "train/t2i_accuracy_refined_refined"), percent=True),
)
KEY_LABELS = {
    "train/loss": "loss", "train/caption_loss": "caption", "train/region_loss": "region-description",
    "train/box_l1": "box L1", "train/box_giou_loss": "box 1 - GIoU", "train/loss_refined_refined": "NCE(v̄, t̄)",
    "train/loss_refined_image": "NCE(v̄, t)", "train/loss_refined_text": "NCE(v, t̄)", "train/lr": "learning rate",
    "train/logit_scale": "logit scale", "train/scale": "logit scale", "train/i2t_accuracy": "image -> text",
    "train/t2i_accuracy": "text -> image", "train/token_accuracy": "next token",
    "train/region_accuracy": "region -> description", "train/i2t_accuracy_refined_refined": "image -> text (refined)",
    "train/t2i_accuracy_refined_refined": "text -> image (refined)",
}
LINESTYLES = ("-", "--", ":", "-.")


def training_runs(workdir: Workdir) -> list[tuple[Row, list[list[dict]]]]:
    """(row, metric records of each seed) of every run that logged metrics: the workdir's own, or
    each variant's seeds."""
    if (workdir.path / METRICS_FILE).exists():
        label = str(workdir.config.get("method") or workdir.task or "run")
        return [(Row("run", label), [read_metrics(workdir.path)])]
    runs = []
    for row in workdir.rows(baseline=False):
        seeds = [read_metrics(run) for run in workdir.run_dirs(row.name) if (run / METRICS_FILE).exists()]
        if any(seeds):
            runs.append((row, [records for records in seeds if records]))
    return runs


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in one run's records (records without it, or with null, left out)."""
    pairs = [(record["step"], record[key]) for record in records
             if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])]
    return (np.asarray([p[0] for p in pairs], np.float64), np.asarray([p[1] for p in pairs], np.float64))


def figure(workdir: Workdir):
    """The training figure (raises MissingData when no run logged metrics)."""
    runs = training_runs(workdir)
    if not runs:
        raise MissingData(f"no {METRICS_FILE} in {workdir.path} or its runs/<variant>/seed_<i>/")
    logged = {key for _, seeds in runs for records in seeds for record in records for key in record}
    panels = [dataclasses.replace(panel, keys=tuple(k for k in panel.keys if k in logged)) for panel in PANELS]
    panels = [panel for panel in panels if panel.keys]
    if any(key.startswith("train/box_") for panel in panels for key in panel.keys):
        panels = [dataclasses.replace(panel, ylabel="loss term (nats; box terms unitless)")
                  if panel.title == "Loss terms" else panel for panel in panels]
    if not panels:
        raise MissingData(f"the {METRICS_FILE} files in {workdir.path} hold none of {[p.keys for p in PANELS]}")
    columns = min(len(panels), 3)
    fig, axes = draw.new_figure(4.3 * columns, 3.4 * math.ceil(len(panels) / columns),
                                math.ceil(len(panels) / columns), columns)
    colors = draw.row_colors([row.name for row, _ in runs])
    for index, (ax, panel) in enumerate(zip(axes, panels)):
        scale = 100.0 if panel.percent else 1.0
        for row, seeds in runs:
            for key, style in zip(panel.keys, LINESTYLES * len(panel.keys)):
                pairs = [series(records, key) for records in seeds]
                pairs = [(steps, values * scale) for steps, values in pairs if len(steps)]
                if pairs:
                    draw.line_over_seeds(ax, [p[0] for p in pairs], [p[1] for p in pairs], color=colors[row.name],
                                         label=None, linestyle=style)
        handles = []
        if len(runs) > 1 and index == 0:
            handles += [Line2D([], [], color=colors[row.name], label=row.label) for row, _ in runs]
        if len(panel.keys) > 1 or not handles:
            color = colors[runs[0][0].name] if len(runs) == 1 else "black"
            handles += [Line2D([], [], color=color, linestyle=style, label=KEY_LABELS.get(key, key))
                        for key, style in zip(panel.keys, LINESTYLES * len(panel.keys))]
        ax.legend(handles=handles, fontsize="small")
        ax.set(title=panel.title, xlabel="step (optimizer updates)", ylabel=panel.ylabel)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    seeds = max(len(seeds) for _, seeds in runs)
    fig.suptitle(f"Training ({workdir.task or 'train'}"
                 + (f", {seeds} seeds: thin lines, bold their mean)" if seeds > 1 else ")"))
    return fig
