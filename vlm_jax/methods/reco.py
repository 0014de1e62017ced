"""RECO: retrieval-enhanced contrastive vision-text models (Iscen, Caron, Fathi, Schmid; ICLR 2024).

A frozen CLIP embeds an image (v) and a text (t). Knowledge the CLIP's parameters lack lives in a
memory of image-text pairs {(image_i, text_i)}, embedded once by the same frozen CLIP
(`vlm_jax.memory.build`). RECO refines each embedding with what the memory holds about it, and only
a small fusion module per modality trains.

1. Uni-modal search, cross-modal fusion. An image embedding v searches the memory's *image*
   embeddings and receives the paired *text* embeddings of its k nearest neighbours; a text
   embedding t searches the memory's *texts* and receives the paired *images*. Keys are in the
   query's modality (image-image and text-text similarity is what the CLIP space measures best),
   values in the other one (they bring what the query lacks). Ablation (`search="crossmodal"`):
   an image searches the memory's texts directly and receives those texts (and vice versa).

2. Fusion. One transformer layer per modality over [v; t_1 .. t_k] (and [t; v_1 .. v_k]); the
   output at the query position is the refined embedding v̄ (t̄) (`vlm_jax.models.fusion`).
   Ablations: `fusion="mean"` averages [query; retrieved] (no parameters: only the temperature
   trains), `fusion="none"` is the plain CLIP.

3. Loss. L = NCE(v̄, t̄) + NCE(v̄, t) + NCE(v, t̄), each the symmetric InfoNCE of
   `vlm_jax.methods.clip.softmax_contrastive_loss` over the global batch, with one learnable
   temperature (`RECO.logit_scale`, initialized from the CLIP's or from `reco.logit_scale_init`).
   The mixed terms keep each refined embedding compatible with the other modality's original one,
   so a refined image still matches plain texts (zero-shot class prompts) and vice versa.

Where the memory lives. The `RECO` wrapper exposes `encode_image` / `encode_text` like the CLIP,
so the evaluators run it unchanged; both search the memory from inside `jax.jit`:
  - device backends ("exact", "approx"): the memory's image and text embeddings are `MemoryRows`
    variables, sharded by rows over a mesh. `MemoryRows` is an `nnx.Variable` but not an
    `nnx.Param`, so `nnx.Optimizer(model, tx, wrt=nnx.Param)` never sees it, and a checkpoint of
    `nnx.state(model, nnx.Param)` (or of `nnx.Not(MemoryRows)`) leaves it out. The memory is
    attached after the model is created (`RECO.attach_memory`), never inside `create_model`, so the
    trainer's abstract creation and its checkpoints hold only parameters; in the train step the
    memory arrives through the trainer's `constants` argument instead (`RecoMethod.constants`),
    and the evaluators attach it to a view of the trained model. Each shard scores its rows and
    keeps its own top-k with their values; the shards' candidates are then merged (the layout of
    `vlm_jax.memory.index`'s device backends, with values carried along).
  - host backend ("scann"): the search runs on the host through `jax.pure_callback`. Cost: every
    call moves the queries (B x D) device -> host and the retrieved values (B x k x D float32)
    host -> device, and the device waits for the host search; the callback sees the whole global
    batch on one host, so in multi-host jobs every process searches every query. Good for memories
    too large for accelerator memory and for evaluation; for training prefer precomputed neighbours.

Training retrieval (`reco.training_retrieval`):
  - "on_the_fly": search inside the train step with the device memory (`constants`). Exact for
    any augmentation or caption sampling.
  - "precomputed": the CLIP is frozen and the memory fixed, so each training example's
    neighbours are the same in every epoch: they are searched once on the host over the training
    set's frozen-CLIP embeddings (`precompute_neighbours`) and fed in the batch as
    `retrieved_for_image` / `retrieved_for_text` [B, k, D] with their memory ids [B, k]. Computed
    from the un-augmented image and the caption the evaluation decoder draws; with random crops or
    several captions per example, "on_the_fly" follows the augmented input exactly.

Self-match exclusion: training on data that is also in memory would retrieve the example itself
(its own caption for its own image) and teach the fusion to copy. `reco.exclude_self` drops the
memory row whose example id equals the training example's id (ids -> memory rows on the host;
the batch carries `memory_row` int32 [B], -1 for none); `reco.dedup_threshold` additionally drops
neighbours whose cosine with the query is >= the threshold (near-duplicates under other ids).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax.methods.clip import DEFAULT_BATCH_AXES, l2_normalize, softmax_contrastive_loss
from vlm_jax.models.clip import CLIP
from vlm_jax.models.fusion import Fusion, FusionConfig, MeanFusion

MODALITIES = ("image", "text")
SEARCHES = ("unimodal", "crossmodal")
FUSIONS = ("transformer", "mean", "none")
DEVICE_BACKENDS = ("exact", "approx")
HOST_BACKENDS = ("scann",)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def reco_config() -> ml_collections.ConfigDict:
    """The `config.reco` section with every field and its default.

    k: neighbours retrieved per query (not stated in the paper; 10).
    search: "unimodal" (RECO) | "crossmodal" (ablation).
    fusion: "transformer" (RECO) | "mean" (ablation) | "none" (plain CLIP).
    fusion_config: `FusionConfig` fields except embed_dim, dtype and param_dtype (from the CLIP):
      width (None: embed_dim), depth, heads, mlp_ratio, act, dropout, retrieved_dropout, residual,
      zero_init_output.
    logit_scale_init: the fusion temperature's initial log-scale; None takes the CLIP's logit_scale.
    train_encoders: let gradients reach the CLIP towers (RECO keeps them frozen: False stops the
      gradient at the embeddings, so the train step never runs the towers' backward pass; the
      optimizer's freeze policy must still freeze `clip/` so it keeps no state for them).
    memory_dir: the training memory (`vlm_jax.memory.build.load_memory`).
    eval_memory_dir: the memory the evaluators search ("": memory_dir); RECO swaps memories at
      inference without retraining.
    index: `vlm_jax.memory.index.IndexConfig` fields; backend "exact" | "approx" (device) | "scann" (host).
    training_retrieval: "on_the_fly" | "precomputed" (see the module docstring).
    exclude_self: drop each training example's own memory row.
    dedup_threshold: drop neighbours with cosine >= this (None: keep all).
    train_embeddings_dirs: train on the frozen-CLIP embeddings of the training pairs stored in these
      directories by the memory builder (their union, with precomputed neighbours) instead of on
      `config.data`'s pixels and tokens ((): pixels). Exact for a frozen CLIP and unaugmented data,
      and the towers never run.
    train_weights: sampling weight of each train_embeddings_dirs source (): in proportion to size).
    eval_embeddings_dir: evaluate `config.evals` on the embeddings stored there
      (`vlm_jax.methods.reco_pipeline.build_eval_embeddings`) instead of on pixels ("": pixels).
    """
    return ml_collections.ConfigDict(
        {
            "k": 10,
            "search": "unimodal",
            "fusion": "transformer",
            "fusion_config": {
                "width": ml_collections.config_dict.placeholder(int),
                "depth": 1,
                "heads": 8,
                "mlp_ratio": 4.0,
                "act": "gelu",
                "dropout": 0.0,
                "retrieved_dropout": 0.1,
                "residual": True,
                "zero_init_output": True,
            },
            "logit_scale_init": ml_collections.config_dict.placeholder(float),
            "train_encoders": False,
            "memory_dir": "",
            "eval_memory_dir": "",
            "index": {"backend": "exact", "dtype": "float32", "recall_target": 0.95},
            "training_retrieval": "on_the_fly",
            "exclude_self": True,
            "dedup_threshold": ml_collections.config_dict.placeholder(float),
            "train_embeddings_dirs": (),
            "train_weights": (),
            "eval_embeddings_dir": "",
        }
    )


@dataclasses.dataclass(frozen=True)
class RecoConfig:
    """The static part of `config.reco` the model needs (hashable: it sits in the graphdef)."""

    k: int = 10
    search: str = "unimodal"
    fusion: str = "transformer"
    fusion_config: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    logit_scale_init: float | None = None
    train_encoders: bool = False
    dedup_threshold: float | None = None

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"reco.search must be one of {SEARCHES}, got {self.search!r}.")
        if self.fusion not in FUSIONS:
            raise ValueError(f"reco.fusion must be one of {FUSIONS}, got {self.fusion!r}.")
        if self.k < 1:
            raise ValueError(f"reco.k must be >= 1, got {self.k}.")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, embed_dim: int, dtype: str = "float32",
                    param_dtype: str = "float32") -> "RecoConfig":
        """Builds it from a `config.reco` section (`reco_config()` fields) and the CLIP's dims/dtypes."""
        section = reco_config().to_dict() | dict(section.to_dict() if hasattr(section, "to_dict") else section)
        fusion_fields = reco_config().fusion_config.to_dict() | dict(section["fusion_config"])
        fusion = FusionConfig(embed_dim=embed_dim, dtype=dtype, param_dtype=param_dtype, **fusion_fields)
        return cls(k=int(section["k"]), search=section["search"], fusion=section["fusion"], fusion_config=fusion,
                   logit_scale_init=section["logit_scale_init"], train_encoders=bool(section["train_encoders"]),
                   dedup_threshold=section["dedup_threshold"])


