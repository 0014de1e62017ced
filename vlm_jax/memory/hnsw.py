"""The "hnsw" memory backend: FAISS's HNSW graph over the flat keys, on the host.

    index = build_index({"backend": "hnsw", "hnsw_ef_search": 128}, keys)

`faiss.IndexHNSWFlat` with the inner-product metric, so scores are cosines on normalized keys and dot
products otherwise, exact for every neighbour found (the graph holds the keys uncompressed). The graph
degree `hnsw_m` and build beam `hnsw_ef_construction` are fixed when it is built; the search beam
`hnsw_ef_search` is a query-time setting (`with_search_config`, `load_index(..., hnsw_ef_search=...)`).
Exclusion and dedup follow the host-backend rule of `vlm_jax.memory.index`. Builds and searches run on
`num_threads` OpenMP threads (0: every core of this process). Needs the optional extra
`pip install "vlm_jax[hnsw]"` (faiss-cpu).
"""

from __future__ import annotations

import os

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.memory.host_index import HostIndex
from vlm_jax.memory.index import register_index

_GRAPH_FILE = "hnsw.faiss"


def import_faiss():
    """The faiss module, or a one-line UserError naming the extra that installs it."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UserError('the "hnsw" memory backend needs faiss; install it with pip install "vlm_jax[hnsw]".') from None
    return faiss


def _use_threads(faiss, num_threads: int) -> None:
    # OpenMP's thread count is process-wide, so it is set before every build and search.
    faiss.omp_set_num_threads(num_threads or len(os.sched_getaffinity(0)))


@register_index("hnsw")
class HnswIndex(HostIndex):
    """An HNSW graph (faiss) over the memory's keys; see the module docstring."""

    def __init__(self, config, graph, num_rows: int, dim: int):
        super().__init__(config, num_rows, dim)
        self.graph = graph

    @classmethod
    def build(cls, config, keys, mesh):
        faiss = import_faiss()
        _use_threads(faiss, config.num_threads)
        graph = faiss.IndexHNSWFlat(keys.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.hnsw_ef_construction
        graph.add(np.ascontiguousarray(keys, dtype=np.float32))
        return cls(config, graph, *keys.shape)

    @classmethod
    def _restore_assets(cls, directory, config, num_rows, dim):
        graph = import_faiss().read_index(str(directory / _GRAPH_FILE))
        if (graph.ntotal, graph.d) != (num_rows, dim):
            raise ValueError(f"{_GRAPH_FILE} in {str(directory)!r} holds {graph.ntotal} rows of width {graph.d}, "
                             f"index.json says {(num_rows, dim)}; save the index again.")
        return cls(config, graph, num_rows, dim)

    def _save_assets(self, directory):
        import_faiss().write_index(self.graph, str(directory / _GRAPH_FILE))

    def _append(self, keys):
        faiss = import_faiss()
        _use_threads(faiss, self.config.num_threads)
        self.graph.add(keys)

    def _host_search(self, queries, fetch):
        faiss = import_faiss()
        _use_threads(faiss, self.config.num_threads)
        # Per-call parameters: views from with_search_config share the graph but not its efSearch.
        params = faiss.SearchParametersHNSW(efSearch=max(self.config.hnsw_ef_search, fetch))
        scores, ids = self.graph.search(np.ascontiguousarray(queries, dtype=np.float32), fetch, params=params)
        # faiss marks unfilled slots with id -1 (and score -FLT_MAX).
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)
