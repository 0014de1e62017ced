"""Optimizer from config: AdamW or Adafactor, schedules, and regex policies over parameter paths.

Parameter paths are "/"-joined pytree keys ("vision/layers/0/mlp/fc1/kernel"; the `.value` step of
nnx Variables is dropped), so the same policies read on `nnx.state(model, nnx.Param)`, on
`nnx.Optimizer`, and on plain nested dicts. Each policy is an ordered list of (regex, value) pairs,
big_vision style: the first regex that `re.search`es the path decides, and a parameter that no regex
matches is an error, so a renamed layer cannot silently lose its decay or its freeze.

Update of a trainable parameter p with gradient g (the PyTorch/open_clip AdamW convention, used for
Adafactor too, so weight decay is scaled by the schedule but not by the lr multiplier):
    u = clip_by_global_norm(g)          (norm over trainable params only)
    u = adam(u) | factored_rms(u)
    u = u + weight_decay * p            (where the decay policy says True)
    p = p - schedule(step) * lr_mult(path) * u   (lr_mult multiplies the whole step)
Frozen parameters get `optax.set_to_zero()` through `optax.multi_transform`: their update is exactly
zero and the inner optimizer only sees a masked tree, so they carry no optimizer state at all (a
frozen CLIP under RECO's fusion costs no Adam moments).

Parameters stay float32 master weights (the model's param_dtype); models cast to their compute dtype
(bfloat16) inside, so gradients arrive in float32 and moments are kept in float32 unless `mu_dtype`
says otherwise.

Gradient accumulation is an explicit microbatch `jax.lax.scan` inside the train step
(`accumulate_gradients`), not `optax.MultiSteps`: one optimizer step per train step keeps step
counting, schedules, checkpoints and data-iterator state in lockstep, and the summed gradients never
leave the jitted step. For losses that are a mean over examples this equals the large-batch gradient.
Contrastive losses are not: each microbatch only sees its own negatives.

Config section (`config.optim`, see `optim_config()` for defaults):
  name: "adamw" | "adafactor".
  learning_rate: peak learning rate.
  schedule: "cosine" | "rsqrt" | "constant", each after `warmup_steps` of linear warmup from 0.
  warmup_steps, total_steps: total_steps is where cosine reaches `end_lr_fraction * learning_rate`.
  end_lr_fraction: final lr of cosine, as a fraction of the peak.
  rsqrt_timescale: rsqrt schedule is lr / sqrt(1 + (step - warmup_steps) / timescale).
  b1, b2, eps, mu_dtype: AdamW moments (mu_dtype e.g. "bfloat16" halves first-moment memory).
  adafactor: ConfigDict(decay_rate, min_dim_size_to_factor, clipping_threshold, momentum, eps).
  weight_decay: decoupled decay coefficient.
  decay: policy of (regex, bool): which params decay. Default: only "kernel" matrices (no norms,
    biases, embeddings, logit scale or bias).
  lr_mults: policy of (regex, float) learning-rate multipliers.
  trainable: policy of (regex, bool): False freezes the matched params.
  grad_clip_norm: clip trainable gradients to this global norm; None disables.
  accumulation_steps: microbatches per train step (see `accumulate_gradients`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vlm_jax.train.sharding import path_to_name

TRAINABLE = "trainable"
FROZEN = "frozen"

DEFAULT_DECAY_POLICY = ((r"(^|/)kernel$", True), (r".*", False))


def optim_config() -> ml_collections.ConfigDict:
    """Returns the default `config.optim` section (fields documented in the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            schedule="cosine",
            warmup_steps=0,
            total_steps=1000,
            end_lr_fraction=0.0,
            rsqrt_timescale=10_000,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            mu_dtype=ml_collections.config_dict.placeholder(str),
            adafactor=dict(
                decay_rate=0.8,
                min_dim_size_to_factor=128,
                clipping_threshold=1.0,
                momentum=ml_collections.config_dict.placeholder(float),
                eps=1e-30,
            ),
            weight_decay=0.1,
            decay=DEFAULT_DECAY_POLICY,
            lr_mults=((r".*", 1.0),),
            trainable=((r".*", True),),
            grad_clip_norm=1.0,
            accumulation_steps=1,
        )
    )


