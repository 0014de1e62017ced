"""Memory search on the host, callable from inside jit: `HostRetriever`.

The interface of `vlm_jax.memory.device.DeviceRetriever` (`search` -> ids, `gather` -> values) for
memories searched by a host index (ScaNN, or any `vlm_jax.memory.index` backend) and kept in host
memory (numpy arrays or memory maps of the memory's shards, in their stored dtype).

Inside jit both run through `jax.pure_callback`. Cost: every search moves the queries (B x D)
device -> host, every gather the values (B x k x D float32) host -> device, and the device waits
for the host; the callback sees the whole global batch on one host, so in a multi-host job every
process searches every query. Right for memories larger than accelerator memory and for
evaluation; for training on a fixed memory prefer neighbours precomputed once
(`vlm_jax.memory.neighbours.precompute_neighbours`). A device backend ("exact", "approx") behind
the callback launches a second JAX computation from inside the first: fine on CPU (and in tests),
but on accelerators search the host with "scann" and leave device search to `DeviceRetriever`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.memory.device import MODALITIES
from vlm_jax.memory.index import IndexConfig, MemoryIndex, build_index
from vlm_jax.memory.store import unit_rows


class HostRetriever:
    """Search and gather over host-resident embeddings, one index per key modality.

    Each index is built on its first search (thread-safe), so a job that only encodes images never
    builds or holds the text index; `build_indexes` builds them up front. Hashed by identity (it
    sits in a graphdef as a static attribute): a new HostRetriever means a new compilation.
    """

    def __init__(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                 index_config: IndexConfig | Mapping[str, Any] | str = "scann"):
        """image_embeddings, text_embeddings: float [N, D] (numpy or memory maps), row i of both is pair i."""
        image_embeddings, text_embeddings = np.asanyarray(image_embeddings), np.asanyarray(text_embeddings)
        if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
            raise ValueError(f"expected image and text embeddings of one shape [N, D], got "
                             f"{image_embeddings.shape} and {text_embeddings.shape}.")
        self.embeddings = {"image": image_embeddings, "text": text_embeddings}
        self.config = IndexConfig.from_any(index_config)
        self.num_rows, self.dim = image_embeddings.shape
        self.indexes: dict[str, MemoryIndex] = {}  # key modality -> built index
        self._lock = threading.Lock()

    def index(self, key_modality: str) -> MemoryIndex:
        """The index over the `key_modality` embeddings, built on first use."""
        if key_modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {key_modality!r}.")
        with self._lock:
            if key_modality not in self.indexes:
                self.indexes[key_modality] = build_index(self.config, self.embeddings[key_modality])
            return self.indexes[key_modality]

    def build_indexes(self, key_modalities: Sequence[str] = MODALITIES) -> "HostRetriever":
        """Builds the indexes of `key_modalities` now (e.g. before timing a search)."""
        for modality in key_modalities:
            self.index(modality)
        return self

    def search_numpy(self, queries: np.ndarray, key_modality: str, k: int, exclude_rows: np.ndarray | None = None,
                     dedup_threshold: float | None = None) -> np.ndarray:
        """Host search: queries float [B, D] -> ids int32 [B, k] (-1: none).

        exclude_rows int [B] or [B, E] drops rows per query (-1: none); dedup_threshold drops rows
        with cosine >= it (it replaces the index config's own).
        """
        index = self.index(key_modality)
        if dedup_threshold != index.config.dedup_threshold:
            index = index.with_search_config(dedup_threshold=dedup_threshold)
        _, ids = index.search(np.asarray(queries), k, exclude_ids=exclude_rows)
        return ids.astype(np.int32)

    def gather_numpy(self, ids: np.ndarray, value_modality: str) -> np.ndarray:
        """The `value_modality` rows at ids int [B, k] -> float32 [B, k, D], zeros where id < 0."""
        if value_modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {value_modality!r}.")
        ids = np.asarray(ids)
        rows = self.embeddings[value_modality]
        # Fancy indexing reads only these rows of a memory map. They are made unit in the stored dtype,
        # as `place_memory` does, so host and device gathers agree to the bit.
        values = unit_rows(rows[np.maximum(ids.reshape(-1), 0)], rows.dtype).astype(np.float32)
        values = values.reshape(*ids.shape, self.dim)
        return np.where((ids >= 0)[..., None], values, np.float32(0.0))

    def search(self, queries: jax.Array, key_modality: str, k: int, exclude_rows: jax.Array | None = None,
               dedup_threshold: float | None = None) -> jax.Array:
        """`search_numpy` from inside jit: float [B, D] -> int32 [B, k]."""
        operands = (jnp.asarray(queries, jnp.float32),)
        if exclude_rows is not None:
            operands += (jnp.asarray(exclude_rows, jnp.int32),)

        def callback(queries, *exclude):
            return self.search_numpy(queries, key_modality, k, exclude[0] if exclude else None, dedup_threshold)

        shape = jax.ShapeDtypeStruct((queries.shape[0], k), jnp.int32)
        return jax.pure_callback(callback, shape, *operands)

    def gather(self, ids: jax.Array, value_modality: str) -> jax.Array:
        """`gather_numpy` from inside jit: ids int [B, k] -> float32 [B, k, D]."""
        ids = jnp.asarray(ids, jnp.int32)
        shape = jax.ShapeDtypeStruct((*ids.shape, self.dim), jnp.float32)
        return jax.pure_callback(functools.partial(self.gather_numpy, value_modality=value_modality), shape, ids)
