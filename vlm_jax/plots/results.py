"""What the plots read from a workdir: its config, its results and its runs, rows in the table's order.

A workdir of the shared runner (`vlm_jax.methods.runner`) holds `config.json` (the experiment),
`results.json` ("baseline/<metric>", "<variant>/<metric>" means over seeds, ".../std" sample stds)
and `runs/<variant>/seed_<i>/` with each run's `results.json`, `config.json` and, for runs that
trained, `metrics.jsonl`. A `train` workdir holds `metrics.jsonl` and `results.json` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

BASELINE = "baseline"


class MissingData(Exception):
    """The data a plot draws is not in the workdir: the plot is skipped with a warning naming it."""


def read_json(path: epath.PathLike) -> dict[str, Any]:
    """The JSON object in `path`, {} when there is no such file."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def plain(config: Any) -> dict[str, Any]:
    """A config (ConfigDict or dict) as plain nested dicts and lists, as config.json holds it."""
    if config is None:
        return {}
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                                 default=lambda value: value.to_dict() if hasattr(value, "to_dict") else str(value)))


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table: "baseline" or a variant, and its label."""

    name: str
    label: str


@dataclasses.dataclass
class Workdir:
    """A finished run's directory with its resolved config and final metrics."""

    path: epath.Path
    config: dict[str, Any]
    results: dict[str, Any]

    @classmethod
    def read(cls, path: epath.PathLike, config: Any = None, metrics: Mapping[str, Any] | None = None) -> "Workdir":
        """`path` with `config` (None: its config.json) and its results.json updated by `metrics`."""
        path = epath.Path(path)
        config = plain(config) if config is not None else read_json(path / "config.json")
        return cls(path, config, {**read_json(path / "results.json"), **dict(metrics or {})})

    @property
    def task(self) -> str:
        return str(self.config.get("task", ""))

    def variants(self) -> list[str]:
        """Variant names in the runner's table order: `row_order` first, then the method itself (no
        overrides), then the rest; without variants in the config, the run directories by name."""
        variants = self.config.get("variants") or {}
        if not variants:
            runs = self.path / "runs"
            return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.exists() else []
        listed = [name for name in self.config.get("row_order") or () if name in variants]
        return listed + sorted((name for name in variants if name not in listed), key=lambda name: bool(variants[name]))

    def rows(self, *, baseline: bool = True) -> list[Row]:
        """The table's rows: the baseline (when asked) and every variant, with their labels."""
        labels = self.config.get("variant_labels") or {}
        rows = [Row(name, str(labels.get(name, name)).strip()) for name in self.variants()]
        if baseline:
            rows.insert(0, Row(BASELINE, str(self.config.get("baseline_label") or "baseline").strip()))
        return rows

    def table(self) -> list[tuple[str, str]]:
        """(metric, column label) of every table column."""
        return [(str(metric), str(label)) for metric, label in self.config.get("table") or ()]

    def eval_type(self, name: str) -> str:
        """The type of eval spec `name` ("" when the config has no such spec)."""
        spec = (self.config.get("evals") or {}).get(name) or {}
        return str(spec.get("type", "zero_shot")) if spec else ""

    def stats(self, rows: Sequence[Row], metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Means and sample stds over seeds, float64 [R, M] (NaN where missing; a baseline has no std)."""
        means = np.full((len(rows), len(metrics)), np.nan)
        stds = np.full_like(means, np.nan)
        for i, row in enumerate(rows):
            for j, metric in enumerate(metrics):
                mean, std = self.results.get(f"{row.name}/{metric}"), self.results.get(f"{row.name}/{metric}/std")
                means[i, j] = mean if finite(mean) else np.nan
                stds[i, j] = std if finite(std) else np.nan
        return means, stds

    def run_dirs(self, variant: str) -> list[epath.Path]:
        """runs/<variant>/seed_<i> in seed order."""
        directory = self.path / "runs" / variant
        if not directory.exists():
            return []
        seeds = [p for p in directory.iterdir() if re.fullmatch(r"seed_\d+", p.name)]
        return sorted(seeds, key=lambda p: int(p.name.split("_")[1]))

    def seed_results(self, variant: str) -> list[dict[str, Any]]:
        """Each finished seed's results.json of `variant`, in seed order."""
        return [read_json(run / "results.json") for run in self.run_dirs(variant) if (run / "results.json").exists()]

    def variant_value(self, variant: str, *path: str, default: Any = None) -> Any:
        """A field of `variant`'s config: its override, else the experiment's value, else `default`."""
        for section in ((self.config.get("variants") or {}).get(variant) or {}, self.config):
            value = section
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            if value is not None:
                return value
        return default
