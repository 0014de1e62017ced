"""Memory search side by side: every vlm_jax backend and backend="auto" (and optionally FAISS), at equal threads.

Datasets (`--datasets`, both by default):
  hard: `--n` (or `--rows`) unit vectors of width `--dim`, each a Gaussian centre (one per 50 rows by
    default, i.e. 20,000 at 1M; `--centres`) plus Gaussian noise, normalized. Centres and noise have
    per-dimension variance 1 and `--noise` times that standard deviation, so `--noise` is the
    noise-to-centre norm ratio. At 1.2 neighbourhoods are clean clusters (50k rows: IVF-Flat nprobe 8
    reaches recall@10 1.0); between 2 and 3 they dissolve (2.0: 0.93, 2.5: 0.60, 3.0: 0.25; 4 is nearly
    isotropic). Hardness grows with N at a fixed ratio (more centres crowd the sphere): at 1M rows 1.2
    already holds IVF-Flat at nprobe 8 to 0.69, while 2.5 leaves even ScaNN searching half its leaves at
    0.75. So the default follows N: 2.5 below 200,000 rows, 1.2 from there, both the hard case (IVF-Flat
    at nprobe 8 below recall@10 0.9; the `ivf` group prints that check). Queries are fresh draws.
  shapes: real-shaped embeddings: the image embeddings of `--shapes-rows` rendered Shapes World memory
    images (the `memory` split's generator, balanced over the 256 entities) under the Shapes World base
    CLIP (the cached CLIP of experiments/clip.py, trained once if missing; or `--clip-dir`), normalized;
    `--queries` further renders are the queries. `--shapes-embeddings FILE` keeps them for the next run.
Ground truth is exact top-k, computed in chunks of rows so that [queries, N] scores never sit in memory.

Groups (`--groups`, less `--skip`), every one at `--threads` threads (ScaNN's search pool, FAISS's
OpenMP threads, XLA's CPU intra-op threads, BLAS) and `--batch` queries per search step:
  exact, scann, hnsw: each backend with its default build, searched at every rung of the ladders
    `backend="auto"` climbs (`vlm_jax.memory.auto.ladders`); a ladder stops at recall 0.995.
  auto: `backend="auto"` at `--recall-target` (`--auto-sample-rows`, `--auto-confirm`; its build s
    includes all its measuring), searched at the settings it chose.
  scann_builds, ivf, faiss_hnsw (not run by default): two more ScaNN builds (4 sqrt(N) leaves without
    and with SOAR, leaves swept), FAISS IVF-Flat and FAISS HNSW32 at efConstruction 80; with FAISS rows,
    each ScaNN setting's q/s ratio to the FAISS settings of equal or higher recall is printed too.
Rows: backend, settings, recall@k, q/s (whole query set, fastest of two or more passes over at least
0.5 s) and build time. Then, per dataset, each backend's best q/s at recall >= target, auto's choice,
whether the chosen backend's best q/s at the target is within 10% of the best backend's, and the same
for auto's own index at the rung it tuned on its held-out rows (all re-timed in alternation, so load
hits each).
FAISS is the optional extra `pip install -e ".[hnsw]"`.

Full run (hard: 2 GB of vectors, ~16 GB peak memory; about 3-4 hours on one idle core):
    python benchmarks/memory_search.py --rows 1000000 --shapes-rows 200000 --threads 1 \\
        --shapes-embeddings /tmp/shapes_200k.npz
Quick check:
    python benchmarks/memory_search.py --rows 20000 --shapes-rows 20000 --queries 300 --auto-sample-rows 8000
"""

import argparse
import os
import pathlib
import sys

