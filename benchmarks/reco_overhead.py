"""RECO's inference overhead: zero-shot image encoding with RECO over plain CLIP, same machine and batch.

What is timed is the shipped evaluation path: `BatchedEncoder(model, "encode_image", batch)` from
`vlm_jax.evaluate.common` (what the zero-shot and retrieval evaluators call), once on the frozen CLIP
alone and once on `RECO(clip, config)` with the memory attached (`RECO.attach_memory`), i.e. image
tower + L2 norm + memory search + fusion in one jitted call. Both run in one process and alternate
batch by batch (CLIP, RECO, CLIP, RECO, ...) so load from other processes hits both alike; each
timed batch is one call on the same `--batch` images, after warm-up (compilation excluded). The
ratio is median(RECO) / median(CLIP), per round and pooled over `--rounds`; "paired" is the median
over batches of each RECO batch's time over the CLIP batch just before it.

Model: OpenAI ViT-B/32 shapes (`vlm_jax.models.vit_b32`), random weights; RECO with the default
`reco_config()` (k from `--k`, one fusion layer of width 512). The fusion's output projection starts
at zero, but its parameters are jit arguments, so XLA computes it in full either way.

Memory: `--memory-size` pairs of unit vectors of width 512 (random, clustered: one Gaussian centre
per 50 rows, each row centre + `--noise` x Gaussian noise, normalized; a text row is another draw
around the image row's centre). Written chunk by chunk to .npy files in a temporary directory and
memory-mapped, as `vlm_jax.memory.store.load_memory` hands memories out, so the raw vectors do not
count against the process's anonymous memory.

Backends (`--backend`, comma-separated):
  exact  `place_memory(..., backend="exact")`: matmul + `jax.lax.top_k` inside the jitted encode
         (on this machine the "device" is the CPU). `--exact_dtypes` also times a bfloat16 memory.
  scann  `HostMemory` (ScaNN tree + AH + reordering, SOAR) searched from inside jit through
         `jax.pure_callback`. `leaves_to_search` is tuned on the benchmark's own memory: the
         smallest of `--scann_leaves` with recall@10 >= `--recall_target` against exact top-k
         (numpy, chunked) on `--recall_queries` fresh in-distribution queries.
  approx `jax.lax.approx_max_k` is TPU's partial-reduction top-k; on CPU it lowers to the exact
         top-k, so it is not timed here (see RESULTS.md).

Breakdown, timed separately with the same jit-of-(graphdef, state) pattern: encode (= CLIP alone),
search (`RECO.retrieve("image", queries)` on the CLIP's normalized embeddings of the batch; for
scann also `HostMemory.lookup` on the host without jit), fusion (`RECO.refine` with the retrieved
items given), and for exact the search's floor (matmul + top_k + value gather, nothing else) and
the matmul alone (reduced by a max). The stages run round-robin, so load drift hits each alike.

  Full run (1M rows, 4 GB of vectors on disk; ~25 min on 2 busy cores, 15 of them ScaNN's two
  index builds; peak anonymous memory ~11 GB in place_memory and ~13.5 GB in HostMemory, RSS up to
  17 GB with the memory-mapped files, so run one backend per process where RAM is short):
    python benchmarks/reco_overhead.py --memory-size 1000000
    python benchmarks/reco_overhead.py --memory-size 1000000 --backend exact --exact_dtypes float32 --rounds 3
  Smoke run:
    python benchmarks/reco_overhead.py --memory-size 50000 --iters 3 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys

import bench_common


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-size", type=int, default=1_000_000, help="memory pairs")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--k", type=int, default=10, help="neighbours retrieved per image")
    parser.add_argument("--iters", type=int, default=8, help="timed batches per model per round")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the interleaved timing, load logged each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per model after compilation")
    parser.add_argument("--backend", default="exact,scann", help="comma-separated: exact, scann")
    parser.add_argument("--exact_dtypes", default="float32,bfloat16", help="device memory dtypes timed for exact")
    parser.add_argument("--noise", type=float, default=1.2, help="noise-to-centre norm ratio of the memory")
    parser.add_argument("--rows_per_centre", type=int, default=50)
    parser.add_argument("--scann_leaves", default="auto",
                        help="comma-separated leaves_to_search to try in order ('auto': 2.5%%..40%% of the leaves)")
    parser.add_argument("--recall_target", type=float, default=0.95)
    parser.add_argument("--recall_queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmpdir", default=None, help="where the memory's .npy files go (default: system temp)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


ARGS = parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vlm_jax import models  # noqa: E402
from vlm_jax.evaluate.common import BatchedEncoder  # noqa: E402
from vlm_jax.methods import reco as reco_lib  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Machine, load, memory
# --------------------------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# The memory: clustered unit vectors, memory-mapped
# --------------------------------------------------------------------------------------------------


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_memory(directory: str, num_rows: int, centres: np.ndarray, noise: float, seed: int,
                 chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Writes image/text embeddings float32 [num_rows, D] to .npy files; returns them memory-mapped.

    Row i of both belongs to one centre; the text row is an independent draw around it.
    """
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    paths = {name: os.path.join(directory, f"{name}_embeddings.npy") for name in ("image", "text")}
    arrays = {name: np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_rows, dim))
              for name, path in paths.items()}
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        owners = centres[rng.integers(len(centres), size=stop - start)]
        for array in arrays.values():
            array[start:stop] = unit_rows(owners + noise * rng.standard_normal(owners.shape, dtype=np.float32))
    for array in arrays.values():
        array.flush()
    del arrays
    return tuple(np.load(paths[name], mmap_mode="r") for name in ("image", "text"))


