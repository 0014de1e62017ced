"""backend="auto": the memory search picked by measurement on the memory itself.

    index = build_index({"backend": "auto", "recall_target": 0.95, "auto_threads": 1}, keys)
    index.choice["chosen"]    # {"backend": "hnsw", "settings": {"hnsw_ef_search": 80}, "qps": ...}

Queries are `auto_queries` memory rows (at most a fifth; a seeded draw) held out of every index that
is measured, so their recall is that of fresh queries (a row searched in an index holding it finds
its own neighbourhood too easily: +0.01 to +0.04 recall@10). Every search runs on `auto_threads`
threads, and the effort a backend needs is the lowest rung of its ladders (`ladders`: ScaNN
leaves_to_search for each reorder_k, HNSW ef_search) whose recall@`auto_k` against exact neighbours
reaches `recall_target`; its q/s there (the fastest of the passes made over `auto_measure_s` seconds)
is the backend's. Exact always reaches it.

1. Memory (less the held-out rows) of at most `auto_sample_rows` rows: every candidate of
   `auto_candidates` that is installed is built on it and measured; the fastest wins.
2. Larger memories are screened first: each candidate is measured on a sample of `auto_sample_rows`
   rows and on a quarter of it (at least `min_rows_for_tree` rows), and its q/s on the memory
   projected by the power law q/s ~ rows^-a through the two. A sample changes neighbourhoods, not
   only their cost (a row's near duplicates thin out with it), and small searches carry fixed
   overheads, so exact and the `auto_confirm` fastest-projected approximate candidates are then built
   on the memory, less the held-out rows, each starting at its screened rung; the fastest wins
   (auto_confirm 0: the projections decide).
3. The winner becomes the index of the whole memory at its winning rung: a host backend (ScaNN, HNSW)
   measured there has the held-out rows appended, so the index that was measured is the one returned;
   exact is built on every row.
Measuring on the memory holds a copy of it, less the held-out rows, beside the keys.

The index returned is the winner's, its config the winning settings; `index.choice` holds the choice
and every measurement (recall, q/s, settings, rows, threads, build seconds), is logged, and is saved
beside the index as auto_choice.json, which `load_index` reads back without measuring.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from vlm_jax.memory.host_index import HostIndex
from vlm_jax.memory.index import IndexConfig, MemoryIndex, get_index_class

HNSW_EF_SEARCH = (10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                  448, 512, 640, 768, 896, 1024)
SCANN_LEAF_FRACTIONS = (0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06,
                        0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.23, 0.26, 0.3, 0.35, 0.4, 0.45, 0.5,
                        0.6, 0.7, 0.85, 1.0)
SCANN_REORDER_K = (100, 250, 500)
# Backends that reach every target, whatever recall their float arithmetic measures.
_EXACT_BACKENDS = ("exact",)
# Optional backends and the module each one needs.
_REQUIRES = {"scann": "scann", "hnsw": "faiss"}
_SEED = 0


def ladders(index: MemoryIndex) -> list[list[dict[str, Any]]]:
    """Search-effort ladders of a built index: lists of `with_search_config` overrides in rising effort.

    Rung i of ladder j means the same effort on a memory of any size (ScaNN's leaves searched as a
    fraction of its leaves), so a rung measured on a sample names the rung to start from on the whole
    memory. A later ladder costs more at an equal rung (ScaNN: deeper reordering). Backends without a
    query-time effort (exact, approx, ScaNN's brute force) have one empty rung.
    """
    if index.name == "hnsw":
        return [[{"hnsw_ef_search": ef} for ef in HNSW_EF_SEARCH]]
    if index.name == "scann" and index.uses_tree:
        leaves = index.config.num_leaves
        return [[{"leaves_to_search": min(leaves, max(1, round(fraction * leaves))), "reorder_k": reorder_k}
                 for fraction in SCANN_LEAF_FRACTIONS] for reorder_k in SCANN_REORDER_K]
    return [[{}]]


def unavailable(name: str) -> str | None:
    """Why backend `name` cannot be measured here (None: it can); an unknown name is a ValueError."""
    module = _REQUIRES.get(name)
    if module and importlib.util.find_spec(module) is None:
        return f"not installed (no module {module!r})"
    get_index_class(name)
    return None


def exact_neighbours(keys: np.ndarray, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None,
                     chunk_rows: int = 65_536) -> np.ndarray:
    """int64 [Q, k] rows of `keys` [N, D] with the best dot products with `queries` [Q, D], best first,
    skipping row exclude_rows[q] for query q; scored `chunk_rows` keys at a time."""
    k = min(k, len(keys) - (exclude_rows is not None))
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(keys), chunk_rows):
        scores = queries @ np.asarray(keys[start : start + chunk_rows], np.float32).T
        if exclude_rows is not None:
            inside = (exclude_rows >= start) & (exclude_rows < start + scores.shape[1])
            scores[inside, exclude_rows[inside] - start] = -np.inf
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_ids


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Fraction of the true ids [Q, k] among the first k found ids [Q, >= k] of the same query."""
    k = true_ids.shape[1]
    return float(np.mean([len(np.intersect1d(found[:k], true)) / k for found, true in zip(found_ids, true_ids)]))


def _search(index: MemoryIndex, queries, k) -> tuple[np.ndarray, float]:
    """(ids int64 [Q, k], queries per second of the search)."""
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, len(queries) / max(time.perf_counter() - started, 1e-9)


def _fastest_pass(index: MemoryIndex, queries, k, seconds: float, qps: float = 0.0) -> float:
    """The highest q/s of `qps` and of passes over `queries`: at least one, more until `seconds` have passed."""
    deadline = time.perf_counter() + seconds
    while True:
        qps = max(qps, _search(index, queries, k)[1])
        if time.perf_counter() >= deadline:
            return qps


def _lowest_rung(meets: Callable[[int], bool], num_rungs: int, start: int = 0) -> int | None:
    """The lowest rung in [0, num_rungs) where `meets` (False below some rung, True from it on) holds,
    None if none: bisection below `start` when it holds there, else galloping up from it first."""
    start = min(start, num_rungs - 1)
    if meets(start):
        low, high = -1, start
    else:
        low, step = start, 1
        while True:
            high = min(start + step, num_rungs - 1)
            if meets(high):
                break
            if high == num_rungs - 1:
                return None
            low, step = high, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    return high


def _measure(index: MemoryIndex, queries, true_ids, k: int, target: float, log: list[dict[str, Any]],
             start: dict[str, Any] | None = None, measure_s: float = 0.0) -> dict[str, Any] | None:
    """Finds the lowest rung reaching `target` on each ladder of `index` (only `start`'s ladder, searched
    from its rung, when given) and returns the fastest of them (None: none reaches it). Every rung
    searched is appended to `log` ("lowest": the rung its ladder needs); a later ladder is searched only
    below the lowest rung found so far, since at or above it it can only cost more. The rung that counts
    is searched again for `measure_s` seconds (at least once) and keeps its fastest pass."""
    measured: dict[str, dict[str, Any]] = {}

    def point(ladder_index: int, rung: int) -> dict[str, Any]:
        overrides = all_ladders[ladder_index][rung]
        key = json.dumps(overrides, sort_keys=True)
        if key not in measured:
            ids, qps = _search(index.with_search_config(**overrides), queries, k)
            recall = recall_at_k(ids, true_ids)
            measured[key] = {"ladder": ladder_index, "rung": rung, "settings": overrides, "recall": recall, "qps": qps,
                             "met": index.name in _EXACT_BACKENDS or recall >= target, "lowest": False}
            log.append(measured[key])
        return measured[key]

    all_ladders = ladders(index)
    best, lowest = None, max(len(ladder) for ladder in all_ladders)
    for ladder_index, ladder in enumerate(all_ladders):
        if start is not None and ladder_index != min(start["ladder"], len(all_ladders) - 1):
            continue
        rung = _lowest_rung(lambda rung: point(ladder_index, rung)["met"], min(len(ladder), lowest),
                            start["rung"] if start is not None else 0)
        if rung is None:
            continue
        found = point(ladder_index, rung)
        # More passes at the rung that counts, so one slow pass does not decide.
        found["qps"] = _fastest_pass(index.with_search_config(**found["settings"]), queries, k, measure_s,
                                     found["qps"])
        # Neighbouring rungs may share settings (a small tree): the point names the lowest of them.
        found.update(ladder=ladder_index, rung=rung, lowest=True)
        lowest = rung
        if best is None or found["qps"] > best["qps"]:
            best = found
    return best


def _projected_qps(best: list[dict[str, Any] | None], sizes: list[int], num_rows: int) -> float | None:
    """q/s on `num_rows` rows from each sample's best rung (None: the target was not reached on the
    largest sample); a candidate that reached it only there is taken to slow down linearly."""
    if best[-1] is None:
        return None
    if len(sizes) == 1:
        return best[-1]["qps"]
    exponent = 1.0
    if best[0] is not None:
        exponent = math.log(best[0]["qps"] / best[-1]["qps"]) / math.log(sizes[-1] / sizes[0])
        exponent = min(max(exponent, 0.0), 2.0)
    return best[-1]["qps"] * (sizes[-1] / num_rows) ** exponent


def _build(config: IndexConfig, name: str, keys: np.ndarray, mesh, **fields) -> tuple[MemoryIndex, float]:
    started = time.perf_counter()
    index = get_index_class(name).build(dataclasses.replace(config, backend=name, **fields), keys, mesh)
    return index, time.perf_counter() - started


def build_auto(config: IndexConfig, keys: np.ndarray, mesh: jax.sharding.Mesh | None) -> MemoryIndex:
    """Measures, picks and builds (module docstring); `keys` float32 [N, D], normalized if config.normalize."""
    started = time.perf_counter()
    num_rows, target = len(keys), config.recall_target
    threads = config.num_threads if config.auto_threads is None else config.auto_threads
    names = list(dict.fromkeys(config.auto_candidates))
    skipped = {name: reason for name in names if (reason := unavailable(name))}
    names = [name for name in names if name not in skipped]
    order = np.random.default_rng(_SEED).permutation(num_rows)
    num_queries = min(config.auto_queries, num_rows // 5)
    held_out, rest = np.sort(order[:num_queries]), order[num_queries:]
    queries = keys[held_out]
    sizes, largest = [], config.auto_sample_rows
    if len(rest) > largest:  # screened on samples first
        smaller = max(largest // 4, config.min_rows_for_tree)
        sizes = [smaller, largest] if smaller <= largest // 2 else [largest]
    k = min(config.auto_k, *sizes, max(len(rest), 1))
    record: dict[str, Any] = {
        "recall_target": target, "k": k, "threads": threads, "num_rows": num_rows, "dim": int(keys.shape[1]),
        "queries": int(num_queries), "sample_rows": sizes, "jax_backend": jax.default_backend(), "skipped": skipped,
        "candidates": [], "projected_qps": {}, "confirmed": [],
    }
    if not num_queries:  # too few rows to hold any out: exact, unmeasured
        names = []
    best: dict[str, list[dict[str, Any] | None]] = {name: [] for name in names}
    for size in sizes:
        sample = keys[np.sort(rest[:size])]
        true_ids = exact_neighbours(sample, queries, k)
        for name in names:
            index, build_s = _build(config, name, sample, mesh, num_threads=threads)
            log: list[dict[str, Any]] = []
            best[name].append(_measure(index, queries, true_ids, k, target, log, measure_s=config.auto_measure_s))
            record["candidates"] += [{"backend": name, "sample_rows": size, "threads": threads, "build_s": build_s,
                                      **point} for point in log]
            del index  # one candidate's index in memory at a time
    record["projected_qps"] = {name: _projected_qps(best[name], sizes, num_rows) for name in names if sizes}
    rest = np.sort(rest)
    winner = _confirm(config, names, best, keys, rest, queries, k, threads, mesh, record)
    record["measure_s"] = time.perf_counter() - started
    index = _complete(config, winner, keys, held_out, rest, mesh, record)
    record["total_s"] = time.perf_counter() - started
    index.choice = json.loads(json.dumps(record, default=float))
    logging.info("auto memory search picked %s %s for recall@%d >= %s on %d rows; measurements: %s",
                 index.name, record["chosen"]["settings"], k, target, num_rows, json.dumps(index.choice))
    return index


def _confirm(config: IndexConfig, names: list[str], best: dict[str, list[dict[str, Any] | None]], keys: np.ndarray,
             rest: np.ndarray, queries: np.ndarray, k: int, threads: int, mesh,
             record: dict[str, Any]) -> dict[str, Any]:
    """The winner {"backend", "point": its rung (None: the lowest), "qps", "rows": what its q/s was
    measured on (None: projected), "index": built on the `rest` rows (the memory less the held-out
    ones) or None}. Measured on those rows: every candidate without a screen, else exact and the
    `auto_confirm` fastest-projected approximate ones; with auto_confirm 0, the projections decide."""
    projected = record["projected_qps"]
    contenders, measure = [], names
    if projected and config.auto_confirm:
        approximate = sorted((name for name in names if name not in _EXACT_BACKENDS),
                             key=lambda name: -(projected[name] or 0.0))
        measure = [name for name in names if name in _EXACT_BACKENDS] + approximate[: config.auto_confirm]
    elif projected:
        contenders = [{"backend": name, "point": best[name][-1], "qps": projected[name], "rows": None, "index": None}
                      for name in names if projected[name] is not None]
        measure = []
    if measure:
        rest_keys = keys[rest]
        true_ids = exact_neighbours(rest_keys, queries, k)
    for name in measure:
        index, build_s = _build(config, name, rest_keys, mesh, num_threads=threads)
        log: list[dict[str, Any]] = []
        point = _measure(index, queries, true_ids, k, config.recall_target, log,
                         start=best[name][-1] if projected else None, measure_s=config.auto_measure_s)
        record["confirmed"] += [{"backend": name, "rows": len(rest_keys), "threads": threads, "build_s": build_s,
                                 **entry} for entry in log]
        if point is not None:
            contenders.append({"backend": name, "point": point, "qps": point["qps"], "rows": len(rest), "index": index})
        # Only the fastest contender's index is kept: it may become the memory's index.
        fastest = max(contenders, key=lambda contender: contender["qps"], default=None)
        for contender in contenders:
            if contender is not fastest:
                contender["index"] = None
        del index
    fallback = {"backend": "exact", "point": None, "qps": None, "rows": None, "index": None}  # reaches any target
    return max(contenders, key=lambda contender: contender["qps"], default=fallback)


def _complete(config: IndexConfig, winner: dict[str, Any], keys: np.ndarray, held_out: np.ndarray,
              rest: np.ndarray, mesh, record: dict[str, Any]) -> MemoryIndex:
    """The winner as the index of every row at its rung: a host index measured on the `rest` rows gets
    the held-out rows appended (the index that was measured, so its rung holds); any other is built on
    all `keys`."""
    name, measured = winner["backend"], winner.pop("index")
    started = time.perf_counter()
    if isinstance(measured, HostIndex):
        index, settings = measured, winner["point"]["settings"]
        index.add(keys[held_out], np.concatenate([rest, held_out]))
        # Measured on auto_threads threads; host backends size their pools from the config when searching.
        index.config = dataclasses.replace(index.config, num_threads=config.num_threads)
    else:
        del measured
        index = get_index_class(name).build(dataclasses.replace(config, backend=name), keys, mesh)
        point, all_ladders = winner["point"] or {"ladder": 0, "rung": 0}, ladders(index)
        ladder = all_ladders[min(point["ladder"], len(all_ladders) - 1)]
        settings = ladder[min(point["rung"], len(ladder) - 1)]
    record["chosen"] = {"backend": name, "settings": settings, "qps": winner["qps"], "qps_rows": winner["rows"],
                        "build_s": time.perf_counter() - started}
    return index.with_search_config(**settings)
