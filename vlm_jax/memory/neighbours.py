"""Neighbours searched once on the host, and which memory row holds a given example.

A frozen encoder over a fixed memory gives every example the same neighbours in every epoch, so
they can be searched once (`precompute_neighbours`, any `vlm_jax.memory.index` backend on the
host; `search_all`, the placed device table where it lives) and read from the batch instead of
searched in the train step.

Training on data that is also in the memory would retrieve each example itself; the example's
own memory row is found by id (`memory_rows_of`, `MemoryRowLookup`, `self_match_rows`) and
excluded from its search. Ids compare as text: b"a", "a" and np.str_("a") are one id, and so are
7 and "7".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.memory.index import IndexConfig, build_index
from vlm_jax.memory.store import Memory

_QUERIES_PER_SEARCH = 1 << 14  # queries converted and searched at a time: host memory stays bounded


def precompute_neighbours(
    queries: np.ndarray,
    keys: np.ndarray,
    *,
    k: int,
    index_config: IndexConfig | Mapping[str, Any] | str = "exact",
    exclude_rows: np.ndarray | None = None,
    dedup_threshold: float | None = None,
    batch_size: int = _QUERIES_PER_SEARCH,
) -> np.ndarray:
    """The k rows of `keys` nearest each query, searched on the host with any index backend.

    Args:
      queries: float [M, D] (numpy or a memory map), e.g. a training set's frozen embeddings.
      keys: float [N, D] the memory's embeddings of the searched modality.
      k: neighbours per query.
      index_config: `vlm_jax.memory.index.IndexConfig` (or its fields, or a backend name).
      exclude_rows: int [M] or [M, E] rows of `keys` to drop per query (-1: none), e.g. `self_match_rows`.
      dedup_threshold: drop rows with cosine >= this with the query (None: keep all).
      batch_size: queries read and searched per step.

    Returns:
      int32 [M, k] rows of `keys`, best first; -1 where fewer than k remain.
    """
    config = dataclasses.replace(IndexConfig.from_any(index_config), dedup_threshold=dedup_threshold)
    index = build_index(config, keys)
    if exclude_rows is not None:
        exclude_rows = np.asarray(exclude_rows)
        if len(exclude_rows) != len(queries):
            raise ValueError(f"expected exclude_rows for each of the {len(queries)} queries, got {len(exclude_rows)}.")
    neighbours = np.empty((len(queries), k), np.int32)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        exclude = None if exclude_rows is None else exclude_rows[start:stop]
        neighbours[start:stop] = index.search(np.asarray(queries[start:stop]), k, exclude_ids=exclude)[1]
    return neighbours


_SCORES_PER_SEARCH = 1 << 26  # float32 scores [batch, rows per shard] one search step may hold: 256 MB


def search_all(retriever, queries: np.ndarray, key_modality: str, *, k: int, exclude_rows: np.ndarray | None = None,
               dedup_threshold: float | None = None, batch_size: int | None = None) -> np.ndarray:
    """The k memory rows nearest each query, searched by a placed retriever (`device.DeviceRetriever`)
    in fixed-size jitted batches: a memory already on device is searched where it is, never copied.

    queries: float [M, D] (numpy, memory map or `store.Rows`); exclude_rows int [M] or [M, E].
    batch_size: queries per step (None: as many as keep each shard's [batch, rows] scores at 256 MB).
    Returns int32 [M, k] (-1 where missing).
    """
    if batch_size is None:
        table = retriever.table
        rows_per_shard = table.image_embeddings.shape[0] // max(1, len(table.image_embeddings.sharding.device_set))
        batch_size = int(min(4096, max(8, _SCORES_PER_SEARCH // max(rows_per_shard, 1))))
    @functools.partial(jax.jit, static_argnames=("has_exclude",))
    def search(retriever, batch, exclude, has_exclude):
        return retriever.search(batch, key_modality, k, exclude_rows=exclude if has_exclude else None,
                                dedup_threshold=dedup_threshold)

    neighbours = np.empty((len(queries), k), np.int32)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        batch = np.zeros((batch_size, queries.shape[1]), np.float32)
        batch[: stop - start] = queries[start:stop]
        exclude = np.full((batch_size, 1), -1, np.int32)
        if exclude_rows is not None:
            rows = np.asarray(exclude_rows[start:stop], np.int32).reshape(stop - start, -1)
            exclude = np.full((batch_size, rows.shape[1]), -1, np.int32)
            exclude[: stop - start] = rows
        found = search(retriever, jnp.asarray(batch), jnp.asarray(exclude), exclude_rows is not None)
        neighbours[start:stop] = np.asarray(found)[: stop - start]
    return neighbours


def neighbours_of_stored(parts: Sequence[Memory], query_field: str, memory: Memory, key_field: str, *, k: int,
                         index_config: IndexConfig | Mapping[str, Any] | str = "exact", retriever=None,
                         exclude_rows: np.ndarray | None = None, dedup_threshold: float | None = None) -> np.ndarray:
    """Neighbours in `memory`'s `key_field` of every row of the stored parts' `query_field`, part
    after part (rows of their concatenation): with a placed `retriever` through `search_all`, else
    through a host index of `index_config` (`precompute_neighbours`). Returns int32 [sum M, k]."""
    found, start = [], 0
    for part in parts:
        queries = part.rows(query_field)
        exclude = None if exclude_rows is None else exclude_rows[start : start + len(queries)]
        start += len(queries)
        if retriever is not None:
            found.append(search_all(retriever, queries, key_field.split("_")[0], k=k, exclude_rows=exclude,
                                    dedup_threshold=dedup_threshold))
        else:
            found.append(precompute_neighbours(np.asarray(queries), getattr(memory, key_field), k=k,
                                               index_config=index_config, exclude_rows=exclude,
                                               dedup_threshold=dedup_threshold))
    return np.concatenate(found)


def id_key(value: Any) -> str:
    """An example id as the text ids are compared by (bytes decoded as UTF-8, numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class MemoryRowLookup:
    """Example ids -> the memory rows holding them (-1 where absent).

    `rows(example_ids)` maps an id array; called on a batch dict (a data-pipeline batch map) it adds
    "memory_row" int32 [B] for the batch's "id" [B], the row a search of that example excludes.
    """

    def __init__(self, memory_ids: Sequence[Any]):
        """memory_ids: [N] ids of the memory's pairs in row order (str, bytes or int)."""
        self.row_of = {id_key(memory_id): row for row, memory_id in enumerate(memory_ids)}

    def rows(self, example_ids: Sequence[Any]) -> np.ndarray:
        """example_ids [B] -> int32 [B]."""
        example_ids = np.asarray(example_ids, dtype=object).reshape(-1)
        return np.asarray([self.row_of.get(id_key(example_id), -1) for example_id in example_ids], np.int32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "id" not in batch:
            raise KeyError(f"looking up memory rows needs example ids in the batch, found keys {sorted(batch)}; "
                           "set data.id_key to the corpus's id field.")
        return {**batch, "memory_row": self.rows(batch["id"])}


def memory_rows_of(example_ids: Sequence[Any], memory_ids: Sequence[Any]) -> np.ndarray:
    """int32 [B]: the memory row holding each of example_ids [B] (matched with memory_ids [N]), -1 where absent."""
    return MemoryRowLookup(memory_ids).rows(example_ids)


def _positional_ids(memory: Memory) -> bool:
    """Whether the memory's ids are only its source positions (its corpus had no id field)."""
    return bool(np.array_equal(np.asarray(memory.ids, str), np.asarray(memory.indices).astype(str)))


def _source_identity(memory: Memory) -> dict[str, Any]:
    data = dict(memory.manifest["config"]["data"])
    return {key: data.get(key) for key in ("source", "dataset", "tfds_name", "split", "data_dir", "paths", "root")}


def self_match_rows(examples: Memory, memory: Memory) -> np.ndarray:
    """int32 [M]: the row of `memory` holding each of the M stored `examples` (-1: not in the memory).

    Examples match by id. Ids that are only source positions (on either side) mean something only
    within one source: then examples match by source position if both were built from the same
    source, and nothing matches otherwise.
    """
    if _positional_ids(examples) or _positional_ids(memory):
        if _source_identity(examples) != _source_identity(memory):
            return np.full((examples.num_rows,), -1, np.int32)
        return memory_rows_of(examples.indices, memory.indices)
    return memory_rows_of(examples.ids, memory.ids)


def rows_per_label(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted memory rows of `count` examples per label, drawn with `seed` (every row of a label
    with fewer): a few-shot memory (RAR's N shots per class)."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == label))[:count] for label in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def first_distinct(values: np.ndarray, k: int) -> np.ndarray:
    """int [Q, n] values of neighbours in rank order (-1: none) -> int [Q, k]: the first k distinct
    ones in rank order (-1 where fewer remain), e.g. the class labels of a query's neighbours."""
    out = np.full((len(values), k), -1, np.int64)
    for row, row_values in enumerate(values):
        kept = list(dict.fromkeys(int(value) for value in row_values if value >= 0))[:k]
        out[row, : len(kept)] = kept
    return out

