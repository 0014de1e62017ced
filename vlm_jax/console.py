"""What a run shows a person, and where every log line goes.

The console carries what a person needs: one line per stage (`say`), progress bars with rate and
ETA (tqdm, on stderr), warnings and errors from any library, the final table and where the results,
plots and log are. Every log record at INFO and above (absl, orbax, grain, tfds, jax, ours) goes to
`<workdir>/log.txt` with absl's prefix (`log.<process>.txt` on processes other than 0), and the
`say` lines too, so the file alone tells what happened. `--verbosity=info` (or debug) on the command
line brings the library logs back to the console.

    console.configure(verbose=False)      # at start-up, before the workdir is known: INFO is buffered
    console.log_to(workdir)               # once it is: the buffer and every later record go to log.txt
    console.say("memory: 6.1 s")          # a line for the person (stdout, process 0) and the log
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

from etils import epath

LOG_FILE = "log.txt"
# Records kept while no log file is open yet (start-up, imports); older ones are dropped.
BUFFER_RECORDS = 10_000


class _LogSink(logging.Handler):
    """The log file's handler: buffers until `open` names the file, then appends every record.

    A remote (gs://) workdir cannot be appended to; its log is written to a local file and copied
    into the workdir when the sink closes (at exit)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self._buffer: list[logging.LogRecord] = []
        self._file = None
        self._copy_to: epath.Path | None = None

    def open(self, path: epath.Path) -> None:
        self.close_file()
        if str(path).startswith(("gs://", "s3://")):
            local = tempfile.NamedTemporaryFile("w", prefix="vlm_jax_log_", suffix=".txt", delete=False)
            local.close()
            self._file, self._copy_to = open(local.name, "a", encoding="utf-8"), path
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file, self._copy_to = open(path, "a", encoding="utf-8"), None
        for record in self._buffer:
            self._write(record)
        self._buffer.clear()
        self._file.flush()

    @property
    def path(self) -> str | None:
        if self._file is None:
            return None
        return str(self._copy_to) if self._copy_to is not None else self._file.name

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never end a run
            self.handleError(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._buffer.append(record)
            del self._buffer[:-BUFFER_RECORDS]
            return
        self._write(record)
        self._file.flush()

    def close_file(self) -> None:
        if self._file is None:
            return
        self._file.close()
        if self._copy_to is not None:
            with open(self._file.name, "rb") as source, self._copy_to.open("wb") as target:
                shutil.copyfileobj(source, target)
            os.unlink(self._file.name)
        self._file, self._copy_to = None, None

    def close(self) -> None:
        self.close_file()
        super().close()


_SINK = _LogSink()


def _absl_formatter() -> logging.Formatter:
    from absl import logging as absl_logging  # noqa: PLC0415

    return absl_logging.PythonFormatter()


def configure(*, verbose: bool) -> None:
    """Routes logging for a command-line run: stderr shows WARNING and above, the log file INFO and
    above (buffered until `log_to`). `verbose` (an explicit --verbosity) leaves the console at the
    level that flag set."""
    from absl import logging as absl_logging  # noqa: PLC0415

    root = logging.getLogger()
    handler = absl_logging.get_absl_handler()
    if handler not in root.handlers:  # app.run installs it; a bare call (tests) does it here
        absl_logging.use_absl_handler()
    if verbose:
        handler.setLevel(logging.NOTSET)
    else:
        handler.setLevel(logging.WARNING)
        root.setLevel(logging.INFO)
    _SINK.setFormatter(_absl_formatter())
    _SINK.setLevel(min(logging.INFO, root.level))
    if _SINK not in root.handlers:
        root.addHandler(_SINK)


def log_to(workdir: epath.PathLike, process_index: int = 0) -> str | None:
    """Opens `<workdir>/log.txt` (`log.<i>.txt` for process i > 0) for the records of this run,
    starting with those buffered since `configure`; returns its path (None when `configure` was
    not called: a run started in process, as notebooks do, logs as its caller set up)."""
    if _SINK not in logging.getLogger().handlers:  # not configured: an in-process call keeps its logging
        return None
    name = LOG_FILE if process_index == 0 else f"log.{process_index}.txt"
    _SINK.open(epath.Path(workdir) / name)
    return _SINK.path


def close() -> None:
    """Closes the log file (a gs:// workdir gets its copy now)."""
    _SINK.close_file()


def log_path() -> str | None:
    """The open log file, or None when no run has opened one (an in-process call, a notebook)."""
    return _SINK.path


def is_chief() -> bool:
    """Process 0, or any process before jax is imported (a single-process run)."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def say(message: str) -> None:
    """A line for the person at the console (stdout, process 0 only), also written to the log file."""
    if is_chief():
        print(message, flush=True)
    if _SINK in logging.getLogger().handlers:
        record = logging.LogRecord("vlm_jax", logging.INFO, __file__, 0, message, None, None)
        record.created = time.time()
        _SINK.handle(record)


def duration(seconds: float) -> str:
    """`42.1 s`, `3 min 05 s` or `1 h 02 min`: how long a stage took, as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def metrics_table(metrics: Mapping[str, float], *, skip: tuple[str, ...] = ("time/", "data/")) -> str:
    """Two columns, metric and value, for the final metrics of a task that prints no table itself."""
    rows = [(name, value) for name, value in sorted(metrics.items())
            if not name.startswith(skip) and isinstance(value, (int, float))]
    if not rows:
        return ""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4g}" if math.isfinite(value) else f"{name:<{width}}  -"
                     for name, value in rows)