# --------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------


def resolve_policy(policy: Sequence[Sequence[Any]], name: str, *, policy_name: str = "policy") -> Any:
    """Value of the first (regex, value) pair whose regex `re.search`es `name`.

    Raises:
      ValueError: when no regex matches, naming the path and the policy.
    """
    for pattern, value in policy:
        if re.search(pattern, name):
            return value
    raise ValueError(
        f"Parameter {name!r} matches no rule of {policy_name} {[p for p, _ in policy]}; add a rule for it "
        "(a final (r'.*', default) catches everything)."
    )


def _param_names(params: Any) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return [path_to_name(path) for path, _ in leaves]


def param_policy_table(config: Mapping[str, Any], params: Any) -> dict[str, dict[str, Any]]:
    """Resolves every policy for every parameter: {path: {"label", "decay", "lr_mult"}}.

    Doubles as the check that every parameter matched a rule of every policy, and as the table to
    log at the start of training.
    """
    table = {}
    for name in _param_names(params):
        trainable = resolve_policy(config["trainable"], name, policy_name="optim.trainable")
        table[name] = {
            "label": TRAINABLE if trainable else FROZEN,
            "decay": bool(resolve_policy(config["decay"], name, policy_name="optim.decay")),
            "lr_mult": float(resolve_policy(config["lr_mults"], name, policy_name="optim.lr_mults")),
        }
    return table


def _map_names(fn: Callable[[str], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_to_name(path)), tree)


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each update by `multiplier(path)`; paths of masked-out leaves are never visited."""

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, update: update * jnp.asarray(multiplier(path_to_name(path)), update.dtype), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def make_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Learning-rate schedule: linear warmup from 0 to `learning_rate`, then cosine/rsqrt/constant.

    Returns:
      step (int32 scalar) -> float32 learning rate.
    """
    peak, warmup = float(config["learning_rate"]), int(config["warmup_steps"])
    kind = config["schedule"]
    if kind == "cosine":
        total = int(config["total_steps"])
        if total <= warmup:
            raise ValueError(f"optim.total_steps ({total}) must exceed optim.warmup_steps ({warmup}) for cosine.")
        after = optax.cosine_decay_schedule(peak, total - warmup, alpha=float(config["end_lr_fraction"]))
    elif kind == "rsqrt":
        timescale = float(config["rsqrt_timescale"])
        after = lambda step: peak * jax.lax.rsqrt(1.0 + step / timescale)  # noqa: E731
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule must be 'cosine', 'rsqrt' or 'constant', got {kind!r}.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def make_optimizer(
    config: Mapping[str, Any], params: Any
) -> tuple[optax.GradientTransformation, dict[str, dict[str, Any]]]:
    """Builds the optax transform for `params` from a `config.optim` section.

    Args:
      config: fields of `optim_config()`; missing fields take their defaults.
      params: the parameter tree the optimizer will see (concrete or abstract), e.g.
        `nnx.state(model, nnx.Param)`; used to check every policy covers every parameter.

    Returns:
      (tx, table): the transform, and {path: {"label": "trainable"|"frozen", "decay": bool,
      "lr_mult": float}} for every parameter.
    """
    defaults = optim_config()
    config = defaults.to_dict() | dict(config)
    config["adafactor"] = defaults.adafactor.to_dict() | dict(config["adafactor"])
    table = param_policy_table(config, params)
    decays = lambda name: table[name]["decay"]  # noqa: E731
    lr_mult = lambda name: table[name]["lr_mult"]  # noqa: E731

    steps = []
    if config["grad_clip_norm"] is not None:
        steps.append(optax.clip_by_global_norm(float(config["grad_clip_norm"])))
    if config["name"] == "adamw":
        steps.append(
            optax.scale_by_adam(
                b1=config["b1"], b2=config["b2"], eps=config["eps"], mu_dtype=config["mu_dtype"] and jnp.dtype(config["mu_dtype"])
            )
        )
    elif config["name"] == "adafactor":
        adafactor = config["adafactor"]
        steps.append(
            optax.scale_by_factored_rms(
                decay_rate=adafactor["decay_rate"],
                min_dim_size_to_factor=adafactor["min_dim_size_to_factor"],
                epsilon=adafactor["eps"],
            )
        )
        if adafactor["clipping_threshold"] is not None:
            steps.append(optax.clip_by_block_rms(adafactor["clipping_threshold"]))
        if adafactor["momentum"] is not None:
            steps.append(optax.ema(adafactor["momentum"], debias=False))
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'adafactor', got {config['name']!r}.")
    if config["weight_decay"]:
        steps.append(optax.add_decayed_weights(float(config["weight_decay"]), mask=lambda p: _map_names(decays, p)))
    steps.append(optax.scale_by_learning_rate(make_schedule(config)))
    if any(entry["lr_mult"] != 1.0 for entry in table.values()):
        steps.append(scale_by_path(lr_mult))
    trainable_tx = optax.chain(*steps)

    labels = {entry["label"] for entry in table.values()}
    if labels == {TRAINABLE}:
        return trainable_tx, table
    tx = optax.multi_transform(
        {TRAINABLE: trainable_tx, FROZEN: optax.set_to_zero()},
        lambda tree: _map_names(lambda name: table[name]["label"], tree),
    )
    return tx, table


