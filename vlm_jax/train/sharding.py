"""Device mesh, logical-axis rules for parameters, and global batches.

Every parameter names its dimensions with logical axes ("embed", "mlp", "heads", "kv", "vocab", "patch",
"proj") through `nnx.with_partitioning`; one table of rules in the config maps each logical name to a
mesh axis ("data", "fsdp", "tensor") or to None. A logical name with no rule is replicated; a parameter
with no logical names at all is an error unless it is a scalar or a policy allows it, so a new layer
cannot silently end up replicated on every device.

The mesh uses `AxisType.Auto` on every axis: GSPMD propagates shardings through the model, so model
code stays plain `jnp` and FSDP all-gathers / tensor-parallel reductions are inserted by XLA. Explicit
axes (the `jax.make_mesh` default in this JAX) would make every einsum whose operands share a sharded
contracting axis an error until the model spells out its output sharding, which ties model code to one
parallelism layout.

Config section (`config.sharding`, an ml_collections ConfigDict; every field optional):
  mesh: tuple of (axis_name, size) pairs, outermost first; one size may be -1 ("the remaining devices").
    Default (("data", -1), ("fsdp", 1), ("tensor", 1)): pure data parallelism.
  rules: tuple of (logical_name, mesh_axis | tuple of mesh axes | None) pairs. Default `DEFAULT_RULES`.
  batch_axes: mesh axes the leading batch dimension is split over. Default ("data", "fsdp").
  allow_unannotated: regexes over parameter paths ("vision/pos_embed") that may carry no logical names;
    they are replicated.
Config section (`config.distributed`):
  mode: "auto" (initialize when the environment shows several processes: SLURM, Open MPI, GKE TPU,
    or an explicit coordinator below), "always" (Cloud TPU VM pods, where the topology comes from the
    metadata server), or "off".
  coordinator_address, num_processes, process_id: explicit multi-process start (local tests, custom
    clusters).
  cpu_collectives: "gloo" to run collectives between CPU processes (multi-process tests on one machine).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = tuple[tuple[str, int], ...]
LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_MESH_AXES: MeshAxes = (("data", -1), ("fsdp", 1), ("tensor", 1))
# Model width is split over fsdp (ZeRO-3 style: each device keeps 1/fsdp of every matrix and XLA
# all-gathers before use); the wide dims of MLPs, attention heads, vocabulary and projections go to
# tensor parallelism. Head dim ("kv") and flattened patch inputs ("patch") stay whole.
DEFAULT_RULES: LogicalRules = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("proj", "tensor"),
)
DEFAULT_BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def sharding_config() -> ml_collections.ConfigDict:
    """Returns the default `config.sharding` section (see the module docstring for the fields)."""
    return ml_collections.ConfigDict(
        dict(
            mesh=DEFAULT_MESH_AXES,
            rules=DEFAULT_RULES,
            batch_axes=DEFAULT_BATCH_AXES,
            allow_unannotated=(),
        )
    )


def distributed_config() -> ml_collections.ConfigDict:
    """Returns the default `config.distributed` section (see the module docstring for the fields)."""
    return ml_collections.ConfigDict(
        dict(
            mode="auto",
            coordinator_address=ml_collections.config_dict.placeholder(str),
            num_processes=ml_collections.config_dict.placeholder(int),
            process_id=ml_collections.config_dict.placeholder(int),
            cpu_collectives=ml_collections.config_dict.placeholder(str),
        )
    )


# --------------------------------------------------------------------------------------------------
# Multi-process start
# --------------------------------------------------------------------------------------------------


def _environment_has_several_processes() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize_distributed(config: Mapping[str, Any] | None = None) -> bool:
    """Starts the JAX distributed runtime when this run spans several processes.

    Must run before any other JAX call that touches devices. Safe to call twice.

    Args:
      config: the `config.distributed` section (`distributed_config()` fields); None means defaults.

    Returns:
      True when the distributed runtime is (now) initialized, False for a single-process run.
    """
    config = dict(distributed_config()) | dict(config or {})
    mode = config["mode"]
    if mode not in ("auto", "always", "off"):
        raise ValueError(f"distributed.mode must be 'auto', 'always' or 'off', got {mode!r}.")
    if jax.distributed.is_initialized():
        return True
    if config["cpu_collectives"]:
        jax.config.update("jax_cpu_collectives_implementation", config["cpu_collectives"])
    explicit = {
        key: config[key]
        for key in ("coordinator_address", "num_processes", "process_id")
        if config[key] is not None
    }
    if mode == "off":
        return False
    if explicit:
        if len(explicit) != 3:
            raise ValueError(
                "An explicit multi-process start needs coordinator_address, num_processes and process_id "
                f"together; got only {sorted(explicit)}."
            )
        jax.distributed.initialize(**explicit)
    elif mode == "always" or _environment_has_several_processes():
        jax.distributed.initialize()
    else:
        return False
    logging.info(
        "Distributed runtime up: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def resolve_mesh_shape(axes: Iterable[Sequence[Any]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Turns (name, size) pairs with at most one size of -1 into concrete names and sizes.

    Args:
      axes: e.g. (("data", -1), ("fsdp", 2), ("tensor", 1)).
      num_devices: devices the mesh must cover exactly.

    Returns:
      (axis_names, axis_sizes) whose product is num_devices.
    """
    names = tuple(str(name) for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh axis names must be distinct, got {names}.")
    unknown = [i for i, size in enumerate(sizes) if size == -1]
    if len(unknown) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"Mesh sizes must be positive with at most one -1, got {dict(zip(names, sizes))}.")
    known = int(np.prod([size for size in sizes if size != -1]))
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"Mesh {dict(zip(names, sizes))} cannot cover {num_devices} devices: {num_devices} is not "
                f"divisible by {known}; change the fixed axis sizes."
            )
        sizes[unknown[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} devices but {num_devices} are "
            "available; set one size to -1 to take the rest."
        )
    return names, tuple(sizes)


