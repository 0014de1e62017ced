"""Training metrics: a JSON-lines file, TensorBoard event files and a progress bar, on the chief only.

`<workdir>/metrics.jsonl` holds one object per logged step, `{"step": s, "<name>": value, ...}`;
`<workdir>/tb/` holds tensorboardX event files with the same scalars. Both are written by process 0
only, so a multi-host job produces one record, not one per host. A method experiment adds its table's
rows and stage times (`write_experiment_events`), so TensorBoard on the workdir shows stages,
variants and seeds side by side.

A resumed run first drops the lines past the step it resumes from (they describe steps that are
about to be trained again), so the file reads as one run whose steps increase.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def read_metrics(workdir: epath.PathLike) -> list[dict[str, float]]:
    """The records of `<workdir>/metrics.jsonl`, in file order ([] when there is none)."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_tag(name: str) -> str:
    """TensorBoard tags allow only [\\w./-]: "recall@1" becomes "recall_1"."""
    return re.sub(r"[^\w./-]", "_", name)


def write_experiment_events(workdir: epath.PathLike, rows: Mapping[str, Sequence[Mapping[str, float]]],
                            timings: Mapping[str, float]) -> None:
    """TensorBoard events of an experiment's table beside its runs' training events.

    `<workdir>/tb/<row>` holds each row's final metrics as `results/<metric>`, seed i at step i (the
    frozen baseline: one record at step 0); `<workdir>/tb/stages` holds the stages' wall times
    (`time/<stage>_s`, step 0). With the runs' own `runs/<variant>/seed_<i>/tb`, TensorBoard opened
    on the workdir lists every stage, variant and seed as a run of its own."""
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    root = epath.Path(workdir) / TENSORBOARD_DIR
    for row, records in {**rows, "stages": [timings]}.items():
        writer = SummaryWriter(logdir=str(root / row))
        for step, record in enumerate(records):
            for name, value in sorted(record.items()):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    tag = name if row == "stages" else f"results/{name}"
                    writer.add_scalar(tensorboard_tag(tag), float(value), global_step=step)
        writer.close()


class MetricsWriter:
    """Appends scalar metrics to metrics.jsonl and TensorBoard; a no-op unless `enabled`.

    Args:
      workdir: the run's directory.
      enabled: True on the chief (process 0).
      resume_step: the step training resumes from; records of later steps are dropped.
    """

    def __init__(self, workdir: epath.PathLike, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self._path = epath.Path(workdir) / METRICS_FILE
        self._tensorboard = None
        if not enabled:
            return
        if self._path.exists():
            kept = [record for record in read_metrics(workdir) if record.get("step", 0) <= resume_step]
            self._path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only the chief needs it

        self._tensorboard = SummaryWriter(logdir=str(epath.Path(workdir) / TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records scalar `metrics` at `step` (non-finite values are written as null / skipped)."""
        if not self.enabled:
            return
        scalars = {name: float(value) for name, value in sorted(metrics.items())}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
        with self._path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(tensorboard_tag(name), value, global_step=int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Progress:
    """A tqdm bar over the training steps (steps/s and ETA), shown on the chief only."""

    def __init__(self, total_steps: int, initial_step: int, *, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, steps: int = 1, **postfix: float) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