def draw_queries(centres: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    """float32 [count, D] fresh unit vectors from the memory's distribution."""
    rng = np.random.default_rng(seed)
    owners = centres[rng.integers(len(centres), size=count)]
    return unit_rows(owners + noise * rng.standard_normal(owners.shape, dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(clip_fn, reco_fn, iters: int) -> tuple[list[float], list[float]]:
    """Per-batch seconds of CLIP and RECO, alternating CLIP, RECO, CLIP, RECO, ..."""
    clip_times, reco_times = [], []
    for _ in range(iters):
        clip_times.append(seconds(clip_fn))
        reco_times.append(seconds(reco_fn))
    return clip_times, reco_times


def median_of(fn, iters: int) -> float:
    return statistics.median([seconds(fn) for _ in range(iters)])


def ms(value: float) -> str:
    return f"{1e3 * value:.1f} ms"


class Bench:
    """Times one RECO model (memory attached) against its own CLIP on the same batch."""

    def __init__(self, clip_encoder: BatchedEncoder, pixels: np.ndarray, queries: np.ndarray):
        self.clip_encoder = clip_encoder
        self.pixels = pixels
        self.queries = queries
        self.results: list[dict] = []

    def compare(self, name: str, model: reco_lib.RECO, extra: dict | None = None) -> dict:
        """Interleaved CLIP vs RECO encode_image over --rounds rounds, then the breakdown."""
        encoder = BatchedEncoder(model, "encode_image", ARGS.batch)
        compile_s = seconds(lambda: encoder(self.pixels))
        for _ in range(ARGS.warmup):
            self.clip_encoder(self.pixels)
            encoder(self.pixels)
        rounds, all_clip, all_reco = [], [], []
        for round_index in range(ARGS.rounds):
            load_before = load()
            clip_times, reco_times = interleaved(lambda: self.clip_encoder(self.pixels), lambda: encoder(self.pixels),
                                                 ARGS.iters)
            all_clip += clip_times
            all_reco += reco_times
            row = dict(clip_s=statistics.median(clip_times), reco_s=statistics.median(reco_times),
                       load_before=load_before, load_after=load())
            row["ratio"] = row["reco_s"] / row["clip_s"]
            rounds.append(row)
            log(f"  [{name}] round {round_index}: CLIP {ms(row['clip_s'])}, RECO {ms(row['reco_s'])}, "
                f"ratio {row['ratio']:.3f} (CLIP spread {ms(min(clip_times))}..{ms(max(clip_times))}, "
                f"RECO {ms(min(reco_times))}..{ms(max(reco_times))}; load {load_before} -> {row['load_after']})")
        result = dict(name=name, batch=ARGS.batch, k=ARGS.k, memory_size=ARGS.memory_size, rounds=rounds,
                      clip_s=statistics.median(all_clip), reco_s=statistics.median(all_reco),
                      reco_first_call_s=compile_s, **(extra or {}))
        result["ratio"] = result["reco_s"] / result["clip_s"]
        # Each RECO batch over the CLIP batch just before it: the pair shares the load of its moment.
        result["paired_ratio"] = statistics.median(r / c for r, c in zip(all_reco, all_clip))
        result["breakdown"] = self.breakdown(model)
        result["peak_rss_gb"] = peak_rss_gb()
        log(f"  [{name}] pooled: CLIP {ms(result['clip_s'])}, RECO {ms(result['reco_s'])}, "
            f"ratio {result['ratio']:.3f} (paired {result['paired_ratio']:.3f}); breakdown " +
            ", ".join(f"{part} {ms(value)}" for part, value in result["breakdown"].items()) +
            f"; peak RSS {result['peak_rss_gb']:.1f} GB")
        self.results.append(result)
        return result

    def breakdown(self, model: reco_lib.RECO) -> dict[str, float]:
        """Median seconds of each stage alone on this batch (same jit-of-(graphdef, state) pattern)."""
        graphdef, state = nnx.split(model)

        @functools.partial(jax.jit, static_argnums=0)
        def retrieve(graphdef, state, queries):
            return nnx.merge(graphdef, state).retrieve("image", queries)

        @functools.partial(jax.jit, static_argnums=0)
        def fuse(graphdef, state, queries, retrieved, retrieved_ids):
            return nnx.merge(graphdef, state).refine("image", queries, retrieved=retrieved, retrieved_ids=retrieved_ids)

        queries = jnp.asarray(self.queries)
        ids, retrieved = jax.block_until_ready(retrieve(graphdef, state, queries))
        stages = {
            "encode": lambda: self.clip_encoder(self.pixels),
            "search": lambda: jax.block_until_ready(retrieve(graphdef, state, queries)),
            "fusion": lambda: jax.block_until_ready(fuse(graphdef, state, queries, retrieved, ids)),
        }
        if model.host_memory is not None:
            lookup = functools.partial(model.host_memory.lookup, modality="image", k=ARGS.k, dedup_threshold=None)
            exclude = np.full((len(self.queries), 1), -1, np.int32)
            host_queries = np.asarray(self.queries)
            stages["search_host_only"] = lambda: lookup(host_queries, exclude)
        else:
            memory = model.memory.device_memory()
            keys, values = memory.image_embeddings, memory.text_embeddings

            def scores_of(keys, queries):
                return jnp.matmul(queries.astype(keys.dtype), keys.T, preferred_element_type=jnp.float32)

            # The search's floor on this hardware: scores, top-k, value gather, nothing else.
            @jax.jit
            def minimal_search(keys, values, queries):
                top_scores, rows = jax.lax.top_k(scores_of(keys, queries), ARGS.k)
                return top_scores, jnp.take(values, rows, axis=0)

            matmul_max = jax.jit(lambda keys, queries: scores_of(keys, queries).max(axis=1))
            stages["search_matmul_max"] = lambda: jax.block_until_ready(matmul_max(keys, queries))
            stages["search_minimal"] = lambda: jax.block_until_ready(minimal_search(keys, values, queries))
        for stage in stages.values():
            stage()
        # Round-robin over the stages, so load drift hits each alike.
        times = {name: [] for name in stages}
        for _ in range(max(3, ARGS.iters)):
            for name, stage in stages.items():
                times[name].append(seconds(stage))
        parts = {name: statistics.median(values) for name, values in times.items()}
        return parts


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def run_exact(bench, clip, reco_config, image_memory, text_memory, dtype):
    start = time.perf_counter()
    memory = reco_lib.place_memory(image_memory, text_memory, backend="exact", dtype=dtype)
    jax.block_until_ready(memory.image_embeddings)
    place_s = time.perf_counter() - start
    log(f"exact/{dtype}: place_memory {place_s:.1f} s, peak RSS {peak_rss_gb():.1f} GB")
    model = reco_lib.RECO(clip, reco_config, rngs=nnx.Rngs(1)).attach_memory(memory)
    del memory
    result = bench.compare(f"exact/{dtype}", model, dict(backend="exact", dtype=dtype, build_s=place_s))
    del model
    gc.collect()
    return result


def scann_leaf_candidates(num_leaves: int) -> list[int]:
    if ARGS.scann_leaves != "auto":
        return [int(value) for value in ARGS.scann_leaves.split(",")]
    fractions = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4)
    return sorted({max(1, round(fraction * num_leaves)) for fraction in fractions})


def run_scann(bench, clip, reco_config, image_memory, text_memory, centres, batch_queries):
    start = time.perf_counter()
    # Image queries only: the image index alone is built (the text side never runs here).
    host_memory = reco_lib.HostMemory(image_memory, text_memory, {"backend": "scann"}).build(["image"])
    build_s = time.perf_counter() - start
    index = host_memory.index("image")
    log(f"scann: HostMemory built in {build_s:.1f} s (indexes for {sorted(host_memory.indexes)}; "
        f"{index.config.num_leaves} leaves, default leaves_to_search {index.config.leaves_to_search}, "
        f"reorder {index.config.reorder_k}, SOAR lambda {index.config.soar_lambda}), peak RSS {peak_rss_gb():.1f} GB")

    queries = draw_queries(centres, ARGS.recall_queries, ARGS.noise, ARGS.seed + 1)
    start = time.perf_counter()
    true_ids = bench_common.exact_top_k(image_memory, queries, ARGS.k)
    batch_true_ids = bench_common.exact_top_k(image_memory, batch_queries, ARGS.k)
    log(f"scann: exact ground truth for {len(queries)} + {len(batch_queries)} queries in "
        f"{time.perf_counter() - start:.1f} s")
    sweep, chosen = [], None
    for leaves in scann_leaf_candidates(index.config.num_leaves):
        view = index.with_search_config(leaves_to_search=leaves)
        _, ids = view.search(queries, ARGS.k)
        recall = bench_common.recall_at_k(ids, true_ids)
        batch_s = median_of(lambda: view.search(queries[: ARGS.batch], ARGS.k), 5)
        sweep.append(dict(leaves_to_search=leaves, recall=recall, batch_search_s=batch_s))
        log(f"  leaves_to_search {leaves}/{index.config.num_leaves}: recall@{ARGS.k} {recall:.4f}, "
            f"{ms(batch_s)} per {ARGS.batch} queries")
        if recall >= ARGS.recall_target:
            chosen = view
            break
    if chosen is None:
        chosen = view
        log(f"scann: no setting reached recall {ARGS.recall_target}; timing the last one")
    # The lookup reads `indexes` at call time, so the tuned view replaces the built default.
    host_memory.indexes["image"] = chosen
    _, batch_ids = chosen.search(batch_queries, ARGS.k)
    batch_recall = bench_common.recall_at_k(batch_ids, batch_true_ids)
    model = reco_lib.RECO(clip, reco_config, rngs=nnx.Rngs(1)).attach_memory(host_memory)
    result = bench.compare("scann", model, dict(
        backend="scann", build_s=build_s, num_leaves=chosen.config.num_leaves,
        leaves_to_search=chosen.config.leaves_to_search, reorder_k=chosen.config.reorder_k,
        recall=sweep[-1]["recall"], recall_of_clip_batch=batch_recall, sweep=sweep))
    log(f"  [scann] recall@{ARGS.k} on the CLIP batch's own queries {batch_recall:.4f} "
        f"(random-weight CLIP embeddings lie outside the memory's clusters; see RESULTS.md)")
    del model, host_memory, index, chosen, view
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------------


def main() -> int:
    backends = [name for name in ARGS.backend.split(",") if name]
    unknown = sorted(set(backends) - {"exact", "scann"})
    if unknown:
        raise SystemExit(f"--backend takes exact and/or scann, got {unknown}; approx is TPU-only (see the docstring).")
    log(f"machine: {bench_common.machine()}")
    log(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device), load at start: {load()}")
    log(f"memory {ARGS.memory_size} x 512, batch {ARGS.batch}, k {ARGS.k}, iters {ARGS.iters} x {ARGS.rounds} rounds, "
        f"noise {ARGS.noise}, {ARGS.rows_per_centre} rows per centre")

    config = models.vit_b32()
    clip = models.CLIP(config, rngs=nnx.Rngs(0))
    reco_section = reco_lib.reco_config()
    reco_section.k = ARGS.k
    reco_config = reco_lib.RecoConfig.from_config(reco_section, embed_dim=config.embed_dim)
    rng = np.random.default_rng(ARGS.seed)
    size = config.vision.image_size
    pixels = rng.standard_normal((ARGS.batch, size, size, 3), dtype=np.float32)
    clip_encoder = BatchedEncoder(clip, "encode_image", ARGS.batch)
    start = time.perf_counter()
    batch_queries = clip_encoder(pixels)
    log(f"CLIP encode_image first call (compile + run) {time.perf_counter() - start:.1f} s")
    bench = Bench(clip_encoder, pixels, batch_queries)

    with tempfile.TemporaryDirectory(dir=ARGS.tmpdir) as directory:
        num_centres = max(1, ARGS.memory_size // ARGS.rows_per_centre)
        centres = np.random.default_rng(ARGS.seed + 2).standard_normal((num_centres, config.embed_dim), np.float32)
        start = time.perf_counter()
        image_memory, text_memory = write_memory(directory, ARGS.memory_size, centres, ARGS.noise, ARGS.seed + 3)
        generate_s = time.perf_counter() - start
        log(f"memory generated and written in {generate_s:.1f} s ({num_centres} centres)")
        for backend in backends:
            if backend == "exact":
                for dtype in ARGS.exact_dtypes.split(","):
                    run_exact(bench, clip, reco_config, image_memory, text_memory, dtype)
            else:
                run_scann(bench, clip, reco_config, image_memory, text_memory, centres, batch_queries)
        del image_memory, text_memory

    log(f"load at end: {load()}, peak RSS {peak_rss_gb():.1f} GB")
    log(f"summary (median per batch of {ARGS.batch} images; ratio = RECO / CLIP):")
    for result in bench.results:
        parts = ", ".join(f"{part} {ms(value)}" for part, value in result["breakdown"].items())
        per_round = [round(row["ratio"], 3) for row in result["rounds"]]
        log(f"  {result['name']:<16} CLIP {ms(result['clip_s'])}  RECO {ms(result['reco_s'])}  "
            f"ratio {result['ratio']:.3f}  paired {result['paired_ratio']:.3f}  per-round {per_round}  "
            f"build {result['build_s']:.1f} s  | {parts}")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(dict(args=vars(ARGS), machine=bench_common.machine(), memory_generate_s=generate_s,
                           results=bench.results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
