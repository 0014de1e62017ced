"""Plots beside every result: PNGs in `<workdir>/plots/`, drawn from what a finished task wrote.

    from vlm_jax import plots
    paths = plots.write_plots(config, workdir, metrics)   # after any task: the PNGs it wrote
    python -m vlm_jax.plots WORKDIR                       # re-draws a finished workdir from its
                                                          # config.json and results.json

What each task gets (`PLOTS`; figures are headless, `plots.draw`):
  train, captioner  training.png (metrics.jsonl); train also top1.png where its results hold a top-1
  reco              training.png, reco_accuracy.png, reco_k.png (`reco.eval_ks`)
  rar               rar_candidates.png (`rar.sweep`)
  recap             training.png, recap_hard_negatives.png
  grain             training.png, grain_accuracy.png, grain_boxes.png (the trained GRAIN run's export)
  zero_shot_eval    top1.png
  recaption, annotate, other tasks: training.png and top1.png only where there is data for them.
A plot whose data is not in the workdir (`MissingData`) is skipped with a warning naming it, silently
where the task need not have it. A plot must never fail a finished run: any other error is logged
with its traceback and the plot skipped, unless `strict` (tests), which raises it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
from etils import epath

from vlm_jax.plots import bars, draw, grain, rar, recap, reco, training
from vlm_jax.plots.results import MissingData, Workdir

PLOTS_DIR = "plots"


@dataclasses.dataclass(frozen=True)
class Plot:
    """`<workdir>/plots/<name>.png`, drawn by `figure(workdir)`; `optional`: no warning without data."""

    name: str
    figure: Callable[[Workdir], Any]
    optional: bool = False


TRAINING = Plot("training", training.figure)
OPTIONAL = (Plot("training", training.figure, optional=True), Plot("top1", bars.top1_figure, optional=True))
PLOTS: dict[str, tuple[Plot, ...]] = {
    "train": (TRAINING, OPTIONAL[1]),
    "captioner": (TRAINING,),
    "zero_shot_eval": (Plot("top1", bars.top1_figure),),
    "reco": (TRAINING, Plot("reco_accuracy", reco.accuracy_figure), Plot("reco_k", reco.k_figure)),
    "rar": (OPTIONAL[0], Plot("rar_candidates", rar.candidates_figure)),
    "recap": (TRAINING, Plot("recap_hard_negatives", recap.hard_negatives_figure)),
    "grain": (TRAINING, Plot("grain_accuracy", grain.accuracy_figure), Plot("grain_boxes", grain.boxes_figure)),
}


def _chief() -> bool:
    """Whether this process writes (process 0 of a multi-host job, or a process without jax)."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def write_plots(config: Any, workdir: epath.PathLike, metrics: Mapping[str, Any] | None = None, *,
                strict: bool = False) -> list[str]:
    """Draws every plot of `config.task` (None: `<workdir>/config.json`'s) from the workdir and
    `metrics` (over its results.json); returns the paths of the PNGs written."""
    if not _chief():
        return []
    try:
        directory = Workdir.read(workdir, config, metrics)
    except Exception:  # noqa: BLE001 - an unreadable workdir leaves the run as it ended
        if strict:
            raise
        logging.warning("No plots for %s: its config or results could not be read.", workdir, exc_info=True)
        return []
    written = []
    for plot in PLOTS.get(directory.task, OPTIONAL):
        try:
            written.append(draw.save(plot.figure(directory), directory.path / PLOTS_DIR / f"{plot.name}.png"))
        except MissingData as error:
            if not plot.optional:
                logging.warning("Plot %s.png skipped: %s.", plot.name, error)
        except Exception:  # noqa: BLE001 - a plot never fails a finished run
            if strict:
                raise
            logging.warning("Plot %s.png skipped after an error:", plot.name, exc_info=True)
    for path in written:
        logging.info("Wrote %s", path)
    return written


__all__ = ["PLOTS", "MissingData", "Plot", "Workdir", "write_plots"]
