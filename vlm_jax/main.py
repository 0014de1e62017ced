"""Entry point: `python -m vlm_jax.main --config=experiments/<name>.py[:preset] --workdir=DIR`.

The config file's `get_config(arg)` returns an ml_collections ConfigDict; `config.task` names what to run
(see `TASKS`). Any field can be overridden on the command line (`--config.eval.batch_size=64`); the
config is locked, so a misspelt field is an error, not a silently ignored flag. `run` probes that the
workdir is writable and takes its lock (`<workdir>/LOCK`, `vlm_jax.train.workdir`); the resolved config
goes to `<workdir>/config.json` and one line of `config_history.jsonl` per start, for a training run
only after it was checked against the checkpoint it resumes.

How a run ends (`vlm_jax.errors`): 0 done; 2 a user error (`UserError`), one `error: ...` line on
stderr (with the traceback under `--verbosity=debug` or VLM_JAX_DEBUG=1); 3 preempted (`Preempted`,
also SIGTERM outside the trainer's loop), one line saying the state is saved and the same command
resumes; 1 anything else, a bug, with its traceback. gs:// paths are checked before the task starts
(`check_storage`): gcsfs installed, Google Cloud credentials found, in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from vlm_jax import console
from vlm_jax.config_lib import ConfigError
from vlm_jax.errors import EXIT_BUG, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError

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
    "captioner": "vlm_jax.methods:captioner_task",
    "rar": "vlm_jax.methods.rar:rar_task",
    "recap": "vlm_jax.methods.recap:recap_task",
    "grain": "vlm_jax.methods.grain_clip:grain_task",
    "recaption": "vlm_jax.mllm.recaption:recaption_task",
    "annotate": "vlm_jax.mllm.annotate:annotate_task",
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
    """Runs `config.task` in `workdir` and returns its metrics.

    The workdir must take a test write, and one run at a time holds it (`<workdir>/LOCK`, see
    `vlm_jax.train.workdir`): a second run into it is a UserError naming the first. The trainer
    records the config (config.json, config_history.jsonl) itself once the checkpoint it resumes
    matches; every other task's config is recorded here, before the task starts.
    """
    from vlm_jax.train import workdir as workdir_lib  # noqa: PLC0415 - jax only for tasks that get this far

    if "task" not in config:
        raise ConfigError("the config has no `task` field; every experiment config must name one.")
    if config.task not in TASKS:
        resolve_task(config.task)  # the one-line error naming the known tasks
    workdir_path = epath.Path(workdir)
    workdir_lib.check_writable(workdir_path, "the workdir")
    if "distributed" in config:
        from vlm_jax.train import sharding  # noqa: PLC0415

        # Only process 0 holds the lock, and only the distributed runtime knows which one that is.
        sharding.initialize_distributed(config.distributed)
    # The lock before the task's (slow) imports: a second run into a busy workdir ends at once.
    with workdir_lib.WorkdirLock(workdir_path):
        jax = sys.modules.get("jax")
        console.log_to(workdir_path, jax.process_index() if jax is not None else 0)
        task = resolve_task(config.task)
        if config.task != "train":  # the "train" task is `trainer.train` on this workdir
            workdir_lib.check_config_change(workdir_path, config, refuse_model_change=False)
            workdir_lib.record_config(workdir_path, config)
        metrics = task(config, workdir_path)
    finish(config, workdir_path, metrics)
    return metrics


def finish(config, workdir: epath.Path, metrics: dict) -> None:
    """After a task: `results.json` (when the task wrote none) and the plots beside it (process 0)."""
    if not console.is_chief():
        return
    results = workdir / "results.json"
    if not results.exists():
        results.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
    from vlm_jax import plots  # noqa: PLC0415 - matplotlib only once a run has finished

    plots.write_plots(config, workdir, metrics)


def summary_lines(workdir: epath.Path, metrics: dict) -> list[str]:
    """What the console ends with: the table (a method prints its own; other tasks' metrics here)
    and where the results, plots, log and TensorBoard events are."""
    lines = []
    if not (workdir / "results.txt").exists():
        table = console.metrics_table(metrics)
        lines += [table] if table else []
    pngs = sorted(path.name for path in (workdir / "plots").glob("*.png")) if (workdir / "plots").exists() else []
    lines.append(f"results: {workdir / 'results.json'}")
    lines.append(f"plots:   {workdir / 'plots'} ({', '.join(pngs)})" if pngs else "plots:   none written")
    if console.log_path():
        lines.append(f"log:     {console.log_path()}")
    lines.append(f"tensorboard --logdir {workdir}")
    return lines


def _last_line(message: str) -> str:
    """The final line of a chained error message, without its `module.ExceptionClass: ` prefix."""
    lines = [line.strip() for line in message.replace("\\n", "\n").splitlines() if line.strip()]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1] if lines else message)


def _verbosity_by_name(argv: list[str]) -> list[str]:
    """`--verbosity=debug` (or info, warning, error, fatal) as the number absl's flag parses (1 for debug)."""
    from absl.logging import converter  # noqa: PLC0415

    def numbered(argument: str) -> str:
        name, sep, value = argument.partition("=")
        if sep and name in ("--verbosity", "-v") and value.upper() in converter.ABSL_NAMES:
            return f"{name}={converter.ABSL_NAMES[value.upper()]}"
        return argument

    return [numbered(argument) for argument in argv]


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad config file, preset or override into a one-line error.

    ml_collections reports these as tracebacks from inside flag parsing (or, for a missing config file,
    only when the config is first read); a user needs the one line that says what is wrong.
    """
    try:
        remaining = flags.FLAGS(_verbosity_by_name(argv))
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
    sys.exit(EXIT_USER_ERROR)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def debug_mode() -> bool:
    """Whether user errors and preemptions also print their traceback: `--verbosity=debug` (absl; 1)
    or VLM_JAX_DEBUG=1."""
    return logging.level_debug() or os.environ.get("VLM_JAX_DEBUG", "") not in ("", "0")


def report(error: BaseException, workdir: str) -> int:
    """Prints how the run ended on stderr and returns the exit code (`vlm_jax.errors`): one line for
    a user error or a preemption (after its traceback in debug mode); nothing for a bug (EXIT_BUG:
    the caller re-raises it, so Python prints the traceback)."""
    if isinstance(error, Preempted):
        if debug_mode():
            traceback.print_exception(error)
        print(f"preempted: {_one_line(error)}; the state is saved (workdir {workdir}): rerun the same command "
              "to resume.", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(error, UserError):
        message = _one_line(error)
    elif isinstance(error, PermissionError):
        # Path handling names its files in a UserError; this catches a path it did not foresee.
        message = (f"permission denied: {error.filename or _one_line(error)}; fix its permissions or choose "
                   "another path.")
    else:
        return EXIT_BUG
    if debug_mode():
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


# Code whose state an exception raised in the middle of a call can leave broken (a jit interrupted
# while it compiles crashes the interpreter at exit; an interrupted import leaves half a module):
# SIGTERM waits until the run is out of it.
DEFER_SIGTERM_INSIDE = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "importlib", "torch", "tensorflow")
# Seconds between deliveries of a SIGTERM that arrived inside one of them.
SIGTERM_RETRY_S = 0.2


def _inside(frame, packages: tuple[str, ...]) -> bool:
    """Whether any frame of the stack that ends at `frame` runs code of one of `packages`."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in packages:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def sigterm_raises_preempted() -> Iterator[None]:
    """SIGTERM raises Preempted where the run is, outside the trainer's loop (which installs its own
    handler and saves at a step boundary): every stage writes its outputs atomically or resumably, so
    the same command resumes. A signal that arrives inside DEFER_SIGTERM_INSIDE (jax, orbax, an
    import, ...) is delivered again every SIGTERM_RETRY_S until the run is out of it (or inside the
    trainer's loop, whose handler takes it). A forked worker that inherited the handler dies of the
    signal instead."""
    main_pid = os.getpid()
    retry = None

    def handle(signum, frame):
        nonlocal retry
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _inside(frame, DEFER_SIGTERM_INSIDE):
            retry = threading.Timer(SIGTERM_RETRY_S, os.kill, (main_pid, signum))
            retry.daemon = True
            retry.start()
            return
        raise Preempted(f"received {signal.Signals(signum).name} outside a training step")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if retry is not None:
            retry.cancel()


NO_CREDENTIALS = ("no Google Cloud credentials for {path}: run `gcloud auth application-default login` or set "
                  "GOOGLE_APPLICATION_CREDENTIALS")
# Seconds the credential probe waits for Google's token endpoint (the probe does not retry).
CREDENTIALS_TIMEOUT_S = 10.0


def _gs_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("gs://") else []
    if isinstance(value, dict):
        return [path for item in value.values() for path in _gs_paths(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in _gs_paths(item)]
    return []


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (`google` for google.auth)
        return False


def probe_gcs_credentials(path: str) -> None:
    """Finds the default Google Cloud credentials and refreshes them once (no retries, a short timeout);
    a one-line UserError naming `path` when there are none or they are refused."""
    import google.auth  # noqa: PLC0415 - gcsfs brings google-auth
    import google.auth.exceptions  # noqa: PLC0415
    import google.auth.transport.requests  # noqa: PLC0415

    class TimedRequest(google.auth.transport.requests.Request):
        def __call__(self, *args, timeout=None, **kwargs):
            del timeout
            return super().__call__(*args, timeout=CREDENTIALS_TIMEOUT_S, **kwargs)

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        credentials.refresh(TimedRequest())
    except google.auth.exceptions.DefaultCredentialsError:
        raise UserError(NO_CREDENTIALS.format(path=path)) from None
    except google.auth.exceptions.RefreshError as error:
        raise UserError(f"the Google Cloud credentials for {path} were refused ({_one_line(error)}): run `gcloud "
                        "auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None
    except google.auth.exceptions.TransportError as error:
        raise UserError(f"could not reach Google Cloud to check the credentials for {path} ({_one_line(error)}); "
                        "check the network") from None


def check_storage(workdir: str, config: Any = None) -> None:
    """Before the task starts: every gs:// path (the workdir, any config field) needs gcsfs (what
    etils.epath reads gs:// with unless TensorFlow is installed) and Google Cloud credentials; each
    missing piece is a one-line UserError in seconds, not a stall in the first file operation."""
    fields = config.to_dict() if hasattr(config, "to_dict") else (config or {})
    paths = _gs_paths(workdir) + _gs_paths(fields)
    if not paths:
        return
    if not _installed("gcsfs") and not _installed("tensorflow"):
        raise UserError(f"{paths[0]} is on Google Cloud Storage, which needs gcsfs: pip install -e \".[gcs]\" "
                        "(or pip install gcsfs)")
    if _installed("google.auth"):
        probe_gcs_credentials(paths[0])


def execute(config, workdir: str) -> dict:
    """`run` after `check_storage`, with SIGTERM raising Preempted; returns the metrics, or exits with
    the code `report` gives (a bug is re-raised: Python prints its traceback and exits 1)."""
    try:
        check_storage(workdir, config)
        with sigterm_raises_preempted():
            return run(config, workdir)
    except Exception as error:  # every ending maps to an exit code; a bug is re-raised
        code = report(error, workdir)
        if code == EXIT_BUG:
            raise
    sys.exit(code)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=experiments/reco.py")
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    console.configure(verbose=flags.FLAGS["verbosity"].present)
    try:
        metrics = execute(_CONFIG.value, workdir)
        logging.info("final metrics: %s", json.dumps(metrics, sort_keys=True, default=float))
        if console.is_chief():
            print("\n".join(summary_lines(epath.Path(workdir), metrics)), flush=True)
    finally:
        console.close()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
