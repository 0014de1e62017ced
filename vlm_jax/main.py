"""Entry point: `python -m vlm_jax.main --config=experiments/<name>.py[:preset] --workdir=DIR`.

The config file's `get_config(arg)` returns an ml_collections ConfigDict; `config.task` names what to run
(see `TASKS`). Any field can be overridden on the command line (`--config.eval.batch_size=64`); the
config is locked, so a misspelt field is an error, not a silently ignored flag. The resolved config is
written to `<workdir>/config.json` before the task starts.
"""

from __future__ import annotations

import importlib
import json
import re
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
    "train": "vlm_jax.methods:train_task",
    "reco": "vlm_jax.methods.reco:reco_task",
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


def _last_line(message: str) -> str:
    """The final line of a chained error message, without its `module.ExceptionClass: ` prefix."""
    lines = [line.strip() for line in message.replace("\\n", "\n").splitlines() if line.strip()]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1] if lines else message)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad config file, preset or override into a one-line error.

    ml_collections reports these as tracebacks from inside flag parsing (or, for a missing config file,
    only when the config is first read); a user needs the one line that says what is wrong.
    """
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        flag = re.match(r"flag (--\S+?)[:=]", message)
        prefix = f"{flag.group(1).split('=')[0]}: " if flag and "Traceback" in message else ""
        _fail(prefix + _last_line(message))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        words = " ".join(str(error).replace("\\n", " ").replace("\\", "").split())
        quoted = len(words) > 1 and words[0] == words[-1] and words[0] in "'\""
        _fail("bad config override: " + (words[1:-1] if quoted else words))
    config_argument = flags.FLAGS["config"].config_filename if _CONFIG.present else None
    if config_argument and not epath.Path(config_argument.split(":")[0]).exists():
        _fail(f"config file {config_argument.split(':')[0]!r} does not exist.")
    return remaining


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
    app.run(main, flags_parser=parse_flags)
