"""The training loop shared by every method: one `train(config, workdir, method)`.

A method (`vlm_jax/methods/<name>.py`) supplies the model, the loss, the data and the evaluators
through the `Method` protocol below; everything else happens here, the same way for all of them:

1. Start the distributed runtime (`config.distributed`) and build the mesh (`config.sharding`).
2. Create the model already sharded: traced abstractly, then initialized by one jitted call whose
   outputs land in the layout the logical-axis rules give (`sharding.create_sharded_model`).
3. Split its state into the trainable params (`config.optim.trainable` policy) and everything else
   (frozen params, other variables). Only the trainable params are differentiated and only they
   have optimizer state: a frozen CLIP under RECO's fusion gets no backward pass and no Adam moments.
4. Resume from `<workdir>/checkpoints` when it holds a checkpoint (params, optimizer state, step,
   RNG key, the data iterator's position and the skipped-input totals); otherwise start at step 0.
   Nothing to pass. The newest step that reads back is taken (`Checkpointer.restore`), or
   exactly `checkpoint.restore_step`. Before any of this, the workdir and the checkpoint directory
   must take a test write, and a config whose `model.*` fields differ from `<workdir>/config.json`
   is refused on resume unless `checkpoint.allow_config_change`; the config is recorded
   (`workdir.record_config`) only once the checkpoint has restored into the model it builds.
5. Loop: one jitted, pure train step of (train state, frozen state, batch, constants) with explicit
   in/out shardings and the train state donated; microbatch gradient accumulation inside it
   (`optim.accumulate_gradients`). Host code runs one step behind the device: step s's metrics are
   fetched after step s+1 is dispatched, except where the loop must look (logging, evaluation,
   checkpoints), so the device does not wait for the host.
6. Log loss, learning rate, gradient norm, the method's metrics (in-batch accuracy, logit scale),
   steps/s, examples/s and skipped bad inputs to `<workdir>/metrics.jsonl` and TensorBoard
   (`<workdir>/tb`), with a progress bar, on process 0 only; run `method.evaluators(config)` every
   `eval_every` steps and at the end; save every `checkpoint.save_interval_steps` (async, keep K).
7. A non-finite loss or gradient norm stops the run with `NonFiniteLossError` (a `UserError`) naming
   the step and the last good checkpoint; the bad state is never saved. SIGTERM saves the
   current step and returns (rerun the same command to continue).
8. At the end: final checkpoint, final evaluation, `<workdir>/results.json`, `method.export`.

Precision: params are stored in the model's `param_dtype` (float32 master weights) and the model
computes in its `dtype` (e.g. bfloat16); gradients and optimizer moments are float32.

Config fields read here (defaults in `trainer_config()`; each method adds its own):
  method: registry name of the method (`vlm_jax.methods.METHODS`), read by its `train_task`.
  seed: model init (nnx.Rngs(seed)), the train-step RNG key and the data order.
  total_steps: optimizer steps of the whole run (the schedule's total_steps follows it).
  global_batch_size: examples per optimizer step over all processes.
  log_every: steps between metric records (and the steps/s measurement window).
  eval_every: steps between evaluations (0: only at the end).
  progress: show the progress bar (process 0).
  optim, checkpoint, sharding, distributed: see optim.py, checkpoint.py, sharding.py
    (checkpoint.restore_step and checkpoint.allow_config_change steer the resume, step 4).
  evals: evaluator specs (evaluate/suite.py) that methods turn into evaluators.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax.config_lib import ConfigError
from vlm_jax.data.pipeline import BadInputCounter
from vlm_jax.errors import UserError
from vlm_jax.evaluate import suite
from vlm_jax.evaluate.tasks import write_results
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import optim, sharding
from vlm_jax.train import workdir as workdir_lib
from vlm_jax.train.metrics import MetricsWriter, Progress

class Method(Protocol):
    """What a method provides to the trainer (the registry in `vlm_jax.methods` picks one by name)."""

    def create_model(self, config, rngs: nnx.Rngs) -> nnx.Module:
        """The whole model tree, frozen parts included; freezing is config.optim.trainable's job."""

    def reads_weights(self, config) -> bool:
        """Optional: True when create_model loads weights from disk, so the trainer builds the model on
        the host and places it shard by shard (`sharding.create_sharded_model(host_init=True)`)
        instead of in a jitted init that would embed the weights as constants. Absent: False."""

    def constants(self, config, mesh) -> Any:
        """Pytree of arrays passed unchanged to every train step (not trained, not saved), or None."""

    def loss_fn(self, model: nnx.Module, batch: dict, constants: Any, rng: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, {name: scalar metric}); pure, traced under jit, batch arrays global."""

    def train_iterator(self, config, process_index: int, process_count: int) -> grain.DatasetIterator:
        """Restorable iterator of this process's numpy batches (global_batch_size / process_count)."""

    def evaluators(self, config) -> dict[str, Any]:
        """{name: evaluator with run(model) -> dict[str, float]}."""

    def export(self, model: nnx.Module, workdir: epath.Path) -> None:
        """Final export of the trained model (called on process 0 with a host-local model)."""


