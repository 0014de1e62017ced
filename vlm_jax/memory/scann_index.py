"""The "scann" memory backend: ScaNN on the host (`vlm_jax.memory.index` has the interface and semantics).

A k-means tree (sqrt(N) leaves by default, spherical, SOAR spilling), anisotropic quantization (AH) and
exact reordering; memories below `min_rows_for_tree` rows are searched by ScaNN's brute force (logged).
`leaves_to_search` and `reorder_k` are query-time settings (`with_search_config`), no rebuild.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from absl import logging

from vlm_jax.memory.host_index import HostIndex
from vlm_jax.memory.index import IndexConfig, register_index


def _resolve_scann(config: IndexConfig, num_rows: int) -> IndexConfig:
    """Fills unset ScaNN fields from the memory size N.

    num_leaves ~ sqrt(N) (each leaf holds ~sqrt(N) rows), leaves_to_search = 5% of the leaves with SOAR
    and 10% without (never fewer than 8), training sample = min(N, 250k), reorder_k = 200.
    """
    num_leaves = config.num_leaves or max(2, round(math.sqrt(num_rows)))
    fraction = 0.05 if config.soar_lambda is not None else 0.1
    leaves_to_search = config.leaves_to_search or min(num_leaves, max(8, math.ceil(fraction * num_leaves)))
    return dataclasses.replace(
        config,
        num_leaves=num_leaves,
        leaves_to_search=leaves_to_search,
        training_sample_size=config.training_sample_size or min(num_rows, 250_000),
        reorder_k=config.reorder_k or 200,
    )


@register_index("scann")
class ScannIndex(HostIndex):
    """ScaNN tree + AH + exact reordering on the host (brute force for memories below min_rows_for_tree)."""

    def __init__(self, config: IndexConfig, searcher, num_rows: int, dim: int):
        super().__init__(config, num_rows, dim)
        self.searcher = searcher
        self.uses_tree = config.num_leaves is not None
        self._pool_threads = 0  # the searcher's pool as last sized here (0: ScaNN's default, every core)

    @classmethod
    def build(cls, config, keys, mesh):
        from scann.scann_ops.py import scann_ops_pybind

        num_rows = keys.shape[0]
        builder = scann_ops_pybind.builder(keys, 10, "dot_product").set_n_training_threads(config.num_threads)
        if num_rows < config.min_rows_for_tree:
            logging.warning(
                "memory of %d rows is below min_rows_for_tree=%d: ScaNN searches it by brute force (exact).",
                num_rows,
                config.min_rows_for_tree,
            )
            config = dataclasses.replace(config, num_leaves=None, leaves_to_search=None, training_sample_size=None)
            searcher = builder.score_brute_force().build()
        else:
            config = _resolve_scann(config, num_rows)
            searcher = (
                builder.tree(
                    num_leaves=config.num_leaves,
                    num_leaves_to_search=config.leaves_to_search,
                    training_sample_size=config.training_sample_size,
                    spherical=config.spherical,
                    soar_lambda=config.soar_lambda,
                    overretrieve_factor=config.overretrieve_factor if config.soar_lambda is not None else None,
                )
                .score_ah(
                    config.dims_per_block,
                    anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
                    training_sample_size=config.training_sample_size,
                )
                .reorder(config.reorder_k)
                .build()
            )
        return cls(config, searcher, num_rows, keys.shape[1])

    @classmethod
    def _restore_assets(cls, directory, config, num_rows, dim):
        from scann.scann_ops.py import scann_ops_pybind

        return cls(config, scann_ops_pybind.load_searcher(str(directory / "scann")), num_rows, dim)

    def _save_assets(self, directory):
        assets = directory / "scann"
        assets.mkdir(parents=True, exist_ok=True)
        # Relative asset paths keep the saved index valid after the directory is moved or copied.
        self.searcher.serialize(str(assets), relative_path=True)

    def _append(self, keys):
        # The wrapper's upsert needs docids, which would make every search answer Python lists of
        # them; the searcher it wraps appends rows under its next ids (leaf, quantized codes, reorder data).
        self.searcher.searcher.upsert([None] * len(keys), keys, len(keys))

    def _host_search(self, queries, fetch):
        kwargs = {"final_num_neighbors": fetch}
        if self.uses_tree:
            kwargs["pre_reorder_num_neighbors"] = max(self.config.reorder_k, fetch)
            kwargs["leaves_to_search"] = self.config.leaves_to_search
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.config.num_threads == 1:
            ids, scores = self.searcher.search_batched(queries, **kwargs)
        else:
            if self.config.num_threads != self._pool_threads:  # a config changed after the build sizes it anew
                self.searcher.set_num_threads(self.config.num_threads or len(os.sched_getaffinity(0)))
                self._pool_threads = self.config.num_threads
            ids, scores = self.searcher.search_batched_parallel(queries, **kwargs)
        # ScaNN fills the slots it could not fill with NaN scores.
        missing = np.isnan(scores)
        return np.where(missing, -np.inf, scores).astype(np.float32), np.where(missing, -1, ids.astype(np.int64))
