"""Memory search: one interface, several backends, chosen by a config string.

    index = build_index({"backend": "scann"}, keys)       # keys: float32 [N, D]
    scores, ids = index.search(queries, k=10)              # float32 [Q, k], int64 [Q, k]
    index.save(directory); index = load_index(directory)

Backends (`IndexConfig.backend`):
  "exact"   matmul + `jax.lax.top_k` on the accelerator (`vlm_jax.memory.device.top_k`, the search
            RECO runs inside jit). The memory is sharded along its row axis over a mesh (default: a
            1-D Auto mesh over every device); each shard returns its own top-k, and the shards'
            candidates are merged into the global top-k. Exact.
  "approx"  the same, with `jax.lax.approx_max_k` per shard (TPU's partial-reduction top-k) at
            `recall_target`.
  "scann"   ScaNN on the host (`vlm_jax.memory.scann_index`): k-means tree + anisotropic quantization
            (AH) + exact reordering, optionally with SOAR spilling. Memories smaller than
            `min_rows_for_tree` are searched by ScaNN's brute force instead (logged).
  "hnsw"    FAISS's HNSW graph over the flat keys on the host (`vlm_jax.memory.hnsw`; the optional
            extra `pip install "vlm_jax[hnsw]"`).
  "auto"    measures the installed backends of `auto_candidates` on the memory (screened on samples
            first when it is large) and builds the fastest one that reaches `recall_target`
            (`vlm_jax.memory.auto`); the index it returns is that backend's, with what was measured
            in `index.choice` (saved as auto_choice.json).
New backends subclass `MemoryIndex` (host backends: `vlm_jax.memory.host_index.HostIndex`) and
register with `@register_index("name")`.

Ids. The id of a neighbour is the row of `keys` it came from: row i of the array given to
`build_index` has id i. Callers that hold memory values (texts, images, labels) in row order index
them with the ids directly.

Scores. With `normalize=True` (the default) keys and queries are L2-normalized, so scores are cosine
similarities; otherwise they are raw dot products.

Exclusion. `search(..., exclude_ids=...)` drops given memory rows per query (e.g. the query's own row
when training on data that is also in memory), and `dedup_threshold` drops every neighbour whose score
with the query is >= the threshold (near-duplicates of the query). Device backends mask those rows
before their top-k, so the result is the exact top-k of what remains. Host backends (ScaNN, HNSW)
over-retrieve k + (number of excluded ids) + `dedup_margin` neighbours, filter them, and search again
with twice as many for the queries left with fewer than k, until k remain or the search returns no
more (`vlm_jax.memory.host_index`). Every search returns exactly k columns; where fewer than k neighbours remain
(k > N - excluded, or an approximate search that found fewer) the missing tail of a row has id -1 and
score -inf.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import functools
import importlib
import json
from typing import Any, ClassVar, Mapping

import jax
import numpy as np
from etils import epath

from vlm_jax.memory import device
from vlm_jax.memory.store import unit_rows

_METADATA_FILE = "index.json"
AUTO_CHOICE_FILE = "auto_choice.json"


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Memory-search settings; fields a backend does not use are ignored by it.

    Shared:
      backend: registered backend name ("exact", "approx", "scann", "hnsw") or "auto".
      normalize: L2-normalize keys and queries (cosine scores).
      batch_size: queries per search step.
      dedup_threshold: drop neighbours scoring >= this with the query (None: keep all).
      dedup_margin: extra neighbours a host backend fetches when dedup_threshold is set.
    Device backends ("exact", "approx"):
      mesh_axes: mesh axes the memory rows are sharded over (None: all axes of the mesh).
      dtype: storage and matmul-input dtype of the memory ("float32" or "bfloat16"); scores are float32.
      recall_target: per-shard recall target of `jax.lax.approx_max_k` ("approx"); the recall@auto_k
        the backend "auto" picks must reach.
    ScaNN (None means: chosen from the memory size N when built, see `vlm_jax.memory.scann_index`):
      num_leaves, leaves_to_search, training_sample_size: k-means tree partitioning.
      spherical: unit-norm leaf centroids, the right geometry for normalized keys (higher recall per
        leaf searched on cosine data).
      dims_per_block, anisotropic_quantization_threshold: asymmetric hashing.
      reorder_k: candidates rescored exactly after AH scoring.
      soar_lambda, overretrieve_factor: SOAR spilling (each row also joins a second, near-orthogonal leaf).
      num_threads: build and search threads (0: all cores; 1: the calling thread only).
      min_rows_for_tree: smaller memories use ScaNN brute force instead of a tree.
    HNSW (also searched with num_threads threads):
      hnsw_m: graph degree (links per row and layer).
      hnsw_ef_construction: beam width while the graph is built.
      hnsw_ef_search: beam width of a search (never below the neighbours fetched).
    Auto (`vlm_jax.memory.auto`):
      auto_candidates: backends measured, those installed; exact is the fallback either way.
      auto_sample_rows: a larger memory is screened on a sample of this many rows first.
      auto_queries: memory rows held out of every measured index as its queries.
      auto_k: neighbours per query whose recall is measured.
      auto_threads: threads every candidate is measured with (None: num_threads).
      auto_confirm: approximate candidates, fastest on the screen first, then measured on the memory.
      auto_measure_s: seconds each candidate's deciding rung is searched again for; its fastest pass
        counts (a pass over auto_queries can take milliseconds, too short to time once).
    """

    backend: str = "exact"
    normalize: bool = True
    batch_size: int = 1024
    dedup_threshold: float | None = None
    dedup_margin: int = 16
    mesh_axes: tuple[str, ...] | None = None
    dtype: str = "float32"
    recall_target: float = 0.95
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    training_sample_size: int | None = None
    spherical: bool = True
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_k: int | None = None
    soar_lambda: float | None = 1.5
    overretrieve_factor: float | None = 2.0
    num_threads: int = 0
    min_rows_for_tree: int = 2048
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    auto_candidates: tuple[str, ...] = ("exact", "scann", "hnsw")
    auto_sample_rows: int = 100_000
    auto_queries: int = 1000
    auto_k: int = 10
    auto_threads: int | None = None
    auto_confirm: int = 2
    auto_measure_s: float = 0.25

    def __post_init__(self):
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a backend name, got {self.backend!r}.")
        for name in ("batch_size", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "auto_sample_rows",
                     "auto_queries", "auto_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        for name in ("num_threads", "auto_threads", "auto_confirm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not isinstance(self.auto_measure_s, (int, float)) or self.auto_measure_s < 0:
            raise ValueError(f"auto_measure_s must be a number of seconds >= 0, got {self.auto_measure_s!r}.")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target!r}.")
        candidates = self.auto_candidates
        if not candidates or any(not isinstance(name, str) or name == "auto" for name in candidates):
            raise ValueError(f"auto_candidates must name one or more backends other than 'auto', got "
                             f"{self.auto_candidates!r}.")

    @classmethod
    def from_any(cls, config: "IndexConfig | Mapping[str, Any] | str") -> "IndexConfig":
        """Accepts an IndexConfig, a mapping (dict, ml_collections.ConfigDict) or a bare backend name."""
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(backend=config)
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown memory index config fields {unknown}; valid fields are "
                f"{[field.name for field in dataclasses.fields(cls)]}."
            )
        for name in ("mesh_axes", "auto_candidates"):  # JSON and ml_collections hand back lists
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