class NonFiniteLossError(UserError):
    """The loss or gradient norm became NaN/inf; the run stops without saving the bad state."""


def trainer_config() -> ml_collections.ConfigDict:
    """The config fields every training experiment shares, with defaults (module docstring)."""
    config = ml_collections.ConfigDict()
    config.task = "train"
    config.method = ""
    config.seed = 0
    config.total_steps = 1000
    config.global_batch_size = 256
    config.log_every = 50
    config.eval_every = 0
    config.progress = True
    config.optim = optim.optim_config()
    config.optim.total_steps = config.get_ref("total_steps")
    config.checkpoint = checkpoint_lib.checkpoint_config()
    config.sharding = sharding.sharding_config()
    config.distributed = sharding.distributed_config()
    config.evals = ml_collections.ConfigDict()
    return config


def _field(config, name: str) -> Any:
    return config[name] if name in config else trainer_config()[name]


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


def split_trainable(model: nnx.Module, trainable_policy) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else) by the `optim.trainable` (regex, bool) policy.

    Every Param path must match a rule of the policy (a final (".*", default) catches all).
    """

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(str(key) for key in path)
        return bool(optim.resolve_policy(trainable_policy, name, policy_name="optim.trainable"))

    graphdef, params, rest = nnx.split(model, is_trainable, ...)
    if not jax.tree.leaves(params):
        raise ConfigError("config.optim.trainable freezes every parameter; nothing would train.")
    return graphdef, params, rest


def _optimizer_shardings(tx, params, mesh) -> Any:
    """Optimizer-state shardings: a leaf shaped like its param follows the param, others replicate.

    Adam moments mirror the params; factored second moments (Adafactor rows/columns) and counters do
    not, so they are replicated (they are vectors, small next to the matrices they summarize).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    return optax.tree_map_params(
        tx,
        lambda leaf, param_sharding, param: param_sharding if leaf.shape == param.shape else replicated,
        abstract,
        param_shardings,
        params,
        transform_non_params=lambda _: replicated,
    )