# --------------------------------------------------------------------------------------------------
# 1. Uni-modal search (keys in the query's modality), cross-modal fusion (values in the other one)
# --------------------------------------------------------------------------------------------------


def keys_and_values(modality: str, search: str) -> tuple[str, str]:
    """Which memory embeddings a query of `modality` searches (keys) and receives (values).

    unimodal:   image -> (image, text); text -> (text, image).
    crossmodal: image -> (text, text);  text -> (image, image).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}.")
    other = "text" if modality == "image" else "image"
    if search == "unimodal":
        return modality, other
    if search == "crossmodal":
        return other, other
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")


class MemoryRows(nnx.Variable):
    """Memory embeddings a `RECO` model searches: state, but not a trainable or checkpointed Param."""


@flax.struct.dataclass
class DeviceMemory:
    """The memory on the accelerator: L2-normalized embeddings, rows sharded over `axes` of `mesh`.

    image_embeddings, text_embeddings: [N_padded, D] (row i of both is pair i; rows >= num_rows are
    zero padding that never wins a search). The static fields ride in the treedef.
    """

    image_embeddings: jax.Array
    text_embeddings: jax.Array
    num_rows: int = flax.struct.field(pytree_node=False)
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    approximate: bool = flax.struct.field(pytree_node=False, default=False)
    recall_target: float = flax.struct.field(pytree_node=False, default=0.95)

    def embeddings(self, modality: str) -> jax.Array:
        return self.image_embeddings if modality == "image" else self.text_embeddings


def place_memory(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    backend: str = "exact",
    dtype: str = "float32",
    recall_target: float = 0.95,
) -> DeviceMemory:
    """Normalizes, pads and places the memory on device for in-jit search.

    Args:
      image_embeddings, text_embeddings: float [N, D], row i of both is pair i.
      mesh: rows are sharded over `axes` of it (None: one device, dense search).
      axes: mesh axes to shard rows over (None: all axes of the mesh).
      backend: "exact" (`jax.lax.top_k` per shard) or "approx" (`jax.lax.approx_max_k`).
      dtype: storage dtype ("bfloat16" halves the memory; scores are float32).
    """
    if backend not in DEVICE_BACKENDS:
        raise ValueError(f"device memory backend must be one of {DEVICE_BACKENDS}, got {backend!r}; "
                         "'scann' memories are searched on the host (HostMemory).")
    image_embeddings, text_embeddings = _normalized(image_embeddings), _normalized(text_embeddings)
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(f"expected image and text embeddings of one shape [N, D], got "
                         f"{image_embeddings.shape} and {text_embeddings.shape}.")
    num_rows = image_embeddings.shape[0]
    axes = tuple(axes or (mesh.axis_names if mesh is not None else ()))
    shards = math.prod(mesh.shape[axis] for axis in axes) if mesh is not None else 1
    padded_rows = -(-num_rows // shards) * shards

    def put(rows: np.ndarray) -> jax.Array:
        if padded_rows != num_rows:
            rows = np.concatenate([rows, np.zeros((padded_rows - num_rows, rows.shape[1]), rows.dtype)])
        padded = jnp.asarray(rows, dtype=dtype)
        if mesh is None:
            return padded
        return jax.device_put(padded, NamedSharding(mesh, P(axes, None)))

    return DeviceMemory(put(image_embeddings), put(text_embeddings), num_rows=num_rows, mesh=mesh, axes=axes,
                        approximate=backend == "approx", recall_target=recall_target)


_NORMALIZE_CHUNK = 1 << 16  # rows per step: temporaries stay at chunk size, not memory size


def _normalized(rows: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
    """float32 L2-normalized rows; the input itself (no copy) when it already is float32 unit rows,
    as the memory builder writes them. Chunked, so a 1M x 512 memory needs no extra full-size copy."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        return rows.astype(np.float32) / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    chunks = range(0, rows.shape[0], _NORMALIZE_CHUNK)
    norms = np.concatenate([np.linalg.norm(rows[i:i + _NORMALIZE_CHUNK].astype(np.float32), axis=-1)
                            for i in chunks]) if rows.shape[0] else np.zeros((0,), np.float32)
    if rows.dtype == np.float32 and np.all(np.abs(norms - 1.0) <= tolerance):
        return rows
    out = np.empty(rows.shape, np.float32)
    for i in chunks:
        out[i:i + _NORMALIZE_CHUNK] = rows[i:i + _NORMALIZE_CHUNK] / np.maximum(norms[i:i + _NORMALIZE_CHUNK, None], 1e-12)
    return out


