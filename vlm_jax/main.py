"""Entry point: `python -m vlm_jax.main --config=experiments/<name>.py[:preset] --workdir=DIR`.

The config file's `get_config(arg)` returns an ml_collections ConfigDict; `config.task` names what to run
(see `TASKS`). Any field can be overridden on the command line (`--config.eval.batch_size=64`); the
config is locked, so a misspelt field is an error, not a silently ignored flag. The resolved config is
written to `<workdir>/config.json` before the task starts.
"""

from __future__ import annotations

import importlib
import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from vlm_jax.config_lib import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: experiments/<name>.py[:preset].", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results (local or gs://); default workdirs/<config>[_<arg>]."
)

# Task name -> "module:function". Imported lazily so a task pulls in only what it uses.
TASKS = {
    "zero_shot_eval": "vlm_jax.evaluate.tasks:zero_shot_eval",
}


def resolve_task(name: str):
    """Returns the callable `task(config, workdir)` registered under `name`."""
    if name not in TASKS:
        raise ConfigError(f"config.task={name!r} is not a known task; expected one of {sorted(TASKS)}.")
    module_name, function_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def default_workdir(config_argument: str) -> str:
    """`experiments/reco.py:cars,smoke=True` -> `workdirs/reco_cars_smoke=True`: one workdir per experiment."""
    path, _, arg = config_argument.partition(":")
    name = epath.Path(path).stem
    return str(epath.Path("workdirs") / "_".join([name, *arg.split(",")] if arg else [name]))


def run(config, workdir: str) -> dict:
    """Runs `config.task` in `workdir` and returns its metrics."""
    if "task" not in config:
        raise ConfigError("the config has no `task` field; every experiment config must name one.")
    task = resolve_task(config.task)
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return task(config, workdir_path)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=experiments/reco.py")
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    try:
        metrics = run(_CONFIG.value, workdir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    logging.info("final metrics: %s", json.dumps(metrics, sort_keys=True, default=float))


if __name__ == "__main__":
    app.run(main)