# --------------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------------


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """Reshapes every [B, ...] leaf to [num_microbatches, B / num_microbatches, ...].

    Microbatch j takes rows j, j + k, j + 2k, ... (k = num_microbatches), so when the batch dim is
    split over devices in contiguous blocks every device holds an equal share of every microbatch and
    no data moves. Each device's local rows must divide by k.
    """

    def split(leaf):
        rows = leaf.shape[0]
        if rows % num_microbatches:
            raise ValueError(
                f"Batch of {rows} rows does not split into {num_microbatches} microbatches; make the "
                "per-step batch a multiple of optim.accumulation_steps."
            )
        return jnp.swapaxes(leaf.reshape(rows // num_microbatches, num_microbatches, *leaf.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    value_and_grad_fn: Callable[[Any, Any], tuple[tuple[jax.Array, Any], Any]],
    params: Any,
    batch: Any,
    num_microbatches: int,
) -> tuple[tuple[jax.Array, Any], Any]:
    """Mean loss, auxiliaries and gradients over microbatches, one microbatch in memory at a time.

    Args:
      value_and_grad_fn: (params, microbatch) -> ((loss, aux), grads), e.g.
        `jax.value_and_grad(loss_fn, has_aux=True)`; aux is a pytree of arrays (metrics).
      params: passed through unchanged to every call.
      batch: pytree of [B, ...] arrays.
      num_microbatches: k; 1 calls `value_and_grad_fn` once on the whole batch.

    Returns:
      ((loss, aux), grads) averaged over the k microbatches (float32 accumulation).
    """
    if num_microbatches == 1:
        return value_and_grad_fn(params, batch)
    microbatches = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda leaf: leaf[0], microbatches)
    shapes = jax.eval_shape(value_and_grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)

    def step(total, microbatch):
        result = value_and_grad_fn(params, microbatch)
        return jax.tree.map(lambda acc, value: acc + value.astype(acc.dtype), total, result), None

    total, _ = jax.lax.scan(step, zeros, microbatches)
    return jax.tree.map(
        lambda acc, s: (acc / num_microbatches).astype(s.dtype), total, shapes
    )