def make_mesh(axes: Iterable[Sequence[Any]] = DEFAULT_MESH_AXES, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh over all devices of all processes (or `devices`) with Auto (GSPMD) axes.

    Args:
      axes: (name, size) pairs, outermost first; put the axis that crosses hosts ("data") first and
        the one needing the fastest links ("tensor") last.
      devices: defaults to `jax.devices()`, every device of every process.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = resolve_mesh_shape(axes, len(devices))
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def mesh_from_config(config: Mapping[str, Any] | None = None) -> Mesh:
    """Builds the mesh from a `config.sharding` section (`sharding_config()` fields)."""
    config = dict(sharding_config()) | dict(config or {})
    return make_mesh(config["mesh"])


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def path_to_name(path: Sequence[Any]) -> str:
    """Joins a pytree key path into "a/b/0/c", dropping the `.value` step of nnx Variables."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name not in ("value", "raw_value"):
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def logical_to_mesh_spec(
    logical_names: Sequence[str | None],
    shape: Sequence[int],
    rules: Iterable[Sequence[Any]],
    mesh: Mesh,
    *,
    name: str = "",
) -> PartitionSpec:
    """Maps one parameter's logical axis names to a PartitionSpec on `mesh`.

    A logical name without a rule, or one whose rule is None, is replicated. A dimension that its mesh
    axes do not divide is replicated (and logged), as is a second use of a mesh axis already taken by
    an earlier dimension of the same parameter.

    Args:
      logical_names: one entry per dimension, e.g. ("embed", "mlp").
      shape: the parameter's shape, same length.
      rules: (logical_name, mesh_axis | tuple of mesh axes | None) pairs.
      mesh: the target mesh; rules may name only its axes.
      name: parameter path, for messages.
    """
    if len(logical_names) != len(shape):
        raise ValueError(
            f"Parameter {name!r} has shape {tuple(shape)} but logical axes {tuple(logical_names)}; "
            "give one logical name (or None) per dimension."
        )
    table: dict[str, Any] = {}
    for logical, mesh_axes in rules:
        table.setdefault(str(logical), mesh_axes)
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_names, shape):
        mesh_axes = table.get(logical) if logical is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        missing = [axis for axis in mesh_axes if axis not in mesh.shape]
        if missing:
            raise ValueError(
                f"Rule {logical!r} -> {mesh_axes} names mesh axes {missing} that the mesh "
                f"{dict(mesh.shape)} lacks; fix config.sharding.rules or config.sharding.mesh."
            )
        mesh_axes = tuple(axis for axis in mesh_axes if axis not in used)
        ways = int(np.prod([mesh.shape[axis] for axis in mesh_axes]))
        if not mesh_axes or ways == 1:
            spec.append(None)
            continue
        if size % ways:
            logging.warning(
                "Replicating dim %r (size %d) of %s: mesh axes %s (%d ways) do not divide it.",
                logical, size, name, mesh_axes, ways,
            )
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    names = variable.get_metadata().get("out_sharding")
    if names is None or isinstance(names, (PartitionSpec, NamedSharding)):
        return None if names is None else tuple(names.spec if isinstance(names, NamedSharding) else names)
    return tuple(names)


def state_partition_specs(
    state: Any,
    mesh: Mesh,
    rules: Iterable[Sequence[Any]] = DEFAULT_RULES,
    *,
    allow_unannotated: Sequence[str] = (),
) -> Any:
    """PartitionSpecs for every array in an nnx state (concrete or abstract), by logical-axis rules.

    Every `nnx.Param` must either carry logical names (`out_sharding` metadata from
    `nnx.with_partitioning`), be a scalar, or match a regex in `allow_unannotated`; otherwise this
    raises, listing the offenders. Non-Param variables (RNG keys and counts, batch statistics) are
    replicated.

    Args:
      state: `nnx.state(model)` or the state of `nnx.eval_shape(...)`; its leaves are nnx Variables.
      mesh: target mesh.
      rules: (logical_name, mesh_axis | None) pairs.
      allow_unannotated: regexes (re.search over "a/b/c" paths) of params allowed without names.

    Returns:
      The same tree with each Variable's value replaced by its PartitionSpec.
    """
    rules = tuple(tuple(rule) for rule in rules)
    allow = [re.compile(pattern) for pattern in allow_unannotated]
    unannotated: list[str] = []

    def spec_for(path, variable):
        name = path_to_name(path)
        shape = tuple(variable.get_value().shape)
        names = _logical_names(variable)
        if names is None:
            if isinstance(variable, nnx.Param) and shape and not any(p.search(name) for p in allow):
                unannotated.append(f"{name} {shape}")
            return variable.replace(PartitionSpec())
        return variable.replace(logical_to_mesh_spec(names, shape, rules, mesh, name=name))

    specs = jax.tree_util.tree_map_with_path(spec_for, state, is_leaf=_is_variable)
    if unannotated:
        raise ValueError(
            f"{len(unannotated)} parameters carry no logical axis names: {unannotated}. Create them with "
            "nnx.with_partitioning(init, names) or add their path regex to config.sharding.allow_unannotated."
        )
    return specs


def state_shardings(
    state: Any,
    mesh: Mesh,
    rules: Iterable[Sequence[Any]] = DEFAULT_RULES,
    *,
    allow_unannotated: Sequence[str] = (),
) -> Any:
    """NamedShardings for every array in an nnx state; see `state_partition_specs`."""
    specs = state_partition_specs(state, mesh, rules, allow_unannotated=allow_unannotated)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_state(state: Any, shardings: Any) -> Any:
    """Pairs each array of `state` with its sharding as a `jax.ShapeDtypeStruct` (restore targets)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state,
        shardings,
    )


