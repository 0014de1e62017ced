"""The run directory: one run at a time, writable before any work starts, and the config of every start.

    with workdir.WorkdirLock(directory):        # the entry point, around the task
        ...

Files (all written by process 0 only):
  <workdir>/LOCK: JSON {host, pid, started, command} of the run that holds the directory. A second
    run into it stops at once with a `UserError` naming that run. A lock left by a dead process on
    the same host (SIGKILL, a crash) is taken over with a warning; one from another host cannot be
    checked for liveness, so it refuses (its message says to remove the file if that run is gone).
    On a local path the check-and-create runs under an `fcntl` lock of the directory and the file is
    created with O_CREAT|O_EXCL, so two starts cannot both win; on `gs://...` it is best effort.
  <workdir>/config.json: the resolved config of the latest start or resume.
  <workdir>/config_history.jsonl: one JSON line per start or resume: {time, host, pid,
    resumed_from_step, config}.

The trainer records its config only after checking it against the checkpoint it resumes, so a
refused or mismatched resume leaves config.json as it was; other tasks record theirs at the start.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from absl import logging
from etils import epath

from vlm_jax.errors import UserError

LOCK_FILE = "LOCK"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
MODEL_SECTION = "model"  # changes under it alter the shapes or structure of what a checkpoint holds
_SHOWN_CHANGES = 12  # changed fields listed in the warning; the rest are counted


class WorkdirBusyError(UserError):
    """Another run holds the workdir's LOCK."""


def _is_remote(path: epath.Path) -> bool:
    return "://" in str(path)


def _process_index() -> int:
    # Before the distributed runtime starts, asking JAX would initialize a single-process backend.
    return jax.process_index() if jax.distributed.is_initialized() else 0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def check_writable(directory: epath.PathLike, what: str) -> None:
    """Creates `directory` if needed and writes and deletes a small file in it.

    Raises:
      UserError: one line naming `what` and the directory, when either fails (permissions, a
        regular file in the way, a read-only file system).
    """
    directory = epath.Path(directory)
    probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe\n")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"cannot write {what} {directory} ({reason}); fix its permissions or choose another "
                        "--workdir.") from None


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _directory_locked(directory: epath.Path) -> Iterator[bool]:
    """Holds an fcntl lock on a local directory, serializing the lock checks of concurrent starts;
    yields whether it could (object stores and some NFS mounts cannot)."""
    if _is_remote(directory):
        yield False
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False  # O_EXCL alone decides
        yield locked
    finally:
        os.close(descriptor)  # closing releases the flock