def _host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The numeric fields of a pipeline batch (ids and texts stay on the host), in JAX dtypes."""
    arrays = {}
    for key, value in batch.items():
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf":
            arrays[key] = np.asarray(value, dtype=jax.dtypes.canonicalize_dtype(value.dtype))
    return arrays


def _local_model(graphdef: nnx.GraphDef, *states: nnx.State) -> nnx.Module:
    """The model with arrays this process can read whole (gathered from other hosts if needed)."""
    leaves = jax.tree.leaves(states)
    if all(leaf.is_fully_addressable for leaf in leaves if isinstance(leaf, jax.Array)):
        return nnx.merge(graphdef, *states)
    gathered = jax.tree.map(
        lambda leaf: jnp.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        if isinstance(leaf, jax.Array) else leaf,
        states,
    )
    return nnx.merge(graphdef, *gathered)


def _count(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------------
# Train step
# --------------------------------------------------------------------------------------------------


def make_train_step(method: Method, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accumulation_steps: int):
    """The pure train step (not jitted).

    (state, frozen, batch, constants) -> (new state, metrics), where state = {"params": trainable
    nnx.State, "opt_state", "step": int32 [], "rng": PRNG key}, frozen is the rest of the model's
    state, batch a dict of global [B, ...] arrays, metrics a dict of float32 scalars: "loss",
    "grad_norm", "lr" and the method's own.
    """

    def train_step(state, frozen, batch, constants):
        rng, step_rng = jax.random.split(state["rng"])
        rows = jax.tree.leaves(batch)[0].shape[0]
        # Row i belongs to microbatch i % k (optim.split_microbatches), which gets its own RNG key.
        microbatch_ids = jnp.arange(rows, dtype=jnp.int32) % accumulation_steps

        def loss_and_metrics(params, inputs):
            microbatch, ids = inputs
            model = nnx.merge(graphdef, params, frozen)
            return method.loss_fn(model, microbatch, constants, jax.random.fold_in(step_rng, ids[0]))

        (loss, metrics), grads = optim.accumulate_gradients(
            jax.value_and_grad(loss_and_metrics, has_aux=True), state["params"], (batch, microbatch_ids),
            accumulation_steps)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            **{name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()},
            "loss": loss.astype(jnp.float32),
            "grad_norm": optax.global_norm(grads).astype(jnp.float32),
            "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _Monitor:
    """Host side of the loop: fetches step metrics, checks them, averages them between records."""

    def __init__(self, checkpoint_dir: epath.Path, latest_step):
        self.window: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self._checkpoint_dir = checkpoint_dir
        self._latest_step = latest_step

    def check(self, step: int, device_metrics: Mapping[str, jax.Array]) -> None:
        metrics = {name: float(value) for name, value in jax.device_get(dict(device_metrics)).items()}
        bad = [name for name in ("loss", "grad_norm") if not math.isfinite(metrics[name])]
        if bad:
            latest = self._latest_step()
            resume = (f"the last good checkpoint is step {latest} in {self._checkpoint_dir}: lower "
                      "optim.learning_rate (or raise optim.warmup_steps) and rerun to resume from it, or pass "
                      f"--config.checkpoint.restore_step={latest} to resume from exactly that step"
                      if latest is not None else "no checkpoint was saved before it: lower optim.learning_rate "
                      "(or raise optim.warmup_steps) and rerun from scratch")
            raise NonFiniteLossError(
                f"Training stopped at step {step}: {' and '.join(f'{n} = {metrics[n]}' for n in bad)}; "
                f"the state of this step was not saved; {resume}; or inspect the data of this step.")
        self.window.append(metrics)

    def summary(self) -> dict[str, float]:
        """Means over the steps since the last summary."""
        if self.window:
            self.last = {f"train/{name}": float(np.mean([m[name] for m in self.window])) for name in self.window[0]}
        self.window = []
        return dict(self.last)


def _bad_input_totals(counter: BadInputCounter) -> dict[str, int]:
    """Skipped inputs by kind since step 0, summed over processes (collective when several)."""
    totals = dict(counter.totals)
    if jax.process_count() > 1:
        kinds = sorted(totals)
        summed = multihost_utils.process_allgather(np.asarray([totals[k] for k in kinds], np.int64)).sum(axis=0)
        totals = dict(zip(kinds, summed.tolist()))
    return {kind: int(count) for kind, count in totals.items()}


def _restore_bad_input_totals(counter: BadInputCounter, counters: Mapping[str, Any]) -> None:
    # The checkpoint holds the sum over processes: process 0 carries it on, the others restart at
    # zero, so the next sum continues the saved one.
    if jax.process_index() == 0:
        counter.totals.update({kind: int(count) for kind, count in counters.get("bad_input", {}).items()})


@dataclasses.dataclass
class Training:
    """Everything the loop steps: the mesh, the model split into trainable state and the rest, and the
    jitted train step `train_step(state, frozen, batch, constants) -> (state, metrics)`.

    state: {"params", "opt_state", "step", "rng"} (donated to each step); frozen: the model's other
    state; constants: `method.constants(config, mesh)`; batch_axes: mesh axes of the batch dimension.
    """

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: dict[str, Any]
    frozen: nnx.State
    constants: Any
    train_step: Any
    batch_axes: tuple[str, ...]


def build_training(config, method: Method) -> Training:
    """Starts the distributed runtime, builds the mesh, the sharded model and optimizer state, and jits
    the train step, as `train` does before its first step (also used by benchmarks/train_step.py)."""
    sharding.initialize_distributed(_field(config, "distributed"))
    mesh = sharding.mesh_from_config(_field(config, "sharding"))
    sharding_section = sharding.sharding_config().to_dict() | dict(_field(config, "sharding"))
    rules, batch_axes = sharding_section["rules"], tuple(sharding_section["batch_axes"])
    seed = int(config.seed)
    optim_section = optim.optim_config().to_dict() | dict(config.optim)
    if hasattr(method, "trainable_policy"):  # a method may add rules of its own fields (ClipMethod's text tower)
        optim_section["trainable"] = method.trainable_policy(config)
    accumulation_steps = int(optim_section["accumulation_steps"])
    replicated = NamedSharding(mesh, PartitionSpec())

    reads_weights = getattr(method, "reads_weights", None)
    model = sharding.create_sharded_model(
        lambda: method.create_model(config, nnx.Rngs(seed)), mesh, rules,
        allow_unannotated=sharding_section["allow_unannotated"],
        host_init=bool(reads_weights and reads_weights(config)))
    graphdef, params, frozen = split_trainable(model, optim_section["trainable"])
    del model
    tx, _ = optim.make_optimizer(optim_section, params)
    schedule = optim.make_schedule(optim_section)
    logging.info("Mesh %s; %d trainable and %d frozen parameters; %d process(es).", dict(mesh.shape),
                 _count(params), _count(nnx.state(frozen, nnx.Param)), jax.process_count())

    opt_shardings = _optimizer_shardings(tx, params, mesh)
    state = {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
        **jax.jit(lambda: {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key(seed)},
                  out_shardings=replicated)(),
    }
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    frozen_shardings = jax.tree.map(lambda leaf: leaf.sharding, frozen)
    constants = method.constants(config, mesh)
    constant_shardings = jax.tree.map(lambda leaf: leaf.sharding, constants)
    batch_sharding = sharding.batch_sharding(mesh, 1, batch_axes)
    train_step = jax.jit(
        make_train_step(method, graphdef, tx, schedule, accumulation_steps),
        in_shardings=(state_shardings, frozen_shardings, batch_sharding, constant_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return Training(mesh, graphdef, state, frozen, constants, train_step, batch_axes)


def train(config, workdir: epath.PathLike, method: Method) -> dict[str, float]:
    """Trains `method` as `config` says, resuming from `workdir` if it holds a checkpoint.

    Returns:
      The final metrics (last logged train metrics and final evaluation), also written to
      `<workdir>/results.json`. A run stopped by SIGTERM returns {"preempted_at_step": step}
      and writes no results.

    Raises:
      NonFiniteLossError: the loss or gradient norm became NaN/inf (the message names the step).
      UserError: an unwritable workdir, a refused config change, an absent or unreadable
        restore_step, no readable checkpoint, or a checkpoint that does not match the model.
    """
    workdir = epath.Path(workdir)
    checkpoint_dir = workdir / "checkpoints"
    checkpoint_section = checkpoint_lib.checkpoint_config().to_dict() | dict(_field(config, "checkpoint"))
    # Before any work: an unwritable checkpoint directory would otherwise show only at the first
    # save, as a hang in orbax's barrier.
    workdir_lib.check_writable(workdir, "the workdir")
    workdir_lib.check_writable(checkpoint_dir, "the checkpoint directory")
    workdir_lib.check_config_change(
        workdir, config, refuse_model_change=checkpoint_lib.has_checkpoint(checkpoint_dir)
        and not checkpoint_section["allow_config_change"])
    setup = build_training(config, method)
    mesh, graphdef, frozen, constants = setup.mesh, setup.graphdef, setup.frozen, setup.constants
    state, train_step, batch_axes = setup.state, setup.train_step, setup.batch_axes
    chief = jax.process_index() == 0
    total_steps = int(config.total_steps)

    data_iterator = method.train_iterator(config, jax.process_index(), jax.process_count())
    checkpointer = checkpoint_lib.Checkpointer.from_config(checkpoint_dir, checkpoint_section)
    counter = BadInputCounter()
    try:
        restored = checkpointer.restore(state, data_iterator, step=checkpoint_section["restore_step"] or None)
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        state = restored.state
        _restore_bad_input_totals(counter, restored.counters)
        logging.info("Resuming from step %d.", restored.step)
    start_step = int(state["step"])
    workdir_lib.record_config(workdir, config, resumed_from=restored.step if restored is not None else None)

    evaluators = method.evaluators(config)
    log_every, eval_every = max(1, int(_field(config, "log_every"))), int(_field(config, "eval_every"))
    examples_per_step = int(config.global_batch_size)
    monitor = _Monitor(checkpointer.directory, checkpointer.latest_step)
    writer = MetricsWriter(workdir, enabled=chief, resume_step=start_step)
    progress = Progress(total_steps, start_step, enabled=chief and bool(_field(config, "progress")))

    def evaluate(step: int) -> dict[str, float]:
        if not evaluators:
            return {}
        started = time.perf_counter()
        metrics = suite.run_evaluators(evaluators, _local_model(graphdef, state["params"], frozen))
        logging.info("Step %d evaluation (%.1f s): %s", step, time.perf_counter() - started,
                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        writer.write(step, metrics)
        return metrics

    step, preempted = start_step, False
    pending, record = None, {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        with checkpoint_lib.PreemptionWatcher() as watcher:
            while step < total_steps:
                try:
                    host_batch = next(data_iterator)
                except StopIteration:
                    raise RuntimeError(
                        f"The training data ran out at step {step} of {total_steps}; set data.num_epochs "
                        "to None (repeat) or lower total_steps.") from None
                counter.update(host_batch)
                batch = sharding.shard_batch(_host_batch(host_batch), mesh, batch_axes)
                state, device_metrics = train_step(state, frozen, batch, constants)
                step += 1
                window_steps += 1
                if pending is not None:
                    monitor.check(*pending)
                pending = (step, device_metrics)
                stop = watcher.reached_stop_point(step)
                log_now = step % log_every == 0 or step == total_steps
                eval_now = eval_every > 0 and step % eval_every == 0 and step < total_steps
                save_now = checkpointer.should_save(step) or stop or step == total_steps
                if log_now or eval_now or save_now:
                    monitor.check(*pending)
                    pending = None
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = monitor.summary()
                    record["train/steps_per_sec"] = window_steps / elapsed
                    record["train/examples_per_sec"] = window_steps * examples_per_step / elapsed
                    record.update({f"data/skipped_{kind}": float(n) for kind, n in _bad_input_totals(counter).items()})
                    writer.write(step, record)
                    progress.update(window_steps, loss=record["train/loss"])
                    window_start, window_steps = time.perf_counter(), 0
                if save_now:
                    checkpointer.save(step, state, data_iterator, counters={"bad_input": _bad_input_totals(counter)},
                                      force=stop or step == total_steps)
                if eval_now:
                    evaluate(step)
                    window_start = time.perf_counter()
                if stop:
                    preempted = True
                    logging.warning("Stopped on a preemption notice after saving step %d; rerun to resume.", step)
                    break
        checkpointer.wait_until_finished()
        if preempted:
            return {"preempted_at_step": float(step)}
        metrics = {**record, **evaluate(step), "train/step": float(step)}
        if chief:
            write_results(workdir, metrics)
            method.export(_local_model(graphdef, state["params"], frozen), workdir)
        else:
            _local_model(graphdef, state["params"], frozen)  # the gather is collective: every process joins
        return metrics
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
