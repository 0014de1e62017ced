"""Memory search on the accelerator: one sharded top-k, for in-jit retrieval and for the device indexes.

    table = place_memory(image_embeddings, text_embeddings, mesh=mesh)   # numpy or memory maps [N, D]
    retriever = DeviceRetriever(table)
    ids = retriever.search(image_queries, "image", k=10)                 # int32 [B, k], inside jit
    texts = retriever.gather(ids, "text")                                 # float32 [B, k, D]

Layout. A table holds unit rows [N_padded, D] in their stored dtype (float32, float16 or bfloat16),
sharded by rows over `axes` of `mesh`: shard s holds rows [s * R, (s + 1) * R) with R = N_padded / S
and S the product of those axes' sizes (in the order `axes` lists them). Rows >= num_rows are zero
padding that never wins. Row i of the image and of the text table are pair i; a row's id is i.

Search (`top_k`). Each shard scores its rows (queries cast to the table's dtype, float32
accumulation), drops padding, excluded rows and near-duplicates (only the masks that apply: each is
a pass over the [B, R] scores, as costly as the top-k itself), keeps its own top-k, and the shards'
candidates are all-gathered so every device takes the same global top-k: results are replicated.
`approximate` uses `jax.lax.approx_max_k` per shard (TPU's partial reduction; exact elsewhere).
Values (`gather_rows`) are read where they live: each shard gathers the ids it owns, zeros for the
others, and the shards' results are summed; the table itself never moves.

Mesh axes. One convention, the trainer's: Auto (GSPMD) axes, as `vlm_jax.train.sharding.make_mesh`
builds them and `default_mesh` here does. The sharded steps run in `jax.shard_map` with explicit
specs and return replicated arrays, so they need no sharding-in-types; a mesh with Explicit axes
is searched the same way, but nothing in this module builds one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax.memory import store
from vlm_jax.models.layers import l2_normalize

MODALITIES = ("image", "text")


def default_mesh() -> Mesh:
    """A 1-D mesh ("memory",) over every device, its axis Auto."""
    return jax.make_mesh((jax.device_count(),), ("memory",), axis_types=(AxisType.Auto,))


def num_shards(mesh: Mesh | None, axes: Sequence[str]) -> int:
    """How many row blocks a table sharded over `axes` of `mesh` has (1 without a mesh)."""
    return math.prod(mesh.shape[axis] for axis in axes) if mesh is not None else 1


def _resolve_axes(mesh: Mesh | None, axes: Sequence[str] | str | None) -> tuple[str, ...]:
    if isinstance(axes, str):
        axes = (axes,)
    if mesh is None:
        if axes:
            raise ValueError(f"memory axes {tuple(axes)} were given without a mesh; pass the mesh they belong to.")
        return ()
    axes = tuple(mesh.axis_names if axes is None else axes)
    missing = sorted(set(axes) - set(mesh.axis_names))
    if missing:
        raise ValueError(f"memory axes {missing} are not axes of the mesh {mesh.axis_names}.")
    return axes


_PLACE_CHUNK_ROWS = 1 << 16  # rows converted on the host and copied per step when placing on one device


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(table: jax.Array, rows: jax.Array, start: int) -> jax.Array:
    return jax.lax.dynamic_update_slice(table, rows, (start, 0))


def place_rows(
    rows: np.ndarray,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    dtype: str | np.dtype | None = None,
    normalize: bool = True,
) -> jax.Array:
    """Places rows [N, D] (numpy or a memory map) on device, padded to [N_padded, D] and row-sharded.

    Each shard is read, converted and padded on its own (`jax.make_array_from_callback`), so the
    host never holds more than one shard beyond `rows` itself. Devices that replicate a shard (mesh
    axes outside `axes`) read it again rather than keeping it on the host.

    Args:
      rows: float [N, D], N >= 1.
      mesh: shard over `axes` of it (None: the default device, unsharded).
      axes: mesh axes to shard the rows over (None: every axis of the mesh).
      dtype: dtype on device (None: the stored dtype).
      normalize: scale rows to unit norm (chunks already unit are used as they are).

    Returns:
      `dtype` [N_padded, D], N_padded the smallest multiple of the shard count >= N.
    """
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"expected memory rows of shape [N, D] with N >= 1, got {rows.shape}.")
    axes = _resolve_axes(mesh, axes)
    dtype = jnp.dtype(rows.dtype if dtype is None else dtype)
    num_rows, dim = rows.shape
    shards = num_shards(mesh, axes)
    padded_rows = -(-num_rows // shards) * shards

    def block(start: int, stop: int) -> np.ndarray:
        values = rows[min(start, num_rows) : min(stop, num_rows)]
        values = store.unit_rows(values, dtype) if normalize else np.asarray(values, dtype)
        if len(values) < stop - start:
            values = np.concatenate([values, np.zeros((stop - start - len(values), dim), dtype)])
        return values

    if mesh is None:
        # Filled chunk by chunk into one donated buffer: the host holds one chunk, never the whole
        # table in the device dtype. Uncommitted, so a jit that also takes mesh-sharded arguments
        # may move it where it needs it.
        table = jnp.zeros((padded_rows, dim), dtype)
        for start in range(0, num_rows, _PLACE_CHUNK_ROWS):
            stop = min(start + _PLACE_CHUNK_ROWS, num_rows)
            table = _write_rows(table, jnp.asarray(block(start, stop)), start)
        return table

    def shard(index: tuple[slice, slice]) -> np.ndarray:
        start, stop, _ = index[0].indices(padded_rows)
        return block(start, stop)[:, index[1]]

    return jax.make_array_from_callback((padded_rows, dim), NamedSharding(mesh, P(axes, None)), shard)


@flax.struct.dataclass
class MemoryTable:
    """A placed memory: unit rows in their stored dtype, row-sharded over `axes` of `mesh`.

    image_embeddings, text_embeddings: [N_padded, D]; row i of both is pair i, rows >= num_rows are
    zero padding. The static fields ride in the treedef (jit hashes them).
    """

    image_embeddings: jax.Array
    text_embeddings: jax.Array
    num_rows: int = flax.struct.field(pytree_node=False)
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    def embeddings(self, modality: str) -> jax.Array:
        """The [N_padded, D] rows of `modality` ("image" or "text")."""
        if modality == "image":
            return self.image_embeddings
        if modality == "text":
            return self.text_embeddings
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")


def place_memory(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    dtype: str | np.dtype | None = None,
) -> MemoryTable:
    """Places a memory's paired embeddings (float [N, D] each, numpy or memory maps) for in-jit search.

    Rows are held once, in `dtype` (None: as stored), sharded over `axes` of `mesh` (None: every
    axis; no mesh: one device); see `place_rows` for how they travel.
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(f"expected image and text embeddings of one shape [N, D], got {image_embeddings.shape} "
                         f"and {text_embeddings.shape}.")
    axes = _resolve_axes(mesh, axes)
    place = functools.partial(place_rows, mesh=mesh, axes=axes, dtype=dtype)
    return MemoryTable(place(image_embeddings), place(text_embeddings), num_rows=image_embeddings.shape[0],
                       mesh=mesh, axes=axes)