def _shard_top_k(queries, keys, values, exclude_rows, first_row, *, num_rows, padded, k, dedup_threshold,
                 approximate, recall_target):
    """Top-k of one block of memory rows: scores [B, k'], global ids [B, k'], values [B, k', D].

    Masks are built only when needed (padding rows exist, a dedup threshold or exclusions are given):
    each is a pass over the [B, rows] scores, which at 1M rows costs as much as the top-k itself.
    """
    scores = jnp.matmul(queries.astype(keys.dtype), keys.T, preferred_element_type=jnp.float32)
    rows = keys.shape[0]
    drop = None
    if padded:
        drop = (first_row + jnp.arange(rows))[None, :] >= num_rows
    if dedup_threshold is not None:
        duplicate = scores >= dedup_threshold
        drop = duplicate if drop is None else drop | duplicate
    if drop is not None:
        scores = jnp.where(drop, -jnp.inf, scores)
    if exclude_rows is not None:
        # Rows outside this block map to an out-of-range column that mode="drop" ignores.
        local = exclude_rows - first_row
        local = jnp.where((exclude_rows >= 0) & (local >= 0) & (local < rows), local, rows)
        scores = scores.at[jnp.arange(scores.shape[0])[:, None], local].set(-jnp.inf, mode="drop")
    local_k = min(k, rows)
    if approximate:
        top_scores, columns = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target)
    else:
        top_scores, columns = jax.lax.top_k(scores, local_k)
    return top_scores, columns + first_row, jnp.take(values, columns, axis=0)


