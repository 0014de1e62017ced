"""The host side of host-searched backends (ScaNN, HNSW): exclusion and dedup by over-retrieval, rows
appended after the build. Semantics: `vlm_jax.memory.index`."""

from __future__ import annotations

import abc

import numpy as np
from etils import epath

from vlm_jax.memory.index import IndexConfig, MemoryIndex

_ROW_IDS_FILE = "row_ids.npy"


class HostIndex(MemoryIndex):
    """A backend searched on the host, with exclusion and dedup by over-retrieval (module docstring).

    Rows can be appended after the build (`add`), under any memory row ids: `row_ids` then maps the
    backend's own ids (rows in the order they were added) to memory rows.
    """

    def __init__(self, config: IndexConfig, num_rows: int, dim: int):
        super().__init__(config, num_rows, dim)
        self.row_ids: np.ndarray | None = None  # int64 [num_rows]; None: the backend's ids are the rows

    @classmethod
    @abc.abstractmethod
    def _restore_assets(cls, directory: epath.Path, config: IndexConfig, num_rows: int, dim: int) -> "HostIndex":
        """Reads what `_save_assets` wrote."""

    @abc.abstractmethod
    def _save_assets(self, directory: epath.Path) -> None:
        """Writes the backend's own files into `directory`."""

    @abc.abstractmethod
    def _append(self, keys: np.ndarray) -> None:
        """Adds keys float32 [M, D] to the built index under its next M ids."""

    @abc.abstractmethod
    def _host_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The `fetch` best rows per query: scores float32 [B, fetch] sorted descending and the
        backend's ids int64 [B, fetch], id -1 in the slots the search could not fill."""

    @classmethod
    def restore(cls, directory, config, num_rows, dim, mesh):
        index = cls._restore_assets(directory, config, num_rows, dim)
        if (directory / _ROW_IDS_FILE).exists():
            with (directory / _ROW_IDS_FILE).open("rb") as f:
                index.row_ids = np.load(f)
            if index.row_ids.shape != (num_rows,):
                raise ValueError(f"{_ROW_IDS_FILE} in {str(directory)!r} maps {len(index.row_ids)} rows, index.json "
                                 f"says {num_rows}; save the index again.")
        return index

    def _save_state(self, directory):
        self._save_assets(directory)
        if self.row_ids is not None:
            with (directory / _ROW_IDS_FILE).open("wb") as f:
                np.save(f, self.row_ids)
        elif (directory / _ROW_IDS_FILE).exists():  # left by an index saved here before
            (directory / _ROW_IDS_FILE).unlink()

    def add(self, keys: np.ndarray, row_ids: np.ndarray) -> None:
        """Appends keys float32 [M, D] (normalized if config.normalize) to the built index; row_ids
        int64 [num_rows + M] is then the memory row of every row it holds, in the order they were added."""
        row_ids = np.asarray(row_ids, np.int64)
        if row_ids.shape != (self.num_rows + len(keys),):
            raise ValueError(f"expected row_ids for {self.num_rows + len(keys)} rows, got shape {row_ids.shape}.")
        self._append(np.ascontiguousarray(keys, dtype=np.float32))
        self.num_rows, self.row_ids = len(row_ids), row_ids

    def _search_batch(self, queries, k, exclude_ids):
        threshold = self.config.dedup_threshold
        margin = self.config.dedup_margin if threshold is not None else 0
        num_excluded = int((exclude_ids >= 0).sum(axis=1).max()) if exclude_ids.size else 0
        fetch = min(self.num_rows, k + num_excluded + margin)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        pending = np.arange(len(queries))
        while len(pending):
            found_scores, found_ids = self._host_search(queries[pending], fetch)
            keep = found_ids >= 0
            if self.row_ids is not None:
                found_ids = np.where(keep, self.row_ids[np.maximum(found_ids, 0)], -1)
            exhausted = ~keep.all(axis=1) | (fetch >= self.num_rows)
            if exclude_ids.shape[1]:
                keep &= ~(found_ids[:, :, None] == exclude_ids[pending][:, None, :]).any(axis=2)
            if threshold is not None:
                keep &= found_scores < threshold
            # A stable sort moves kept neighbours to the front and keeps them in score order.
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            kept = np.take_along_axis(keep, order, axis=1)
            scores[pending, : order.shape[1]] = np.where(kept, np.take_along_axis(found_scores, order, axis=1), -np.inf)
            ids[pending, : order.shape[1]] = np.where(kept, np.take_along_axis(found_ids, order, axis=1), -1)
            short = (keep.sum(axis=1) < k) & ~exhausted
            pending = pending[short]
            fetch = min(self.num_rows, 2 * fetch)
        return scores, ids