# Fields that change how a built index is searched without changing the index itself.
_QUERY_TIME_FIELDS = frozenset({"batch_size", "dedup_threshold", "dedup_margin", "recall_target", "leaves_to_search",
                                "reorder_k", "hnsw_ef_search"})
# `load_index` may also re-place the memory (device backends) and resize a host backend's thread pool.
_LOAD_TIME_FIELDS = _QUERY_TIME_FIELDS | {"mesh_axes", "dtype", "num_threads"}


class MemoryIndex(abc.ABC):
    """A searchable memory of `num_rows` keys of width `dim`; see the module docstring for semantics."""

    name: ClassVar[str]

    def __init__(self, config: IndexConfig, num_rows: int, dim: int):
        self.config = config
        self.num_rows = num_rows
        self.dim = dim
        # What backend "auto" measured to pick this index (`vlm_jax.memory.auto`); None otherwise.
        self.choice: dict[str, Any] | None = None

    @classmethod
    @abc.abstractmethod
    def build(cls, config: IndexConfig, keys: np.ndarray, mesh: jax.sharding.Mesh | None) -> "MemoryIndex":
        """Builds the index over `keys` (float32 [N, D], already normalized if config.normalize)."""

    @classmethod
    @abc.abstractmethod
    def restore(
        cls, directory: epath.Path, config: IndexConfig, num_rows: int, dim: int, mesh: jax.sharding.Mesh | None
    ) -> "MemoryIndex":
        """Reads what `_save_state` wrote."""

    @abc.abstractmethod
    def _save_state(self, directory: epath.Path) -> None:
        """Writes the backend's arrays or assets into `directory`."""

    @abc.abstractmethod
    def _search_batch(self, queries: np.ndarray, k: int, exclude_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Searches one batch.

        Args:
          queries: float32 [B, D], normalized if config.normalize.
          k: neighbours wanted, 1 <= k.
          exclude_ids: int64 [B, E] memory rows to drop per query; -1 entries exclude nothing.

        Returns:
          scores float32 [B, k'] sorted descending and ids int64 [B, k'] with k' <= k; a slot without a
          neighbour has id -1 and score -inf.
        """

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns the k best memory rows for each query.

        Args:
          queries: float [Q, D] (a single query [D] is treated as Q = 1).
          k: neighbours per query.
          exclude_ids: int [Q] or [Q, E] memory row ids to drop per query; -1 entries exclude nothing.

        Returns:
          scores float32 [Q, k], best first, and ids int64 [Q, k] (rows of the memory's keys); slots
          beyond the neighbours that remain after exclusion hold id -1 and score -inf.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries of shape [Q, {self.dim}], got {queries.shape}.")
        if k < 1:
            raise ValueError(f"expected k >= 1, got {k}.")
        exclude_ids = self._exclusion_matrix(exclude_ids, len(queries))
        if self.config.normalize:
            queries = unit_rows(queries)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        step = self.config.batch_size
        for start in range(0, len(queries), step):
            stop = min(start + step, len(queries))
            batch_scores, batch_ids = self._search_batch(queries[start:stop], k, exclude_ids[start:stop])
            found = batch_scores.shape[1]
            scores[start:stop, :found] = batch_scores
            ids[start:stop, :found] = np.where(np.isneginf(batch_scores), -1, batch_ids)
        return scores, ids

    def with_search_config(self, **overrides: Any) -> "MemoryIndex":
        """The same built index searched with other query-time settings (leaves_to_search, reorder_k,
        hnsw_ef_search, dedup_threshold, recall_target, batch_size, dedup_margin); shares the index's memory."""
        fixed = sorted(set(overrides) - _QUERY_TIME_FIELDS)
        if fixed:
            raise ValueError(f"config fields {fixed} cannot change on a built index; use {sorted(_QUERY_TIME_FIELDS)}.")
        view = copy.copy(self)
        view.config = dataclasses.replace(self.config, **overrides)
        return view

    def save(self, directory: str | epath.PathLike) -> None:
        """Writes the index to `directory` (created if missing); `load_index(directory)` restores it."""
        path = epath.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._save_state(path)
        metadata = {
            "backend": self.name,
            "num_rows": self.num_rows,
            "dim": self.dim,
            "config": dataclasses.asdict(self.config),
        }
        if self.choice is not None:
            (path / AUTO_CHOICE_FILE).write_text(json.dumps(self.choice, indent=2))
        elif (path / AUTO_CHOICE_FILE).exists():  # left by an index saved here before
            (path / AUTO_CHOICE_FILE).unlink()
        (path / _METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    def _exclusion_matrix(self, exclude_ids: np.ndarray | None, num_queries: int) -> np.ndarray:
        if exclude_ids is None:
            return np.full((num_queries, 0), -1, dtype=np.int64)
        exclude_ids = np.asarray(exclude_ids, dtype=np.int64)
        if exclude_ids.ndim == 1:
            exclude_ids = exclude_ids[:, None]
        if exclude_ids.ndim != 2 or exclude_ids.shape[0] != num_queries:
            raise ValueError(f"expected exclude_ids of shape [{num_queries}] or [{num_queries}, E], got {exclude_ids.shape}.")
        if exclude_ids.size and (exclude_ids.min() < -1 or exclude_ids.max() >= self.num_rows):
            raise ValueError(
                f"exclude_ids must be memory rows in [0, {self.num_rows}) or -1 for none; found values in "
                f"[{exclude_ids.min()}, {exclude_ids.max()}]."
            )
        return exclude_ids


_INDEX_CLASSES: dict[str, type[MemoryIndex]] = {}
# Backends in modules of their own, imported when first named (so their optional dependencies are too).
_BACKEND_MODULES = {"scann": "vlm_jax.memory.scann_index", "hnsw": "vlm_jax.memory.hnsw"}
# "auto" measures every backend, so its module imports this one: it too is loaded by name, when named.
_AUTO_MODULE = "vlm_jax.memory.auto"


def register_index(name: str):
    """Class decorator registering a MemoryIndex subclass under `name` (the config's `backend`)."""

    def register(cls: type[MemoryIndex]) -> type[MemoryIndex]:
        if name in _INDEX_CLASSES:
            raise ValueError(f"memory index backend {name!r} is already registered by {_INDEX_CLASSES[name]}.")
        cls.name = name
        _INDEX_CLASSES[name] = cls
        return cls

    return register


def get_index_class(name: str) -> type[MemoryIndex]:
    """Returns the MemoryIndex subclass registered under `name`."""
    if name not in _INDEX_CLASSES and name in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[name])
    if name not in _INDEX_CLASSES:
        names = sorted(set(_INDEX_CLASSES) | set(_BACKEND_MODULES))
        raise ValueError(f"unknown memory index backend {name!r}; expected one of {names} or 'auto'.")
    return _INDEX_CLASSES[name]


def build_index(
    config: IndexConfig | Mapping[str, Any] | str, keys: np.ndarray, mesh: jax.sharding.Mesh | None = None
) -> MemoryIndex:
    """Builds the configured backend over `keys` (float [N, D]); row i of `keys` gets id i.

    `mesh` places the device backends (None: a 1-D mesh over all devices); host backends ignore it.
    Backend "auto" returns the index of the backend it picks (`vlm_jax.memory.auto`).
    """
    config = IndexConfig.from_any(config)
    keys = np.asanyarray(keys)
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise ValueError(f"expected keys of shape [N, D] with N >= 1, got {keys.shape}.")
    # unit_rows converts and normalizes in one chunked pass, and hands float32 unit rows back uncopied.
    keys = unit_rows(keys) if config.normalize else np.asarray(keys, dtype=np.float32)
    if config.backend == "auto":
        return importlib.import_module(_AUTO_MODULE).build_auto(config, keys, mesh)
    return get_index_class(config.backend).build(config, keys, mesh)


def load_index(directory: str | epath.PathLike, mesh: jax.sharding.Mesh | None = None, **overrides: Any) -> MemoryIndex:
    """Restores an index written by `MemoryIndex.save`.

    `overrides` replace search-time config fields (batch_size, dedup_threshold, leaves_to_search,
    num_threads, ...); fields that shaped the built index cannot change without rebuilding it.
    """
    path = epath.Path(directory)
    metadata_path = path / _METADATA_FILE
    if not metadata_path.exists():
        raise FileNotFoundError(f"no {_METADATA_FILE} in {str(path)!r}; expected a directory written by MemoryIndex.save.")
    metadata = json.loads(metadata_path.read_text())
    fixed = sorted(set(overrides) - _LOAD_TIME_FIELDS)
    if fixed:
        raise ValueError(f"config fields {fixed} are fixed when the index is built; rebuild it to change them.")
    config = IndexConfig.from_any({**metadata["config"], **overrides})
    index = get_index_class(metadata["backend"]).restore(path, config, metadata["num_rows"], metadata["dim"], mesh)
    if (path / AUTO_CHOICE_FILE).exists():
        index.choice = json.loads((path / AUTO_CHOICE_FILE).read_text())
    return index


class _DeviceIndex(MemoryIndex):
    """Brute-force scoring on the accelerator (`vlm_jax.memory.device.top_k`), rows sharded over mesh axes."""

    approximate: ClassVar[bool]

    def __init__(self, config: IndexConfig, keys: np.ndarray, mesh: jax.sharding.Mesh | None):
        super().__init__(config, num_rows=keys.shape[0], dim=keys.shape[1])
        self.mesh = mesh if mesh is not None else device.default_mesh()
        self.axes = tuple(config.mesh_axes or self.mesh.axis_names)
        # Keys arrive normalized when config.normalize; raw dot-product memories must stay raw.
        self.keys = device.place_rows(keys, mesh=self.mesh, axes=self.axes, dtype=config.dtype, normalize=False)
        self.num_shards = device.num_shards(self.mesh, self.axes)
        self.rows_per_shard = self.keys.shape[0] // self.num_shards
        # Keyed by everything the compiled search closes over, so views from with_search_config share it.
        self._search_fns: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def build(cls, config, keys, mesh):
        return cls(config, keys, mesh)

    @classmethod
    def restore(cls, directory, config, num_rows, dim, mesh):
        with (directory / "keys.npy").open("rb") as f:
            keys = np.load(f)
        if keys.shape != (num_rows, dim):
            raise ValueError(f"keys.npy in {str(directory)!r} has shape {keys.shape}, index.json says {(num_rows, dim)}.")
        return cls(config, keys, mesh)

    def _save_state(self, directory):
        keys = np.asarray(jax.device_get(self.keys))[: self.num_rows].astype(np.float32)
        with (directory / "keys.npy").open("wb") as f:
            np.save(f, keys)

    def _search_batch(self, queries, k, exclude_ids):
        batch = len(queries)
        # Batches are padded to a power of two (at most batch_size) to bound the number of compilations.
        padded_batch = min(self.config.batch_size, 1 << (batch - 1).bit_length())
        padded_queries = np.zeros((padded_batch, self.dim), dtype=np.float32)
        padded_queries[:batch] = queries
        padded_exclude = None
        if exclude_ids.shape[1]:
            padded_exclude = np.full((padded_batch, exclude_ids.shape[1]), -1, dtype=np.int32)
            padded_exclude[:batch] = exclude_ids
        cache_key = (k, self.config.dedup_threshold, self.config.recall_target)
        if cache_key not in self._search_fns:
            self._search_fns[cache_key] = jax.jit(functools.partial(
                device.top_k, k=k, num_rows=self.num_rows, mesh=self.mesh, axes=self.axes,
                dedup_threshold=self.config.dedup_threshold, approximate=self.approximate,
                recall_target=self.config.recall_target))
        scores, ids = self._search_fns[cache_key](padded_queries, self.keys, exclude_rows=padded_exclude)
        return np.asarray(scores)[:batch], np.asarray(ids)[:batch].astype(np.int64)


@register_index("exact")
class ExactIndex(_DeviceIndex):
    """Exact top-k by matmul on the accelerator; memory rows sharded over the mesh."""

    approximate = False


@register_index("approx")
class ApproxIndex(_DeviceIndex):
    """`jax.lax.approx_max_k` per shard (fast on TPU; exact on CPU/GPU backends that lack it)."""

    approximate = True
