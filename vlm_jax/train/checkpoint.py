"""Checkpoints of the train state and the data iterator, and a clean stop on preemption.

One orbax `CheckpointManager` step holds up to three items saved together, so a resumed run
continues exactly where the saved one stood:
  state: any pytree of arrays (params, optimizer state, step, RNG key; nnx `State`s included),
    written with `StandardSave`; restored into an abstract target of `jax.ShapeDtypeStruct`s that
    carry their shardings, so each process reads only its own shards.
  data: the grain iterator's position (`grain.checkpoint.CheckpointSave`), one small JSON file per
    process.
  counters: a small JSON dict of running totals (the trainer's skipped-input counts), written once.
Saves are asynchronous: `save` returns once arrays are copied to host memory, so the next train step
may donate its buffers while files are still being written. Paths may be local or `gs://...`.

Resume (`restore`) takes the newest step that reads back: a step whose files are truncated,
emptied or missing is skipped with a warning naming it and the file orbax reports, and the next older
one is tried; the skipped steps are then set aside (renamed `<step>.set_aside-<time>`) so the run can
save those steps again. A step whose tree or array shapes differ from the target is a mismatch
(`CheckpointMismatchError`, naming the parameters) and is never skipped: older steps of the same run
hold the same tree. Half-written steps of a crashed writer (orbax's `*.orbax-checkpoint-tmp-*`
directories) are ignored and removed.

Preemption: a scheduler announces it with SIGTERM. `PreemptionWatcher.reached_stop_point(step)` turns
that into "save now and exit" at a step boundary. In a multi-process run every process must save the
same step, so there the watcher defers to JAX's preemption sync service (which owns SIGTERM and
agrees on a step across hosts) instead of a per-process flag.

Config section (`config.checkpoint`, see `checkpoint_config()`):
  save_interval_steps: save every N steps (plus forced saves on preemption and at the end).
  max_to_keep: keep the last K checkpoints.
  keep_period: additionally keep every checkpoint whose step divides by this; None keeps none extra.
  async_save: write in a background thread.
  restore_step: None (or 0) resumes from the newest readable step; a step number restores exactly
    that step (a one-line error if it is absent or unreadable) and sets aside the newer ones. Unset
    it after that start: a rerun with it set goes back to that step again.
  allow_config_change: resume even though a `model.*` field differs from the config.json of the
    run (the trainer refuses that by default); a change of shapes still fails as a mismatch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlm_jax.errors import UserError

STATE = "state"
DATA = "data"
COUNTERS = "counters"
_TMP_MARKER = ".orbax-checkpoint-tmp-"
_SHOWN_DIFFERENCES = 6


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's tree or array shapes differ from the train state the config builds."""


class CheckpointReadError(UserError):
    """A checkpoint step could not be read back (a truncated, emptied or missing file)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} could not be read: {reason}")
        self.reason = reason


class Restored(NamedTuple):
    """What `restore` read: the step, the state (in the target's layout) and the counters."""

    step: int
    state: Any
    counters: dict[str, Any]


def checkpoint_config() -> ml_collections.ConfigDict:
    """Returns the default `config.checkpoint` section (fields in the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            save_interval_steps=1000,
            max_to_keep=3,
            keep_period=ml_collections.config_dict.placeholder(int),
            async_save=True,
            restore_step=ml_collections.config_dict.placeholder(int),
            allow_config_change=False,
        )
    )


def _as_path(directory: str | os.PathLike) -> epath.Path:
    directory = str(directory)
    if "://" not in directory:
        directory = os.path.abspath(directory)
    return epath.Path(directory)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a finished checkpoint step, without opening a manager."""
    directory = _as_path(directory)
    return directory.is_dir() and any(path.name.isdigit() for path in directory.iterdir())


def _reason(error: BaseException, where: epath.Path) -> str:
    """The innermost message of an exception chain on one line (orbax wraps the tensorstore error
    that names the file in a generic one), led by `where` when it names no file of the step."""
    messages = []
    while error is not None and len(messages) < 16:
        if not isinstance(error, StopIteration) and str(error).strip():
            messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    text = " ".join((messages[-1] if messages else "unknown error").split()).split(" [tensorstore_spec=")[0]
    text = text if str(where.parent) in text else f"{where}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """{"params/dense/kernel/value": shape} of a target or a checkpoint's tree metadata; a PRNG
    key's shape is that of its key data, as orbax stores it."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        shape = getattr(leaf, "shape", None)
        shapes[name] = None if shape is None else tuple(shape)
    return shapes


def _differences(saved: Any, target: Any) -> list[str]:
    """The parameters whose presence or shape differs between a saved tree and the target."""
    saved, wanted = _leaf_shapes(saved), _leaf_shapes(target)
    # Params first: optimizer moments repeat the params' differences.
    order = sorted(set(saved) | set(wanted), key=lambda name: (not name.startswith("params/"), name))
    differences = []
    for name in order:
        if name not in wanted:
            differences.append(f"{name}: only in the checkpoint")
        elif name not in saved:
            differences.append(f"{name}: only in the config's model")
        elif saved[name] != wanted[name]:
            differences.append(f"{name}: saved {saved[name]}, config {wanted[name]}")
    return differences


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process (all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.asarray(int(ok), np.int32)).min())