def _holder_alive(holder: Mapping[str, Any]) -> bool:
    """False only when the holder ran on this host and its pid is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True  # 0 and negative pids would signal process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a live process of another user
    return True


class WorkdirLock:
    """Exclusive hold of a workdir by one run (module docstring); a no-op on processes other than 0.

    Args:
      workdir: the run's directory (created if needed).
      command: recorded in the lock for whoever finds it; default the process's command line.
    """

    def __init__(self, workdir: epath.PathLike, *, command: str | None = None):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._command = command if command is not None else shlex.join(sys.argv)
        self._record: dict[str, Any] | None = None

    def _read_holder(self) -> dict[str, Any] | None:
        """The lock's JSON, or None when the file is gone, empty or not JSON (its writer died mid-write)."""
        try:
            holder = json.loads(self.path.read_text())
        except (ValueError, FileNotFoundError):
            return None
        return holder if isinstance(holder, dict) else None

    def _busy(self, holder: Mapping[str, Any] | None) -> WorkdirBusyError:
        if holder is None:
            return WorkdirBusyError(f"workdir {self.workdir} is locked by {self.path}, which names no run; remove it "
                                    "if no other run uses this workdir, or choose another --workdir.")
        command = str(holder.get("command", ""))
        command = command if len(command) <= 120 else command[:117] + "..."
        return WorkdirBusyError(
            f"workdir {self.workdir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('started')}, command: {command}); wait for it to end or choose another --workdir "
            f"(remove {self.path} only if that run is gone).")

    def _create(self, record: Mapping[str, Any]) -> None:
        text = json.dumps(record, sort_keys=True) + "\n"
        if _is_remote(self.path):
            self.path.write_text(text)
            return
        descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises `WorkdirBusyError` naming the run that holds it."""
        if _process_index() != 0:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "command": self._command}
        with _directory_locked(self.workdir) as serialized:
            if self.path.exists():
                holder = self._read_holder()
                # Under the directory lock no other start is between creating and writing the file,
                # so an empty one was left by a writer that died; without it, one may be in progress.
                stale = not _holder_alive(holder) if holder is not None else serialized
                if not stale:
                    raise self._busy(holder)
                logging.warning("Taking over the lock of a run that is gone: %s held by pid %s on %s since %s.",
                                self.path, (holder or {}).get("pid"), (holder or {}).get("host"),
                                (holder or {}).get("started"))
                self.path.unlink(missing_ok=True)
            try:
                self._create(record)
            except FileExistsError:
                raise self._busy(self._read_holder()) from None
        self._record = record
        logging.debug("Locked workdir %s (%s).", self.workdir, self.path)
        return self

    def release(self) -> None:
        """Removes the lock if this run holds it (a lock another run took over stays)."""
        if self._record is None:
            return
        record, self._record = self._record, None
        with _directory_locked(self.workdir):
            if self._read_holder() == record:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# The config of every start
# --------------------------------------------------------------------------------------------------


def resolved_config(config: Any) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists, references their values)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) of every field that differs, in sorted order; a field
    only one side has is (path, value, "<absent>") or ("<absent>" ...)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            changes.extend(config_changes(old.get(key, "<absent>"), new.get(key, "<absent>"), path))
        return changes
    return [] if old == new else [(prefix, old, new)]


def previous_config(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The config recorded by the last start in `workdir`, or None when there is none (or unreadable)."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        logging.warning("Ignoring %s: it is not JSON.", path)
        return None


def check_config_change(workdir: epath.PathLike, config: Any, *,
                        refuse_model_change: bool) -> list[tuple[str, Any, Any]]:
    """Compares `config` with `<workdir>/config.json` and logs the changed fields in one warning line.

    Args:
      workdir: the run's directory.
      config: the config this start will run.
      refuse_model_change: raise when a field under `model` changed (a resume of a checkpoint).

    Returns:
      The changes, as `config_changes` gives them ([] for a first start).

    Raises:
      UserError: `refuse_model_change` and a `model.*` field differs; says how to allow it.
    """
    previous = previous_config(workdir)
    if previous is None:
        return []
    changes = config_changes(previous, resolved_config(config))
    if not changes:
        return []
    listed = ", ".join(f"{path}: {old!r} -> {new!r}" for path, old, new in changes[:_SHOWN_CHANGES])
    more = f" and {len(changes) - _SHOWN_CHANGES} more" if len(changes) > _SHOWN_CHANGES else ""
    model = [path for path, _, _ in changes if path == MODEL_SECTION or path.startswith(MODEL_SECTION + ".")]
    if refuse_model_change and model:
        raise UserError(
            f"the config changes the model of the run in {workdir} ({', '.join(model)}), whose checkpoint holds the "
            "old model; use a fresh --workdir, or set --config.checkpoint.allow_config_change=True to resume anyway "
            "(a change of shapes then fails as a mismatch).")
    logging.warning("The config differs from %s: %s%s.", epath.Path(workdir) / CONFIG_FILE, listed, more)
    return changes


def record_config(workdir: epath.PathLike, config: Any, *, resumed_from: int | None = None) -> None:
    """Writes `<workdir>/config.json` and appends a line to `config_history.jsonl` (process 0 only).

    Args:
      workdir: the run's directory.
      config: the resolved config this start runs.
      resumed_from: the checkpoint step it resumes from; None for a start without one.
    """
    if _process_index() != 0:
        return
    workdir = epath.Path(workdir)
    resolved = resolved_config(config)
    partial = workdir / (CONFIG_FILE + ".partial")
    # Written aside and renamed: a run killed mid-write leaves the previous config.json whole.
    partial.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    partial.replace(workdir / CONFIG_FILE)
    line = json.dumps({"time": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                       "resumed_from_step": resumed_from, "config": resolved}, sort_keys=True) + "\n"
    history = workdir / HISTORY_FILE
    if _is_remote(history):  # object stores cannot append
        history.write_text((history.read_text() if history.exists() else "") + line)
    else:
        with open(history, "a") as file:
            file.write(line)


def read_history(workdir: epath.PathLike) -> list[dict[str, Any]]:
    """The records of `<workdir>/config_history.jsonl`, oldest first ([] when there is none)."""
    path = epath.Path(workdir) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