def _block_top_k(queries, keys, exclude_rows, first_row, *, k, num_rows, padded, dedup_threshold, approximate,
                 recall_target):
    """Top-k of one block of rows: scores float32 [B, k'] and global row ids int32 [B, k'], k' <= k."""
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
        # Rows outside this block (and -1) map to an out-of-range column that mode="drop" ignores;
        # a negative column would wrap around to the end of the block.
        local = exclude_rows - first_row
        local = jnp.where((exclude_rows >= 0) & (local >= 0) & (local < rows), local, rows)
        scores = scores.at[jnp.arange(scores.shape[0])[:, None], local].set(-jnp.inf, mode="drop")
    local_k = min(k, rows)
    if approximate:
        top_scores, columns = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target)
    else:
        top_scores, columns = jax.lax.top_k(scores, local_k)
    return top_scores, columns.astype(jnp.int32) + first_row


def top_k(
    queries: jax.Array,
    keys: jax.Array,
    k: int,
    *,
    num_rows: int,
    mesh: Mesh | None = None,
    axes: Sequence[str] = (),
    exclude_rows: jax.Array | None = None,
    dedup_threshold: float | None = None,
    approximate: bool = False,
    recall_target: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """The k best-scoring rows of `keys` for each query (dot products); usable inside jit.

    Args:
      queries: float [B, D] (cast to the keys' dtype for the matmul).
      keys: [N_padded, D] rows, sharded over `axes` of `mesh` as `place_rows` lays them out.
      k: neighbours per query, >= 1.
      num_rows: N, the rows that are not padding.
      mesh, axes: the keys' layout (no mesh or no axes: one dense search).
      exclude_rows: int [B] or [B, E] rows to drop per query; -1 entries drop nothing.
      dedup_threshold: drop rows scoring >= this with the query (None: keep all).
      approximate, recall_target: `jax.lax.approx_max_k` per shard at this recall instead of top_k.

    Returns:
      scores float32 [B, k] best first and ids int32 [B, k]; a slot without a neighbour (k larger
      than what remains) has score -inf and id -1.
    """
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}.")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if exclude_rows is not None:
        exclude_rows = jnp.asarray(exclude_rows, jnp.int32)
        exclude_rows = exclude_rows[:, None] if exclude_rows.ndim == 1 else exclude_rows
        exclude_rows = exclude_rows if exclude_rows.shape[1] else None
    block_top_k = functools.partial(
        _block_top_k, k=k, num_rows=num_rows, padded=keys.shape[0] > num_rows, dedup_threshold=dedup_threshold,
        approximate=approximate, recall_target=recall_target)
    if mesh is None or not axes:
        scores, ids = block_top_k(queries, keys, exclude_rows, 0)
    else:
        shards = num_shards(mesh, axes)
        if keys.shape[0] % shards:
            raise ValueError(f"expected keys padded to a multiple of the {shards} shards of axes {axes}, got "
                             f"{keys.shape[0]} rows; place them with place_rows or place_memory.")
        rows_per_shard = keys.shape[0] // shards

        def shard_top_k(queries, keys, *exclude):
            first_row = jax.lax.axis_index(axes) * rows_per_shard
            scores, ids = block_top_k(queries, keys, exclude[0] if exclude else None, first_row)
            scores, ids = jax.lax.all_gather((scores, ids), axes, axis=1, tiled=True)
            scores, order = jax.lax.top_k(scores, min(k, scores.shape[1]))
            return scores, jnp.take_along_axis(ids, order, axis=1)

        operands = (queries, keys) + (() if exclude_rows is None else (exclude_rows,))
        scores, ids = jax.shard_map(
            shard_top_k,
            mesh=mesh,
            in_specs=(P(), P(axes, None)) + (P(),) * (len(operands) - 2),
            out_specs=(P(), P()),
            # Every device merges the same all-gathered candidates: the outputs are replicated.
            check_vma=False,
        )(*operands)
    missing = k - scores.shape[1]
    if missing:
        scores = jnp.pad(scores, ((0, 0), (0, missing)), constant_values=-jnp.inf)
        ids = jnp.pad(ids, ((0, 0), (0, missing)))
    return scores, jnp.where(jnp.isfinite(scores), ids, -1).astype(jnp.int32)