def search_device_memory(
    queries: jax.Array,
    memory: DeviceMemory,
    *,
    modality: str,
    search: str,
    k: int,
    exclude_rows: jax.Array | None = None,
    dedup_threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Retrieves the values of each query's k nearest memory keys; runs inside jit.

    Args:
      queries: [B, D] L2-normalized embeddings of `modality`.
      memory: the placed memory.
      modality, search: pick keys and values (`keys_and_values`).
      k: neighbours per query.
      exclude_rows: int [B] or [B, E] memory rows to drop per query (-1: none).
      dedup_threshold: drop neighbours whose score is >= this.

    Returns:
      (ids int32 [B, k], values float32 [B, k, D]): best first; a slot without a neighbour has id -1
      and zero values.
    """
    key_name, value_name = keys_and_values(modality, search)
    keys, values = memory.embeddings(key_name), memory.embeddings(value_name)
    if exclude_rows is not None:
        exclude_rows = jnp.asarray(exclude_rows, jnp.int32)
        if exclude_rows.ndim == 1:
            exclude_rows = exclude_rows[:, None]
    top_k = functools.partial(_shard_top_k, num_rows=memory.num_rows, padded=keys.shape[0] > memory.num_rows,
                              k=k, dedup_threshold=dedup_threshold, approximate=memory.approximate,
                              recall_target=memory.recall_target)
    if memory.mesh is None:
        scores, ids, found = top_k(queries, keys, values, exclude_rows, 0)
    else:
        axes = memory.axes
        rows_per_shard = keys.shape[0] // math.prod(memory.mesh.shape[axis] for axis in axes)

        def shard_search(queries, keys, values, *exclude):
            exclude_rows = exclude[0] if exclude else None
            scores, ids, found = top_k(queries, keys, values, exclude_rows, jax.lax.axis_index(axes) * rows_per_shard)
            # Every shard's candidates side by side, then the global top-k of them on every device.
            scores, ids, found = jax.lax.all_gather((scores, ids, found), axes, axis=1, tiled=True)
            scores, order = jax.lax.top_k(scores, min(k, scores.shape[1]))
            return scores, jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(found, order[..., None], axis=1)

        scores, ids, found = jax.shard_map(
            shard_search,
            mesh=memory.mesh,
            in_specs=(P(), P(axes, None), P(axes, None)) + ((P(),) if exclude_rows is not None else ()),
            out_specs=(P(), P(), P()),
            # The merged top-k is computed from the all-gathered candidates, so it is replicated.
            check_vma=False,
        )(queries, keys, values, *(() if exclude_rows is None else (exclude_rows,)))
    missing = k - scores.shape[1]
    if missing:
        scores = jnp.pad(scores, ((0, 0), (0, missing)), constant_values=-jnp.inf)
        ids = jnp.pad(ids, ((0, 0), (0, missing)))
        found = jnp.pad(found, ((0, 0), (0, missing), (0, 0)))
    present = jnp.isfinite(scores)
    ids = jnp.where(present, ids, -1).astype(jnp.int32)
    found = jnp.where(present[..., None], found.astype(jnp.float32), 0.0)
    return ids, found


class HostMemory:
    """The memory searched on the host (ScaNN) from inside jit through `jax.pure_callback`.

    Holds the numpy embeddings (values are gathered on the host) and one index per key modality,
    each built on its first search (`index(modality)`; `build()` builds them all up front), so a
    job that only encodes images never builds or holds the text index. Rows that are already
    float32 unit vectors (the memory builder's) are used in place, not copied.
    Held by `RECO` as a static attribute: it is hashed by identity, so a new HostMemory recompiles.
    """

    def __init__(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                 index_config: Mapping[str, Any] | None = None, *, search: str = "unimodal"):
        from vlm_jax.memory.index import IndexConfig, build_index  # noqa: PLC0415 - ScaNN loads lazily

        config = IndexConfig.from_any(dict(index_config or {"backend": "scann"}))
        if config.backend not in HOST_BACKENDS:
            raise ValueError(f"HostMemory searches with {HOST_BACKENDS}, got backend {config.backend!r}; use "
                             "place_memory for the device backends.")
        self.embeddings = {"image": _normalized(image_embeddings), "text": _normalized(text_embeddings)}
        # Keys are unit rows now: the index need not normalize (and copy) them again.
        self.config = dataclasses.replace(config, normalize=False)
        self._build_index = build_index
        self.indexes: dict[str, Any] = {}  # key modality -> built index (a tuned view may replace one)
        self._lock = threading.Lock()
        self.search = search
        self.dim = self.embeddings["image"].shape[1]

    def index(self, key_modality: str):
        """The index over the memory's `key_modality` embeddings, built on first use."""
        with self._lock:
            if key_modality not in self.indexes:
                self.indexes[key_modality] = self._build_index(self.config, self.embeddings[key_modality])
            return self.indexes[key_modality]

    def build(self, modalities: Sequence[str] = MODALITIES) -> "HostMemory":
        """Builds the indexes the queries of `modalities` search (e.g. before timing a search)."""
        for modality in modalities:
            self.index(keys_and_values(modality, self.search)[0])
        return self

    def lookup(self, queries: np.ndarray, exclude_rows: np.ndarray, *, modality: str, k: int,
               dedup_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Host search: queries float [B, D], exclude_rows int [B, E] -> ids int32 [B, k], values [B, k, D]."""
        key_name, value_name = keys_and_values(modality, self.search)
        index = self.index(key_name)
        if dedup_threshold != index.config.dedup_threshold:
            index = index.with_search_config(dedup_threshold=dedup_threshold)
        _, ids = index.search(_normalized(queries), k, exclude_ids=np.asarray(exclude_rows))
        values = np.where((ids >= 0)[..., None], self.embeddings[value_name][np.maximum(ids, 0)], 0.0)
        return ids.astype(np.int32), values.astype(np.float32)

    def __call__(self, queries: jax.Array, exclude_rows: jax.Array, *, modality: str, k: int,
                 dedup_threshold: float | None) -> tuple[jax.Array, jax.Array]:
        """In-jit search through `jax.pure_callback` (see the module docstring for its cost)."""
        batch = queries.shape[0]
        shapes = (jax.ShapeDtypeStruct((batch, k), jnp.int32), jax.ShapeDtypeStruct((batch, k, self.dim), jnp.float32))
        callback = functools.partial(self.lookup, modality=modality, k=k, dedup_threshold=dedup_threshold)
        return jax.pure_callback(callback, shapes, queries.astype(jnp.float32), exclude_rows)


class MemoryBank(nnx.Module):
    """A `DeviceMemory` attached to a model: its arrays as `MemoryRows`, its layout as static fields."""

    def __init__(self, memory: DeviceMemory):
        self.image_embeddings = MemoryRows(memory.image_embeddings)
        self.text_embeddings = MemoryRows(memory.text_embeddings)
        # Static fields live in the graphdef, which jit hashes: keep them hashable.
        self.num_rows, self.mesh, self.axes = memory.num_rows, memory.mesh, memory.axes
        self.approximate, self.recall_target = memory.approximate, memory.recall_target

    def device_memory(self) -> DeviceMemory:
        return DeviceMemory(self.image_embeddings[...], self.text_embeddings[...], num_rows=self.num_rows,
                            mesh=self.mesh, axes=self.axes, approximate=self.approximate,
                            recall_target=self.recall_target)


# --------------------------------------------------------------------------------------------------
# 2. Cross-modal fusion: the RECO model
# --------------------------------------------------------------------------------------------------


def make_fusion(config: RecoConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """The fusion module of one modality for `config.fusion` (None for "none")."""
    if config.fusion == "transformer":
        return Fusion(config.fusion_config, rngs=rngs)
    if config.fusion == "mean":
        return MeanFusion(config.fusion_config.retrieved_dropout)
    return None


class RECO(nnx.Module):
    """A frozen CLIP, one fusion per modality, a fusion temperature, and the memory they search.

    Attributes:
      clip: the (frozen) CLIP.
      image_fusion, text_fusion: `Fusion` / `MeanFusion` modules, or None for fusion="none".
      logit_scale: nnx.Param scalar, log-space inverse temperature of the RECO loss.
      memory: a `MemoryBank` once `attach_memory(DeviceMemory)` ran, else None.
      host_memory: a `HostMemory` once `attach_memory(HostMemory)` ran, else None.
    """

    def __init__(self, clip: CLIP, config: RecoConfig, *, rngs: nnx.Rngs):
        if config.fusion_config.embed_dim != clip.config.embed_dim:
            raise ValueError(f"fusion embed_dim {config.fusion_config.embed_dim} differs from the CLIP's "
                             f"embed_dim {clip.config.embed_dim}; build RecoConfig with embed_dim=clip.config.embed_dim.")
        self.config = config
        self.clip = clip
        self.image_fusion = make_fusion(config, rngs=rngs)
        self.text_fusion = make_fusion(config, rngs=rngs)
        if config.logit_scale_init is None:
            initial = jnp.asarray(clip.logit_scale[...], jnp.dtype(config.fusion_config.param_dtype))
        else:
            initial = jnp.asarray(config.logit_scale_init, jnp.dtype(config.fusion_config.param_dtype))
        self.logit_scale = nnx.Param(initial, out_sharding=(), eager_sharding=False)
        self.memory = nnx.data(None)
        self.host_memory = None

    def attach_memory(self, memory: DeviceMemory | HostMemory) -> "RECO":
        """Makes `encode_image` / `encode_text` search `memory`; returns self."""
        if isinstance(memory, HostMemory):
            if memory.search != self.config.search:
                raise ValueError(f"the HostMemory was built for search={memory.search!r} but the model uses "
                                 f"search={self.config.search!r}; rebuild it with search={self.config.search!r}.")
            self.memory, self.host_memory = None, memory
        elif isinstance(memory, DeviceMemory):
            self.memory, self.host_memory = MemoryBank(memory), None
        else:
            raise TypeError(f"expected a DeviceMemory or HostMemory, got {type(memory).__name__}.")
        return self

    def retrieve(
        self,
        modality: str,
        queries: jax.Array,
        *,
        memory: DeviceMemory | None = None,
        exclude_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Uni-modal search (or the configured ablation) for normalized queries [B, D].

        `memory` (e.g. the train step's constants) overrides the attached memory. Returns
        (ids int32 [B, k] with -1 for missing, values float32 [B, k, D]).
        """
        config = self.config
        if memory is None and self.memory is not None:
            memory = self.memory.device_memory()
        if memory is not None:
            return search_device_memory(queries, memory, modality=modality, search=config.search, k=config.k,
                                        exclude_rows=exclude_rows, dedup_threshold=config.dedup_threshold)
        if self.host_memory is not None:
            if exclude_rows is None:
                exclude_rows = jnp.full((queries.shape[0], 1), -1, jnp.int32)
            exclude_rows = jnp.asarray(exclude_rows, jnp.int32).reshape(queries.shape[0], -1)
            return self.host_memory(queries, exclude_rows, modality=modality, k=config.k,
                                    dedup_threshold=config.dedup_threshold)
        raise ValueError("this RECO model has no memory; call model.attach_memory(place_memory(...)) or pass "
                         "memory=..., or use fusion='none'.")

    def refine(
        self,
        modality: str,
        embeddings: jax.Array,
        *,
        retrieved: jax.Array | None = None,
        retrieved_ids: jax.Array | None = None,
        memory: DeviceMemory | None = None,
        exclude_rows: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Refines normalized embeddings [B, D] of `modality` with their retrieved items.

        `retrieved` [B, k, D] with `retrieved_ids` [B, k] (precomputed neighbours, -1 = missing)
        skip the search. `rng` enables the fusion's dropouts (training). Returns float32 [B, D].
        """
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        if fusion is None:
            return embeddings.astype(jnp.float32)
        if retrieved is None:
            retrieved_ids, retrieved = self.retrieve(modality, embeddings, memory=memory, exclude_rows=exclude_rows)
        valid = retrieved_ids >= 0 if retrieved_ids is not None else None
        return fusion(embeddings, retrieved, valid, rng=rng)

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """pixels float32 [B, H, W, 3] -> refined image embeddings float32 [B, D] (not normalized)."""
        return self.refine("image", l2_normalize(self.clip.encode_image(pixels)))

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> refined text embeddings float32 [B, D] (not normalized)."""
        return self.refine("text", l2_normalize(self.clip.encode_text(ids)))


# --------------------------------------------------------------------------------------------------
# 3. Loss
# --------------------------------------------------------------------------------------------------


def reco_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    refined_image: jax.Array,
    refined_text: jax.Array,
    logit_scale: jax.Array,
    *,
    mesh: Mesh | None = None,
    axis: str | Sequence[str] = DEFAULT_BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = NCE(v̄, t̄) + NCE(v̄, t) + NCE(v, t̄), symmetric InfoNCE with one temperature.

    Args:
      image_embeddings, text_embeddings: [B, D] frozen CLIP embeddings v, t of matching pairs.
      refined_image, refined_text: [B, D] fused v̄, t̄.
      logit_scale: scalar log inverse temperature.
      mesh, axis: as `softmax_contrastive_loss` (None: the dense form).

    Returns:
      (loss, metrics): scalar float32; metrics hold each term and its in-batch accuracies.
    """
    nce = functools.partial(softmax_contrastive_loss, logit_scale=logit_scale, mesh=mesh, axis=axis)
    terms = {
        "refined_refined": nce(refined_image, refined_text),
        "refined_image": nce(refined_image, text_embeddings),
        "refined_text": nce(image_embeddings, refined_text),
    }
    loss = sum(term_loss for term_loss, _ in terms.values())
    metrics = {"scale": terms["refined_refined"][1]["scale"]}
    for name, (term_loss, term_metrics) in terms.items():
        metrics[f"loss_{name}"] = term_loss
        metrics[f"i2t_accuracy_{name}"] = term_metrics["i2t_accuracy"]
        metrics[f"t2i_accuracy_{name}"] = term_metrics["t2i_accuracy"]
    return loss, metrics


@flax.struct.dataclass
class RecoConstants:
    """What every train step receives unchanged: the device memory (None with precomputed neighbours)
    and, statically, the mesh and batch axes the contrastive loss is split over."""

    memory: DeviceMemory | None
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    batch_axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=DEFAULT_BATCH_AXES)


def frozen_embeddings(model: RECO, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """v, t: the batch's precomputed "image_embedding"/"text_embedding" [B, D], or the CLIP's
    embeddings of "image" [B, H, W, 3] / "text_ids" [B, L]; L2-normalized float32 [B, D]."""
    images = batch["image_embedding"] if "image_embedding" in batch else model.clip.encode_image(batch["image"])
    texts = batch["text_embedding"] if "text_embedding" in batch else model.clip.encode_text(batch["text_ids"])
    images, texts = l2_normalize(images), l2_normalize(texts)
    if not model.config.train_encoders:
        images, texts = jax.lax.stop_gradient(images), jax.lax.stop_gradient(texts)
    return images, texts


def loss_fn(model: RECO, batch: Mapping[str, jax.Array], constants: RecoConstants | None,
            rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The RECO train loss of one global batch (pure; traced under jit).

    Batch: "image" [B, H, W, 3] and "text_ids" [B, L] (or "image_embedding"/"text_embedding"
    [B, D]); optional precomputed neighbours "retrieved_for_image"/"retrieved_for_text" [B, k, D]
    with "retrieved_for_image_ids"/"retrieved_for_text_ids" int [B, k]; optional "memory_row"
    int [B] (the example's own memory row, excluded from its search; -1: none). Without
    precomputed neighbours the search uses `constants.memory` (or the model's attached memory).
    """
    constants = constants or RecoConstants(memory=None)
    images, texts = frozen_embeddings(model, batch)
    image_rng, text_rng = jax.random.split(rng) if rng is not None else (None, None)
    exclude_rows = batch.get("memory_row")

    def refine(modality, embeddings, fusion_rng):
        retrieved = batch.get(f"retrieved_for_{modality}")
        retrieved_ids = batch.get(f"retrieved_for_{modality}_ids")
        return model.refine(modality, embeddings, retrieved=retrieved, retrieved_ids=retrieved_ids,
                            memory=constants.memory, exclude_rows=exclude_rows, rng=fusion_rng)

    refined_image = refine("image", images, image_rng)
    refined_text = refine("text", texts, text_rng)
    loss, metrics = reco_loss(images, texts, refined_image, refined_text, model.logit_scale[...],
                              mesh=constants.mesh, axis=constants.batch_axes)
    metrics["loss"] = loss
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# 4. Retrieval for training: self-match exclusion, precomputed neighbours
# --------------------------------------------------------------------------------------------------


def memory_rows_of(example_ids: Sequence[Any], memory_ids: Sequence[Any]) -> np.ndarray:
    """Memory row holding each example (matched by example id), -1 where the memory lacks it.

    Args:
      example_ids: [B] ids (str or int) of training examples.
      memory_ids: [N] ids of the memory's pairs, in row order.

    Returns:
      int32 [B].
    """
    row_of = {_id_key(memory_id): row for row, memory_id in enumerate(memory_ids)}
    return np.asarray([row_of.get(_id_key(example_id), -1) for example_id in example_ids], np.int32)


def _id_key(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def precompute_neighbours(
    image_queries: np.ndarray,
    text_queries: np.ndarray,
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    k: int,
    search: str = "unimodal",
    index_config: Mapping[str, Any] | str = "exact",
    exclude_rows: np.ndarray | None = None,
    dedup_threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """Searches the memory once, on the host, for every training example.

    Args:
      image_queries, text_queries: float [M, D] frozen-CLIP embeddings of the M training examples.
      image_embeddings, text_embeddings: float [N, D] the memory.
      k, search: neighbours per query and "unimodal" | "crossmodal".
      index_config: `vlm_jax.memory.index` config (any backend: this runs outside jit).
      exclude_rows: int [M] or [M, E] memory rows to drop per example (-1: none).
      dedup_threshold: drop neighbours with cosine >= this.

    Returns:
      {"image": int64 [M, k], "text": int64 [M, k]} memory rows (-1 where missing); the values a
      query receives are the other modality's embeddings at these rows (`keys_and_values`).
    """
    from vlm_jax.memory.index import IndexConfig, build_index  # noqa: PLC0415

    config = dataclasses.replace(IndexConfig.from_any(index_config), dedup_threshold=dedup_threshold)
    memory = {"image": np.asarray(image_embeddings, np.float32), "text": np.asarray(text_embeddings, np.float32)}
    queries = {"image": np.asarray(image_queries, np.float32), "text": np.asarray(text_queries, np.float32)}
    neighbours = {}
    for modality in MODALITIES:
        key_name, _ = keys_and_values(modality, search)
        index = build_index(config, memory[key_name])
        _, neighbours[modality] = index.search(queries[modality], k, exclude_ids=exclude_rows)
    return neighbours


class AddRetrieved:
    """Batch transform: looks up precomputed neighbours by the batch's source "index" [B] and adds
    "retrieved_for_{image,text}" float32 [B, k, D] and "retrieved_for_{image,text}_ids" int32 [B, k]."""

    def __init__(self, neighbours: Mapping[str, np.ndarray], image_embeddings: np.ndarray,
                 text_embeddings: np.ndarray, *, search: str = "unimodal"):
        self.neighbours = {m: np.asarray(neighbours[m]) for m in MODALITIES}
        self.embeddings = {"image": _normalized(image_embeddings), "text": _normalized(text_embeddings)}
        self.search = search

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        rows = np.asarray(batch["index"], np.int64)
        for modality in MODALITIES:
            _, value_name = keys_and_values(modality, self.search)
            ids = self.neighbours[modality][rows]
            values = self.embeddings[value_name][np.maximum(ids, 0)]
            batch[f"retrieved_for_{modality}"] = np.where((ids >= 0)[..., None], values, 0.0).astype(np.float32)
            batch[f"retrieved_for_{modality}_ids"] = ids.astype(np.int32)
        return batch


class AddMemoryRow:
    """Batch transform: adds "memory_row" int32 [B], the memory row of each example's own pair (by
    its "id"), for self-match exclusion in the on-the-fly search."""

    def __init__(self, memory_ids: Sequence[Any]):
        self.row_of = {_id_key(memory_id): row for row, memory_id in enumerate(memory_ids)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "id" not in batch:
            raise KeyError("reco.exclude_self needs example ids in the batch; set data.id_key to the id field.")
        rows = [self.row_of.get(_id_key(example_id), -1) for example_id in np.asarray(batch["id"]).tolist()]
        return {**batch, "memory_row": np.asarray(rows, np.int32)}


# --------------------------------------------------------------------------------------------------
# 5. The method, for the trainer
# --------------------------------------------------------------------------------------------------


def _reco_section(config) -> dict[str, Any]:
    """`config.reco` as a dict over `reco_config()`'s defaults."""
    section = config.reco
    return reco_config().to_dict() | dict(section.to_dict() if hasattr(section, "to_dict") else section)


class SideBySideEvaluator:
    """Runs one evaluator on the RECO model (with the evaluation memory) and on its own frozen CLIP:
    the same checkpoint and memory, metrics "reco/<name>" and "clip/<name>" side by side."""

    def __init__(self, evaluator: Any, memory: Callable[[], DeviceMemory | HostMemory]):
        self.evaluator = evaluator
        self.memory = memory

    def run(self, model: RECO) -> dict[str, float]:
        view = nnx.merge(*nnx.split(model))
        if view.config.fusion != "none":
            view.attach_memory(self.memory())
        metrics = {f"reco/{name}": value for name, value in self.evaluator.run(view).items()}
        metrics.update({f"clip/{name}": value for name, value in self.evaluator.run(model.clip).items()})
        return metrics


class RecoMethod:
    """RECO for the trainer (protocol in `vlm_jax.train.trainer`).

    Config fields read:
      model_dir: the pretrained CLIP directory (`vlm_jax.weights.load_pretrained`).
      dtype: compute dtype of the CLIP and the fusion (default "float32").
      reco: `reco_config()`.
      data: the training data section (`vlm_jax.data.pipeline.default_config()` fields).
      global_batch_size, seed: global batch size and data seed.
      evals: `vlm_jax.evaluate.suite` specs; each runs side by side with and without RECO. For
        Shapes World, `subsets="frequency"` adds the common/rare/novel top-1.
    The optimizer's freeze policy should train `image_fusion/`, `text_fusion/` and `logit_scale`
    (the RECO temperature, a top-level path, not `clip/logit_scale`) and freeze `clip/`.
    """

    def __init__(self):
        self._pretrained: dict[tuple[str, str], Any] = {}
        self._memories: dict[str, Any] = {}

    def pretrained(self, config) -> Any:
        """The frozen CLIP with its tokenizer and preprocessing, loaded once per directory."""
        from vlm_jax.weights import load_pretrained  # noqa: PLC0415

        key = (str(config.model_dir), str(config.get("dtype", "float32")))
        if key not in self._pretrained:
            # The trainer first calls create_model under a trace (abstract, then jitted creation); the
            # cached weights must be concrete arrays, not that trace's values.
            with jax.ensure_compile_time_eval():
                self._pretrained[key] = load_pretrained(config.model_dir, dtype=key[1])
        return self._pretrained[key]

    def memory(self, directory: str) -> Any:
        """The host memory of `directory` (`vlm_jax.memory.build.load_memory`), loaded once."""
        from vlm_jax.memory.build import load_memory  # noqa: PLC0415

        if not directory:
            raise ValueError("reco.memory_dir is not set; point it at a memory built by vlm_jax.memory.build.")
        if directory not in self._memories:
            self._memories[directory] = load_memory(directory)
        return self._memories[directory]

    def reco_config(self, config, clip_config) -> RecoConfig:
        return RecoConfig.from_config(config.reco, embed_dim=clip_config.embed_dim,
                                      dtype=config.get("dtype", "float32"), param_dtype=clip_config.param_dtype)

    def reads_weights(self, config) -> bool:
        """Always: the frozen CLIP comes from `clip_dir` (placed from the host, not jit constants)."""
        del config
        return True

    def create_model(self, config, rngs: nnx.Rngs) -> RECO:
        """The frozen pretrained CLIP plus fresh fusions and temperature; no memory attached."""
        pretrained = self.pretrained(config)
        return RECO(pretrained.model, self.reco_config(config, pretrained.config), rngs=rngs)

    def constants(self, config, mesh: Mesh | None) -> RecoConstants:
        """The training memory on device, rows sharded over every axis of `mesh` (on-the-fly retrieval),
        or no memory (precomputed neighbours, fusion "none")."""
        batch_axes = tuple(config.get("sharding", {}).get("batch_axes", DEFAULT_BATCH_AXES)) if mesh else DEFAULT_BATCH_AXES
        reco = _reco_section(config)
        if reco["fusion"] == "none" or reco["training_retrieval"] == "precomputed":
            return RecoConstants(memory=None, mesh=mesh, batch_axes=batch_axes)
        if reco["training_retrieval"] != "on_the_fly":
            raise ValueError(f"reco.training_retrieval must be 'on_the_fly' or 'precomputed', "
                             f"got {reco['training_retrieval']!r}.")
        index = dict(reco["index"])
        if index.get("backend", "exact") not in DEVICE_BACKENDS:
            raise ValueError(f"on-the-fly retrieval searches on device; reco.index.backend={index['backend']!r} "
                             "is a host backend: use 'exact'/'approx' or reco.training_retrieval='precomputed'.")
        memory = self.memory(reco["memory_dir"])
        return RecoConstants(
            memory=place_memory(memory.image_embeddings, memory.text_embeddings, mesh=mesh,
                                backend=index.get("backend", "exact"), dtype=index.get("dtype", "float32"),
                                recall_target=index.get("recall_target", 0.95)),
            mesh=mesh, batch_axes=batch_axes)

    @staticmethod
    def loss_fn(model: RECO, batch, constants: RecoConstants | None, rng: jax.Array):
        return loss_fn(model, batch, constants, rng)

    def train_iterator(self, config, process_index: int, process_count: int):
        """This process's training batches, with "memory_row" (self exclusion) or precomputed neighbours;
        from stored embeddings when `reco.train_embeddings_dirs` is set."""
        from vlm_jax.data import pipeline  # noqa: PLC0415

        reco = _reco_section(config)
        if reco["train_embeddings_dirs"]:
            from vlm_jax.methods.reco_pipeline import stored_pairs_iterator  # noqa: PLC0415

            return stored_pairs_iterator(self, config, process_index, process_count)
        pretrained = self.pretrained(config)
        source = pipeline.make_source(config.data)
        decoder = pipeline.make_decoder(config.data, pretrained.preprocess, pretrained.tokenizer)
        data = config.data
        dataset = pipeline.train_dataset(
            source, decoder, global_batch_size=int(config.global_batch_size), seed=int(config.seed),
            process_index=process_index, process_count=process_count, num_epochs=data.get("num_epochs"),
            shuffle=bool(data.get("shuffle", True)),
            **{name: int(data.get(name, pipeline.default_config()[name]))
               for name in ("worker_count", "worker_buffer_size", "read_threads", "read_buffer_size")})
        if reco["fusion"] != "none":
            memory = self.memory(reco["memory_dir"])
            if reco["training_retrieval"] == "precomputed":
                dataset = dataset.map(self._precomputed_neighbours(config, reco, source, memory))
            elif reco["exclude_self"]:
                dataset = dataset.map(AddMemoryRow(memory.ids))
        return iter(dataset)

    def _precomputed_neighbours(self, config, reco, source, memory) -> AddRetrieved:
        from vlm_jax.data import pipeline  # noqa: PLC0415
        from vlm_jax.evaluate.common import BatchedEncoder  # noqa: PLC0415

        pretrained = self.pretrained(config)
        batch_size = int(config.get("embed_batch_size", 256))
        count = len(source)
        image_queries = np.zeros((count, pretrained.config.embed_dim), np.float32)
        text_queries = np.zeros_like(image_queries)
        example_ids = np.full((count,), "", object)
        encode_image = BatchedEncoder(pretrained.model, "encode_image", batch_size)
        encode_text = BatchedEncoder(pretrained.model, "encode_text", batch_size)
        for batch in pipeline.make_eval_iterator(config.data, pretrained.preprocess, pretrained.tokenizer,
                                                 batch_size, process_index=0, process_count=1, source=source):
            rows = np.asarray(batch["index"])
            image_queries[rows] = encode_image(batch["image"])
            text_queries[rows] = encode_text(batch["text_ids"])
            if "id" in batch:
                example_ids[rows] = np.asarray(batch["id"])
        exclude = memory_rows_of(example_ids, memory.ids) if reco["exclude_self"] else None
        neighbours = precompute_neighbours(
            image_queries, text_queries, memory.image_embeddings, memory.text_embeddings, k=reco["k"],
            search=reco["search"], index_config=reco["index"], exclude_rows=exclude,
            dedup_threshold=reco["dedup_threshold"])
        return AddRetrieved(neighbours, memory.image_embeddings, memory.text_embeddings, search=reco["search"])

    def evaluators(self, config) -> dict[str, SideBySideEvaluator]:
        """Every `config.evals` evaluator, run with RECO and with the plain CLIP side by side (on stored
        embeddings when `reco.eval_embeddings_dir` is set)."""
        from vlm_jax.evaluate import suite  # noqa: PLC0415

        reco = _reco_section(config)
        if reco["eval_embeddings_dir"]:
            from vlm_jax.methods.reco_pipeline import stored_embedding_evaluators  # noqa: PLC0415

            return stored_embedding_evaluators(self, config)
        pretrained = self.pretrained(config)
        directory = reco["eval_memory_dir"] or reco["memory_dir"]
        evaluators = suite.build_evaluators(config.evals, pretrained.preprocess, pretrained.tokenizer)
        return {name: SideBySideEvaluator(evaluator, functools.partial(self.eval_memory, directory, reco))
                for name, evaluator in evaluators.items()}

    def eval_memory(self, directory: str, reco: Mapping[str, Any]) -> DeviceMemory | HostMemory:
        """The evaluation memory: on device (rows sharded over all devices) or a ScaNN host index."""
        from vlm_jax.train.sharding import make_mesh  # noqa: PLC0415

        key = f"placed:{directory}:{sorted(reco['index'].items())}:{reco['search']}"
        if key not in self._memories:
            memory = self.memory(directory)
            index = dict(reco["index"])
            backend = index.get("backend", "exact")
            if backend in HOST_BACKENDS:
                placed = HostMemory(memory.image_embeddings, memory.text_embeddings, index, search=reco["search"])
            else:
                mesh = make_mesh((("memory", -1),)) if jax.device_count() > 1 else None
                placed = place_memory(memory.image_embeddings, memory.text_embeddings, mesh=mesh, backend=backend,
                                      dtype=index.get("dtype", "float32"),
                                      recall_target=index.get("recall_target", 0.95))
            self._memories[key] = placed
        return self._memories[key]

    def export(self, model: RECO, workdir) -> None:
        """Writes the trained fusion to `<workdir>/export` (`export_fusion`); the CLIP stays where it is."""
        export_fusion(model, f"{workdir}/export")


# --------------------------------------------------------------------------------------------------
# 6. Export: the trained fusion beside its frozen CLIP
# --------------------------------------------------------------------------------------------------

FUSION_WEIGHTS = "reco_fusion.safetensors"
FUSION_CONFIG = "reco_config.json"


def _fusion_params(model: RECO) -> dict[str, np.ndarray]:
    """Every Param outside the CLIP, by path ("image_fusion/layers/0/...", "logit_scale")."""
    from vlm_jax.train.sharding import path_to_name  # noqa: PLC0415

    params = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_to_name(path)
        if not name.startswith("clip/"):
            params[name] = np.asarray(jax.device_get(value.get_value()))
    return params


def export_fusion(model: RECO, directory) -> None:
    """Writes the fusions and temperature (reco_fusion.safetensors) and the `RecoConfig`
    (reco_config.json) to `directory`; `load_fusion` puts them back on a CLIP."""
    import json  # noqa: PLC0415

    import safetensors.numpy  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415

    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {name: np.ascontiguousarray(value) for name, value in _fusion_params(model).items()}
    (directory / FUSION_WEIGHTS).write_bytes(safetensors.numpy.save(params))
    (directory / FUSION_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=1) + "\n")


def load_fusion(directory, clip: CLIP) -> RECO:
    """The RECO model `export_fusion` wrote, on `clip` (the frozen CLIP it was trained on); attach a
    memory (`RECO.attach_memory`) to use it."""
    import json  # noqa: PLC0415

    import safetensors.numpy  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415

    directory = epath.Path(directory)
    fields = json.loads((directory / FUSION_CONFIG).read_text())
    config = RecoConfig(**{**fields, "fusion_config": FusionConfig(**fields["fusion_config"])})
    model = RECO(clip, config, rngs=nnx.Rngs(0))
    stored = safetensors.numpy.load((directory / FUSION_WEIGHTS).read_bytes())
    expected = set(_fusion_params(model))
    if set(stored) != expected:
        raise ValueError(f"{directory / FUSION_WEIGHTS} holds {sorted(set(stored) ^ expected)[:4]} where the "
                         f"config in {FUSION_CONFIG} expects otherwise; export and config come from different runs.")
    from vlm_jax.train.sharding import path_to_name  # noqa: PLC0415

    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_to_name(path)
        if name in stored:
            variable.set_value(jnp.asarray(stored[name], variable.get_value().dtype))
    return model