def create_sharded_model(
    make_model: Callable[[], nnx.Module],
    mesh: Mesh,
    rules: Iterable[Sequence[Any]] = DEFAULT_RULES,
    *,
    allow_unannotated: Sequence[str] = (),
    host_init: bool = False,
) -> nnx.Module:
    """Builds a model whose arrays are created directly in their sharded layout.

    Shardings come from the rules and the params' logical axes. Then:
    - host_init=False (random init): the model is traced abstractly (no memory), then one jitted
      call builds it with those `out_shardings`, so no device ever holds a full copy.
    - host_init=True (a model that reads weights from disk, e.g. a pretrained CLIP): `make_model`
      runs once, eagerly on the host CPU, and each array is placed shard by shard
      (`jax.make_array_from_callback`, so each process supplies only its addressable shards). Inside
      jit, weights read from disk would be closed-over constants, embedded in the program: 256 MB
      of weights make a 0.5 GB HLO module and seconds of compile, and a ViT-L would not compile.
    Eager variable sharding is switched off inside: the rules here, not the context, place arrays.

    Args:
      make_model: builds the model, e.g. `lambda: CLIP(config, rngs=nnx.Rngs(0))`.
      mesh, rules, allow_unannotated: see `state_partition_specs`.
      host_init: build on the host and place the arrays (see above).
    """
    if host_init:
        # One build, on the host: an abstract pass first would read the checkpoint a second time.
        with nnx.use_eager_sharding(False), jax.default_device(jax.local_devices(backend="cpu")[0]):
            graphdef, state = nnx.split(make_model())
        shardings = state_shardings(state, mesh, rules, allow_unannotated=allow_unannotated)
        return nnx.merge(graphdef, jax.tree.map(_place_from_host, state, shardings))

    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract = nnx.split(abstract_model)
    shardings = state_shardings(abstract, mesh, rules, allow_unannotated=allow_unannotated)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.state(make_model())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def _place_from_host(value: Any, sharding: NamedSharding) -> jax.Array:
    """One host-built array in `sharding`: every process hands over only its addressable shards."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def batch_spec(ndim: int, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> PartitionSpec:
    """PartitionSpec splitting the leading dim of an `ndim`-array over `batch_axes`."""
    return PartitionSpec(tuple(batch_axes), *([None] * (ndim - 1))) if ndim else PartitionSpec()


def batch_sharding(mesh: Mesh, ndim: int = 1, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> NamedSharding:
    """NamedSharding splitting the leading dim over `batch_axes` of `mesh`."""
    return NamedSharding(mesh, batch_spec(ndim, batch_axes))


def shard_batch(batch: Any, mesh: Mesh, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> Any:
    """Assembles each process's local rows into global arrays split over the batch axes.

    Args:
      batch: pytree of host-local numpy arrays [B_local, ...]; every process passes the same
        structure and B_local, and the global batch is their concatenation in process order.
      mesh: the global mesh.
      batch_axes: mesh axes the leading dim is split over; B_global must divide by their size.

    Returns:
      The same pytree of global `jax.Array`s [B_local * process_count, ...].
    """
    ways = int(np.prod([mesh.shape[axis] for axis in batch_axes]))

    def put(path, local):
        local = np.asarray(local)
        global_rows = local.shape[0] * jax.process_count()
        if global_rows % ways:
            raise ValueError(
                f"Batch field {path_to_name(path)!r} has {global_rows} global rows, not divisible by the "
                f"{ways} devices of mesh axes {tuple(batch_axes)}; pick a batch size that is a multiple of {ways}."
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim, batch_axes), local)

    return jax.tree_util.tree_map_with_path(put, batch)