def gather_rows(rows: jax.Array, ids: jax.Array, *, mesh: Mesh | None = None, axes: Sequence[str] = ()) -> jax.Array:
    """rows [N_padded, D] (sharded over `axes` of `mesh`), ids int [B, k] -> float32 [B, k, D].

    Zeros where id < 0. Sharded, each shard reads the ids it owns and the shards' results are
    summed (one of them is non-zero per slot, so the sum is exact); the table is never gathered.
    """
    ids = jnp.asarray(ids, jnp.int32)
    axes = (axes,) if isinstance(axes, str) else tuple(axes)

    def take(rows, ids, first_row):
        local = ids - first_row
        owned = (ids >= 0) & (local >= 0) & (local < rows.shape[0])
        values = jnp.take(rows, jnp.where(owned, local, 0), axis=0).astype(jnp.float32)
        return jnp.where(owned[..., None], values, 0.0)

    if mesh is None or not axes:
        return take(rows, ids, 0)
    rows_per_shard = rows.shape[0] // num_shards(mesh, axes)

    def shard_gather(rows, ids):
        return jax.lax.psum(take(rows, ids, jax.lax.axis_index(axes) * rows_per_shard), axes)

    return jax.shard_map(shard_gather, mesh=mesh, in_specs=(P(axes, None), P()), out_specs=P())(rows, ids)


@flax.struct.dataclass
class DeviceRetriever:
    """Search and gather over a `MemoryTable`, inside jit; a pytree, so it can be a jit argument
    (e.g. a train step's constants) without becoming a program constant."""

    table: MemoryTable
    approximate: bool = flax.struct.field(pytree_node=False, default=False)
    recall_target: float = flax.struct.field(pytree_node=False, default=0.95)

    def search(self, queries: jax.Array, key_modality: str, k: int, exclude_rows: jax.Array | None = None,
               dedup_threshold: float | None = None) -> jax.Array:
        """Rows of the `key_modality` table nearest each query: float [B, D] -> int32 [B, k] (-1: none).

        Queries are scaled to unit norm, so scores (and `dedup_threshold`) are cosines; exclude_rows
        int [B] or [B, E] drops rows per query (-1: none).
        """
        table = self.table
        _, ids = top_k(l2_normalize(queries, eps=1e-12), table.embeddings(key_modality), k, num_rows=table.num_rows,
                       mesh=table.mesh, axes=table.axes, exclude_rows=exclude_rows, dedup_threshold=dedup_threshold,
                       approximate=self.approximate, recall_target=self.recall_target)
        return ids

    def gather(self, ids: jax.Array, value_modality: str) -> jax.Array:
        """The `value_modality` rows at ids int [B, k] -> float32 [B, k, D], zeros where id < 0."""
        return gather_rows(self.table.embeddings(value_modality), ids, mesh=self.table.mesh, axes=self.table.axes)