class Checkpointer:
    """Saves and restores (train state, data iterator, counters) under one directory.

    Usage in a loop:
        with Checkpointer(workdir / "checkpoints", save_interval_steps=100) as checkpointer:
            restored = checkpointer.restore(abstract_state, data_iterator)
            state = restored.state if restored else initial_state
            for step in range(int(state["step"]), total_steps):
                ...
                checkpointer.save(step + 1, state, data_iterator, force=stopping)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        self.directory = _as_path(directory)
        if jax.process_index() == 0 and self.directory.is_dir():
            partial = sorted(path.name for path in self.directory.iterdir() if _TMP_MARKER in path.name)
            if partial:
                logging.warning("Removing %d half-written checkpoint(s) in %s left by an interrupted save: %s.",
                                len(partial), self.directory, ", ".join(partial))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def from_config(cls, directory: str | os.PathLike, config: Any = None) -> "Checkpointer":
        """Builds from a `config.checkpoint` section (`checkpoint_config()` fields)."""
        config = checkpoint_config().to_dict() | dict(config or {})
        return cls(directory, save_interval_steps=config["save_interval_steps"], max_to_keep=config["max_to_keep"],
                   keep_period=config["keep_period"], async_save=config["async_save"])

    def latest_step(self) -> int | None:
        """Most recent finished checkpoint step, or None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every checkpoint kept, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True when `step` falls on the save interval (or a preemption sync point was reached)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, *, counters: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves `state` (and the iterator position and counters) as `step` if due, or always with `force`.

        Due means: on the save interval, at a preemption sync point, or the first save of this
        directory (so a broken writer shows up after one step, not after one interval).

        Args:
          step: the number of optimizer steps `state` has taken.
          state: pytree of jax arrays.
          data_iterator: a grain iterator (`DatasetIterator` or `DataLoaderIterator`), or None.
          counters: JSON-able running totals that belong to this step (the same on every process).
          force: save even off the interval (preemption, end of training).

        Returns:
          True when a save was started.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if counters is not None:
            items[COUNTERS] = ocp.args.JsonSave(dict(counters))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Saving checkpoint step %d to %s.", step, self.directory)
        return saved

    def _read(self, step: int, target: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """(state, counters) of `step`; CheckpointMismatchError or CheckpointReadError."""
        step_dir = self.directory / str(step)
        # The tree metadata first: it tells a mismatch (another model) from a file that does not read.
        try:
            saved = ocp.PyTreeCheckpointHandler().metadata(step_dir / STATE).tree
        except Exception as error:  # noqa: BLE001 - any failure to read the metadata is a read failure
            raise CheckpointReadError(step, _reason(error, step_dir / STATE / "_METADATA")) from error
        differences = _differences(saved, target)
        if differences:
            more = len(differences) - _SHOWN_DIFFERENCES
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not match the train state the config builds "
                f"({len(differences)} difference(s): {'; '.join(differences[:_SHOWN_DIFFERENCES])}"
                f"{f'; and {more} more' if more > 0 else ''}); resume with the model and optimizer config that "
                "wrote it (the run's config.json), or use a fresh workdir.")
        items = {STATE: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        if (step_dir / COUNTERS).exists():
            items[COUNTERS] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - the tree matched, so what fails is reading the files
            raise CheckpointReadError(step, _reason(error, step_dir / STATE)) from error
        counters = restored[COUNTERS] if COUNTERS in items else {}
        return restored[STATE], dict(counters or {})

    def restore(self, target: Any, data_iterator: Any = None, *, step: int | None = None) -> Restored | None:
        """Restores the newest step that reads back (module docstring), or exactly `step`.

        Args:
          target: pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`s with
            shardings (or concrete arrays, whose shardings are reused).
          data_iterator: a fresh grain iterator over the same pipeline; it is moved, in place, to
            the saved position.
          step: None (or 0) for the newest readable step; else exactly this step.

        Returns:
          The step, the state (each array placed with its target's sharding) and the counters;
          None when the directory holds no checkpoint (and no `step` was asked for).

        Raises:
          UserError: `step` is absent or unreadable, or no step reads back (one line each).
          CheckpointMismatchError: the saved tree or shapes differ from `target` (names them).
        """
        steps = self.all_steps()
        if step:
            if step not in steps:
                raise UserError(f"checkpoint.restore_step={step} is not in {self.directory}, which holds steps "
                                f"{steps or 'none'}; pick one of them or unset checkpoint.restore_step.")
            candidates = [step]
        elif not steps:
            return None
        else:
            candidates = steps[::-1]
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for candidate in candidates:
            failure = None
            try:
                state, counters = self._read(candidate, target, data_iterator)
            except CheckpointReadError as error:
                failure = error
            # Every process must resume from the same step; a file only one of them reads decides for all.
            if _everywhere(failure is None):
                break
            reason = failure.reason if failure is not None else "unreadable on another process"
            if step:
                raise UserError(f"checkpoint.restore_step={step} in {self.directory} could not be read: {reason}")
            logging.warning("Checkpoint step %d in %s could not be read, trying the previous step: %s",
                            candidate, self.directory, reason)
        else:
            raise UserError(f"no checkpoint in {self.directory} could be read (steps {steps}, reasons logged above); "
                            "move the directory away to start over, or restore a copy of it.")
        self._set_aside([later for later in steps if later > candidate], restored=candidate)
        logging.info("Restored checkpoint step %d from %s.", candidate, self.directory)
        return Restored(candidate, state, counters)

    def _set_aside(self, steps: list[int], *, restored: int) -> None:
        """Renames `steps` to `<step>.set_aside-<time>` so that training can save them again."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                aside = self.directory / f"{step}.set_aside-{stamp}"
                (self.directory / str(step)).rename(aside)
                logging.warning("Resuming from step %d: set aside the later checkpoint step %d as %s.",
                                restored, step, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vlm_jax.checkpoint.set_aside")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PreemptionWatcher:
    """Turns a preemption notice into "save at the next step boundary, then stop".

    Single process: installs a handler for `signals` (SIGTERM by default) that only sets a flag, so
    the step in flight finishes and the loop saves a consistent state. Multi-process: every process
    must stop at the same step, so it asks JAX's preemption sync service
    (`multihost_utils.reached_preemption_sync_point`), which receives SIGTERM itself and agrees on a
    step across hosts; it must then be asked at every step.

    Use as a context manager around the loop; the previous signal handlers come back on exit.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}
        self._use_sync_service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)

    @property
    def requested(self) -> bool:
        """True once this process received one of the signals."""
        return self._requested.is_set()

    def request(self) -> None:
        """Marks a stop as requested (what the signal handler does)."""
        self._requested.set()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("Received signal %d: saving at the next step boundary, then stopping.", signum)
        self._requested.set()

    def install(self) -> "PreemptionWatcher":
        """Installs the signal handlers (single-process runs; must run on the main thread)."""
        if not self._use_sync_service:
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def reached_stop_point(self, step: int) -> bool:
        """Whether the loop should save `step` now and exit; call once per step on every process."""
        if self._use_sync_service:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                # The distributed runtime started without its preemption service: nothing will
                # announce a preemption, and stopping on one host alone would hang the others.
                return False
        return self.requested

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()