GROUPS = ("exact", "scann", "hnsw", "auto", "scann_builds", "ivf", "faiss_hnsw")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", "--rows", dest="n", type=int, default=1_000_000, help="hard memory rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="threads for every method")
    parser.add_argument("--centres", type=int, default=None, help="Gaussian centres (default n // 50)")
    parser.add_argument("--noise", type=float, default=None,
                        help="noise-to-centre norm ratio (default: 2.5 below 200,000 rows, 1.2 from there; see above)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="hard,shapes", help="comma-separated: hard,shapes")
    parser.add_argument("--groups", default="exact,scann,hnsw,auto", help=f"comma-separated, of {','.join(GROUPS)}")
    parser.add_argument("--skip", default="", help="comma-separated groups to leave out of --groups")
    parser.add_argument("--batch", type=int, default=128, help="queries per search step, every backend")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--auto-sample-rows", type=int, default=100_000)
    parser.add_argument("--auto-confirm", type=int, default=2, help="auto_confirm: candidates measured on the memory")
    parser.add_argument("--auto-measure-s", type=float, default=0.25,
                        help="auto_measure_s: seconds each deciding rung is searched again for")
    parser.add_argument("--shapes-rows", type=int, default=200_000, help="rendered Shapes World memory rows")
    parser.add_argument("--clip-dir", default="", help="CLIP for the shapes embeddings (default: the base CLIP)")
    parser.add_argument("--shapes-embeddings", default="", help=".npz that keeps the shapes embeddings between runs")
    return parser.parse_args()


ARGS = parse_args()
# Thread counts must be fixed before numpy, jax and faiss start their pools.
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS.threads == 1:
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
else:
    os.environ["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={ARGS.threads}"

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import bench_common  # noqa: E402

from vlm_jax.memory import auto  # noqa: E402
from vlm_jax.memory import index as index_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STOP_RECALL = 0.995  # a ladder's sweep stops here: higher rungs only cost time


def make_vectors(num_rows, num_queries, dim, num_centres, noise, seed, chunk=100_000):
    """float32 [num_rows, dim] memory and [num_queries, dim] queries, unit norm, same centres."""
    rng = np.random.default_rng(seed)
    # Centres and noise both have per-dimension variance 1, so `noise` is the noise-to-centre norm ratio.
    centres = rng.standard_normal((num_centres, dim), dtype=np.float32)
    total = num_rows + num_queries
    vectors = np.empty((total, dim), dtype=np.float32)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        block = centres[rng.integers(num_centres, size=stop - start)]
        block += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start:stop] = block
    return vectors[:num_rows], vectors[num_rows:]


def base_clip_dir():
    """The Shapes World base CLIP (experiments/clip.py's default), from the shared cache; trained once if missing."""
    from vlm_jax.config_lib import experiment_module, load_config_file
    from vlm_jax.methods.clip import ClipMethod
    from vlm_jax.methods.runner import cached_model_dir

    path = ROOT / "experiments" / "clip.py"
    return cached_model_dir(load_config_file(str(path)), ClipMethod(), module=experiment_module(path), cache_dir=None,
                            what="the Shapes World base CLIP")


def shapes_embeddings(num_rows, num_queries, clip_dir, seed, batch=512):
    """Unit float32 image embeddings [num_rows, D] and [num_queries, D] of distinct rendered memory images."""
    import jax
    from flax import nnx

    from vlm_jax.data.preprocess import preprocess_images
    from vlm_jax.data.shapes_world import world
    from vlm_jax.weights import load_pretrained

    total = num_rows + num_queries
    config = world.WorldConfig(memory_per_entity=math.ceil(total / world.NUM_ENTITIES))
    generator = world.World(config)
    # Memory example i shows entity i // memory_per_entity: a random subset stays balanced over entities.
    indices = np.random.default_rng(seed).permutation(config.num_examples("memory"))[:total]
    pretrained = load_pretrained(clip_dir)
    graphdef, state = nnx.split(pretrained.model)
    encode = jax.jit(lambda state, pixels: nnx.merge(graphdef, state).encode_image(pixels))
    embeddings = None
    started = time.perf_counter()
    for start in range(0, total, batch):
        chunk = indices[start : start + batch]
        images = [world.decode_png(generator.example("memory", int(i))["image"]) for i in chunk]
        encoded = np.asarray(encode(state, preprocess_images(images, pretrained.preprocess)), np.float32)
        if embeddings is None:
            embeddings = np.empty((total, encoded.shape[1]), np.float32)
        embeddings[start : start + len(encoded)] = encoded
        if start // batch % 50 == 0:
            print(f"  shapes: {start + len(encoded)}/{total} rendered and embedded, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings[:num_rows], embeddings[num_rows:]


def load_shapes():
    clip_dir = ARGS.clip_dir or base_clip_dir()
    meta = {"rows": ARGS.shapes_rows, "queries": ARGS.queries, "clip_dir": str(clip_dir), "seed": ARGS.seed}
    cache = pathlib.Path(ARGS.shapes_embeddings) if ARGS.shapes_embeddings else None
    if cache and cache.exists():
        with np.load(cache) as stored:
            if json.loads(str(stored["meta"])) == meta:
                print(f"shapes embeddings from {cache}", flush=True)
                return stored["keys"], stored["queries"]
    keys, queries = shapes_embeddings(ARGS.shapes_rows, ARGS.queries, clip_dir, ARGS.seed)
    if cache:
        np.savez(cache, keys=keys, queries=queries, meta=json.dumps(meta))
    return keys, queries


def timed_search(search, queries, repeats=2, min_s=0.5):
    """(ids [Q, k], queries per second): the fastest of at least `repeats` full passes, more until
    `min_s` seconds have passed (a fast index answers 1,000 queries in a few ms), after a small warm-up."""
    search(queries[:32])
    best, started, passes = math.inf, time.perf_counter(), 0
    while passes < repeats or time.perf_counter() - started < min_s:
        start = time.perf_counter()
        ids = search(queries)
        best, passes = min(best, time.perf_counter() - start), passes + 1
    return ids, len(queries) / best


class Report:
    def __init__(self, dataset, true_ids, target):
        self.dataset, self.true_ids, self.target = dataset, true_ids, target
        self.rows = []
        self.best = {}  # family -> (q/s, search function) of its fastest row at recall >= target

    def add(self, family, method, setting, build_s, search, queries):
        ids, qps = timed_search(search, queries)
        row = {"dataset": self.dataset, "family": family, "method": method, "setting": setting,
               "recall": bench_common.recall_at_k(ids, self.true_ids), "qps": qps, "build_s": build_s}
        self.rows.append(row)
        if row["recall"] >= self.target and qps > self.best.get(family, (0.0, None))[0]:
            self.best[family] = (qps, search, row)
        print(f"{method:<34} {setting:<40} recall@{self.true_ids.shape[1]} {row['recall']:.4f}  {qps:9.1f} q/s  "
              f"build {build_s:7.1f} s", flush=True)
        return row


def describe(settings):
    return ", ".join(f"{name} {value}" for name, value in settings.items()) or "-"


def build_timed(config, keys):
    start = time.perf_counter()
    index = index_lib.build_index(config, keys)
    return index, time.perf_counter() - start


def run_backend(report, backend, keys, queries, k, threads):
    """One default build of `backend`, searched at every rung of auto's ladders until recall STOP_RECALL."""
    index, build_s = build_timed({"backend": backend, "normalize": False, "num_threads": threads,
                                  "batch_size": ARGS.batch}, keys)
    for ladder in auto.ladders(index):
        for rung, overrides in enumerate(ladder):
            if rung and overrides == ladder[rung - 1]:
                continue
            view = index.with_search_config(**overrides)
            row = report.add(backend, f"vlm_jax {backend}", describe(overrides), build_s,
                             lambda q, v=view: v.search(q, k)[1], queries)
            if row["recall"] >= STOP_RECALL:
                break


def run_auto(report, keys, queries, k, threads):
    config = {"backend": "auto", "normalize": False, "num_threads": threads, "auto_threads": threads,
              "batch_size": ARGS.batch, "recall_target": ARGS.recall_target, "auto_k": k,
              "auto_sample_rows": ARGS.auto_sample_rows, "auto_queries": ARGS.queries,
              "auto_confirm": ARGS.auto_confirm, "auto_measure_s": ARGS.auto_measure_s}
    index, build_s = build_timed(config, keys)
    chosen = index.choice["chosen"]
    choice = index.choice
    lowest = ", ".join(f"{point['backend']} {point['qps']:.0f} ({describe(point['settings'])})"
                       for point in choice["confirmed"] if point["lowest"])
    print(f"auto measured for {choice['measure_s']:.1f} s: samples {choice['sample_rows']}, projected q/s "
          + (", ".join(f"{name} {qps:.0f}" if qps else f"{name} -" for name, qps in choice["projected_qps"].items())
             or "-") + f"; on the memory less {choice['queries']} held-out rows: {lowest or '-'}", flush=True)
    search = lambda q: index.search(q, k)[1]  # noqa: E731
    report.add("auto", f"vlm_jax auto -> {chosen['backend']}", describe(chosen["settings"]), build_s, search, queries)
    return index.choice, search


def run_scann_builds(report, keys, queries, k, threads):
    """ScaNN with as many leaves as the FAISS IVF lists below, without and with SOAR, leaves swept."""
    leaves = 4 * max(2, round(math.sqrt(len(keys))))
    for name, overrides in ((f"scann {leaves} leaves", {"soar_lambda": None}), (f"scann {leaves} leaves SOAR", {})):
        index, build_s = build_timed({"backend": "scann", "normalize": False, "num_threads": threads,
                                      "batch_size": ARGS.batch, "num_leaves": leaves, **overrides}, keys)
        for fraction in (0.1, 0.2, 0.3, 0.4, 0.5):
            view = index.with_search_config(leaves_to_search=round(fraction * leaves))
            report.add("scann_builds", f"vlm_jax {name}", f"search {view.config.leaves_to_search}/{leaves} leaves",
                       build_s, lambda q, v=view: v.search(q, k)[1], queries)


def run_faiss_ivf(report, keys, queries, k):
    import faiss

    num_lists = 4 * round(math.sqrt(len(keys)))
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(keys.shape[1])
    index = faiss.IndexIVFFlat(quantizer, keys.shape[1], num_lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(1).choice(len(keys), min(len(keys), 64 * num_lists), replace=False)
    index.train(keys[np.sort(sample)])
    index.add(keys)
    build_s = time.perf_counter() - start
    for nprobe in (8, 32, 128, 512, 1024):
        if nprobe <= num_lists:
            index.nprobe = nprobe
            report.add("faiss", f"faiss IVF{num_lists},Flat", f"nprobe {nprobe}", build_s,
                       lambda q: index.search(q, k)[1], queries)
    ivf8 = [row for row in report.rows if row["family"] == "faiss" and row["setting"] == "nprobe 8"]
    verdict = "hard enough" if ivf8[0]["recall"] < 0.9 else "too easy: raise --noise"
    print(f"hardness check: FAISS IVF-Flat nprobe 8 recall@{k} {ivf8[0]['recall']:.4f} ({verdict})")


def run_faiss_hnsw(report, keys, queries, k):
    import faiss

    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(keys.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(keys)
    build_s = time.perf_counter() - start
    for ef in (32, 64, 128, 256, 512):
        index.hnsw.efSearch = ef
        report.add("faiss", "faiss HNSW32 (efConstruction 80)", f"efSearch {ef}", build_s,
                   lambda q: index.search(q, k)[1], queries)


def compare_scann_to_faiss(rows, recall_floor, speedup=1.5):
    """For each ScaNN setting at recall >= floor, its q/s ratio to every FAISS setting of equal or higher recall."""
    faiss_rows = [row for row in rows if row["family"] == "faiss"]
    met = False
    for row in (row for row in rows if "scann" in row["family"] and row["recall"] >= recall_floor):
        rivals = [other for other in faiss_rows if other["recall"] >= row["recall"]]
        met |= min((row["qps"] / other["qps"] for other in rivals), default=math.inf) >= speedup
        print(f"{row['method']} [{row['setting']}] recall {row['recall']:.4f} {row['qps']:.1f} q/s | vs FAISS of equal "
              "or higher recall: " + (", ".join(f"{row['qps'] / o['qps']:.1f}x {o['method']} {o['setting']}"
                                               for o in rivals) or "none reaches it"))
    print(f"target (a scann setting at recall >= {recall_floor} with >= {speedup}x the q/s of every FAISS setting of "
          f"equal or higher recall): {'met' if met else 'not met'}")


def compare(report, queries, auto_run, rounds=3):
    """Auto against the best single backend at the target: its choice (the chosen backend's best row
    against the best backend's) and its own index (at the rung it tuned), all re-timed in alternation."""
    singles = {family: best for family, best in report.best.items() if family in ("exact", "scann", "hnsw")}
    print(f"[{report.dataset}] best q/s at recall >= {report.target}: " + ", ".join(
        f"{family} {qps:.1f} ({row['setting']})" for family, (qps, _, row) in singles.items()))
    summary = {"best_single": {family: row for family, (_, _, row) in singles.items()}}
    if auto_run is None or not singles:
        return summary
    choice, auto_search = auto_run
    chosen, best_family = choice["chosen"]["backend"], max(singles, key=lambda family: singles[family][0])
    searches = {"best": singles[best_family][1], "auto index": auto_search}
    if chosen != best_family and chosen in singles:
        searches["chosen backend"] = singles[chosen][1]
    qps = dict.fromkeys(searches, 0.0)
    for _ in range(rounds):
        for name, search in searches.items():
            qps[name] = max(qps[name], timed_search(search, queries, repeats=1)[1])
    chosen_qps = qps["best"] if chosen == best_family else qps.get("chosen backend", 0.0)
    auto_recall = next(row for row in report.rows if row["family"] == "auto")["recall"]
    choice_within = chosen_qps >= 0.9 * qps["best"]
    index_within = auto_recall >= report.target and qps["auto index"] >= 0.9 * qps["best"]
    best_setting = singles[best_family][2]["setting"]
    print(f"[{report.dataset}] auto chose {chosen}: its best row at the target {chosen_qps:.1f} q/s vs the best "
          f"backend {best_family} ({best_setting}) {qps['best']:.1f} q/s, re-timed -> ratio "
          f"{chosen_qps / qps['best']:.2f}; within 10%: {'yes' if choice_within else 'no'}", flush=True)
    print(f"[{report.dataset}] auto's own index ({describe(choice['chosen']['settings'])}, tuned on "
          f"{choice['queries']} held-out memory rows): recall {auto_recall:.4f} on these queries, "
          f"{qps['auto index']:.1f} q/s -> ratio {qps['auto index'] / qps['best']:.2f}; within 10% at the target: "
          f"{'yes' if index_within else 'no'}", flush=True)
    return {**summary, "best_family": best_family, "chosen": chosen, "qps": qps, "auto_recall": auto_recall,
            "choice_within_10pct": choice_within, "index_within_10pct": index_within, "auto_choice": choice}


def run_dataset(name, keys, queries, groups):
    start = time.perf_counter()
    true_ids = bench_common.exact_top_k(keys, queries, ARGS.k)
    print(f"[{name}] memory {keys.shape[0]} x {keys.shape[1]}, {len(queries)} queries, k {ARGS.k}, threads "
          f"{ARGS.threads}; ground truth {time.perf_counter() - start:.1f} s", flush=True)
    report = Report(name, true_ids, ARGS.recall_target)
    for backend in ("exact", "scann", "hnsw"):
        if backend in groups:
            run_backend(report, backend, keys, queries, ARGS.k, ARGS.threads)
    auto_run = run_auto(report, keys, queries, ARGS.k, ARGS.threads) if "auto" in groups else None
    if "scann_builds" in groups:
        run_scann_builds(report, keys, queries, ARGS.k, ARGS.threads)
    if "ivf" in groups:
        run_faiss_ivf(report, keys, queries, ARGS.k)
    if "faiss_hnsw" in groups:
        run_faiss_hnsw(report, keys, queries, ARGS.k)
    if any(row["family"] == "faiss" for row in report.rows):
        compare_scann_to_faiss(report.rows, ARGS.recall_target)
    return {"rows": report.rows, **compare(report, queries, auto_run)}


def main():
    groups = set(filter(None, ARGS.groups.split(","))) - set(filter(None, ARGS.skip.split(",")))
    unknown = groups - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; expected some of {list(GROUPS)}.")
    print(f"machine: {bench_common.machine()}; threads {ARGS.threads}, recall target {ARGS.recall_target}", flush=True)
    results = {"args": vars(ARGS), "machine": bench_common.machine(), "datasets": {}}
    for dataset in filter(None, ARGS.datasets.split(",")):
        if dataset == "hard":
            noise = ARGS.noise if ARGS.noise is not None else (2.5 if ARGS.n < 200_000 else 1.2)
            num_centres = ARGS.centres or max(1, ARGS.n // 50)
            print(f"[hard] {num_centres} centres, noise {noise}", flush=True)
            keys, queries = make_vectors(ARGS.n, ARGS.queries, ARGS.dim, num_centres, noise, ARGS.seed)
        elif dataset == "shapes":
            keys, queries = load_shapes()
        else:
            raise SystemExit(f"unknown dataset {dataset!r}; expected hard or shapes.")
        results["datasets"][dataset] = run_dataset(dataset, keys, queries, groups)
        del keys, queries
    print("JSON " + json.dumps(results, default=float))


if __name__ == "__main__":
    sys.exit(main())
