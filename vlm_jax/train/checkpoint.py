"""Checkpoints of the train state and the data iterator, and a clean stop on preemption.

One orbax `CheckpointManager` step holds two items saved together, so a resumed run continues
exactly where the saved one stood:
  state: any pytree of arrays (params, optimizer state, step, RNG key; nnx `State`s included),
    written with `StandardSave`; restored into an abstract target of `jax.ShapeDtypeStruct`s that
    carry their shardings, so each process reads only its own shards.
  data: the grain iterator's position (`grain.checkpoint.CheckpointSave`), one small JSON file per
    process.
Saves are asynchronous: `save` returns once arrays are copied to host memory, so the next train step
may donate its buffers while files are still being written. Paths may be local or `gs://...`.

Preemption: a scheduler announces it with SIGTERM. `PreemptionWatcher.reached_stop_point(step)` turns
that into "save now and exit" at a step boundary. In a multi-process run every process must save the
same step, so there the watcher defers to JAX's preemption sync service (which owns SIGTERM and
agrees on a step across hosts) instead of a per-process flag.

Config section (`config.checkpoint`, see `checkpoint_config()`):
  save_interval_steps: save every N steps (plus forced saves on preemption and at the end).
  max_to_keep: keep the last K checkpoints.
  keep_period: additionally keep every checkpoint whose step divides by this; None keeps none extra.
  async_save: write in a background thread.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE = "state"
DATA = "data"


def checkpoint_config() -> ml_collections.ConfigDict:
    """Returns the default `config.checkpoint` section (fields in the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            save_interval_steps=1000,
            max_to_keep=3,
            keep_period=ml_collections.config_dict.placeholder(int),
            async_save=True,
        )
    )


def _as_path(directory: str | os.PathLike) -> epath.Path:
    directory = str(directory)
    if "://" not in directory:
        directory = os.path.abspath(directory)
    return epath.Path(directory)


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under one directory.

    Usage in a loop:
        with Checkpointer(workdir / "checkpoints", save_interval_steps=100) as checkpointer:
            if checkpointer.latest_step() is not None:
                state = checkpointer.restore(abstract_state, data_iterator)
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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def from_config(cls, directory: str | os.PathLike, config: Any = None) -> "Checkpointer":
        """Builds from a `config.checkpoint` section (`checkpoint_config()` fields)."""
        config = checkpoint_config().to_dict() | dict(config or {})
        return cls(directory, **config)

    def latest_step(self) -> int | None:
        """Most recent finished checkpoint step, or None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every checkpoint kept, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True when `step` falls on the save interval (or a preemption sync point was reached)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Saves `state` (and the iterator position) as `step` if due, or always with `force`.

        Due means: on the save interval, at a preemption sync point, or the first save of this
        directory (so a broken writer shows up after one step, not after one interval).

        Args:
          step: the number of optimizer steps `state` has taken.
          state: pytree of jax arrays.
          data_iterator: a grain iterator (`DatasetIterator` or `DataLoaderIterator`), or None.
          force: save even off the interval (preemption, end of training).

        Returns:
          True when a save was started.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Saving checkpoint step %d to %s.", step, self.directory)
        return saved

    def restore(self, target: Any, data_iterator: Any = None, *, step: int | None = None) -> Any:
        """Restores the state at `step` (default: latest) into the layout of `target`.

        Args:
          target: pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`s with
            shardings (or concrete arrays, whose shardings are reused).
          data_iterator: a fresh grain iterator over the same pipeline; it is moved, in place, to
            the saved position.
          step: which checkpoint; None for the latest.

        Returns:
          The restored state, each array placed with its target's sharding.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory} to restore; train from scratch instead.")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        items = {STATE: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise ValueError(
                f"Checkpoint step {step} in {self.directory} does not match the requested train state "
                f"(and data iterator: {data_iterator is not None}): {error}. Restore with the model and "
                "optimizer config that wrote it, or use a fresh workdir."
            ) from error
        logging.info("Restored checkpoint step %d from %s.", step, self.directory)
        return restored[STATE]

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
