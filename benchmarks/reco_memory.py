"""Host memory of precomputed RECO training at the `cc12m_b32` shapes: peak RSS over the memory's bytes.

    python benchmarks/reco_memory.py                       # 1M-row float16 memory, ViT-B/32 width 512
    python benchmarks/reco_memory.py --rows=100000 --steps=2

Writes a memory of `--rows` unit float16 pairs [N, 512] and `--train_rows` stored training pairs in
the memory builder's format (random rows: only shapes and bytes matter here), then runs the RECO
trainer with the `cc12m_b32` preset's fusion, k and batch (neighbours precomputed on the placed
table, ids in the batch, values gathered on device) for `--steps` steps. Reports:
  - peak host RSS (VmHWM) of the whole process divided by the memory's bytes on disk (target <= 1.5:
    the memory is held once; on a CPU the device copy is host memory too), and the same for the
    peak above what the process held before it read the memory (libraries, frozen CLIP);
  - host-to-device bytes per step: the batch the trainer puts on device (query embeddings and
    neighbour ids [B, k], not neighbour values [B, k, D]).
The memory and the training pairs are written once into --dir and reused.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine  # noqa: E402


def write_store(directory: str, rows: int, dim: int, shard_size: int, seed: int) -> None:
    """A finished memory directory of random unit float16 pairs (the builder's format)."""
    import numpy as np

    from vlm_jax.memory import store

    if os.path.exists(os.path.join(directory, store.COMPLETE_FILE)):
        return
    os.makedirs(directory, exist_ok=True)
    ranges = store.shard_ranges(rows, shard_size)
    rng = np.random.default_rng(seed)
    for shard, (start, stop) in enumerate(ranges):
        for field in store.EMBEDDING_FIELDS:
            values = rng.standard_normal((stop - start, dim), np.float32)
            values /= np.linalg.norm(values, axis=1, keepdims=True)
            store.save_array(store.array_path(directory, shard, field), values.astype(np.float16))
        store.save_array(store.array_path(directory, shard, "indices"), np.arange(start, stop, dtype=np.int64))
        store.save_array(store.array_path(directory, shard, "ids"), np.asarray([f"{seed}-{i}" for i in range(start, stop)]))
        store.save_json(store.record_path(directory, shard), {"shard": shard, "start": start, "stop": stop,
                                                              "rows": stop - start, "bad_input": {}, "seconds": 0.0})
    manifest = {"format_version": store.FORMAT_VERSION, "config": {"data": {"source": "array_record",
                "paths": f"synthetic-{seed}"}}, "model": {}, "embed_dim": dim, "dtype": "float16",
                "shard_size": shard_size, "source_rows": rows, "num_shards": len(ranges),
                "fields": ["image_embeddings", "text_embeddings", "ids", "indices"]}
    store.save_json(os.path.join(directory, store.MANIFEST_FILE), manifest)
    store.save_json(os.path.join(directory, store.COMPLETE_FILE), {"num_rows": rows, "bad_input": {}, "seconds": 0.0})


def status_bytes(field: str) -> int:
    """A /proc/self/status field in bytes: VmHWM (peak RSS) or VmRSS (current RSS)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--train_rows", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dir", default="/tmp/vlm_jax_reco_memory")
    args = parser.parse_args()

    import jax
    import ml_collections
    import numpy as np
    from flax import nnx

    from vlm_jax import config_lib
    from vlm_jax.methods import reco
    from vlm_jax.models.clip import CLIP, tiny
    from vlm_jax.train import trainer
    from vlm_jax.weights import save_pretrained

    dim = 512
    memory_dir, train_dir, clip_dir = (os.path.join(args.dir, name) for name in ("memory", "train", "clip"))
    write_store(memory_dir, args.rows, dim, 1 << 18, seed=0)
    write_store(train_dir, args.train_rows, dim, 1 << 18, seed=1)
    if not os.path.exists(os.path.join(clip_dir, "config.json")):
        # The frozen towers never run on stored embeddings: a tiny CLIP of embed_dim 512 stands in for B/32.
        save_pretrained(CLIP(tiny(embed_dim=dim), rngs=nnx.Rngs(0)), clip_dir)
    memory_bytes = sum(os.path.getsize(os.path.join(memory_dir, name)) for name in os.listdir(memory_dir)
                       if "_embeddings" in name)

    preset = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "experiments", "reco.py")
                                         + ":cc12m_b32")
    config = trainer.trainer_config()
    config.update(method="reco", clip_dir=clip_dir, dtype="float32", global_batch_size=args.batch,
                  total_steps=args.steps, log_every=1, progress=False, evals=ml_collections.ConfigDict())
    config.reco = preset.reco
    config.reco.update(memory_dir=memory_dir, train_embeddings_dirs=(train_dir,), training_retrieval="precomputed",
                       exclude_self=False)
    config.optim = preset.optim
    config.optim.total_steps = args.steps
    config.optim.warmup_steps = 1
    config.checkpoint.save_interval_steps = 10 ** 9
    config.sharding.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))

    method = reco.RecoMethod()
    # What the process holds before the memory is read: the libraries, the frozen CLIP, the configs.
    method.create_model(config, nnx.Rngs(0))
    before_memory = status_bytes("VmRSS")
    jax.block_until_ready(method._table(memory_dir, reco.parse_reco(config.reco).index, None).image_embeddings)
    after_placing, peak_placing = status_bytes("VmRSS"), status_bytes("VmHWM")
    batch = next(method.train_iterator(config, 0, 1))
    after_neighbours = status_bytes("VmHWM")
    batch_bytes = {name: int(np.asarray(value).nbytes) for name, value in batch.items()}
    started = time.perf_counter()
    workdir = os.path.join(args.dir, f"run-{os.getpid()}")
    trainer.train(config, workdir, method)
    seconds = time.perf_counter() - started
    peak = status_bytes("VmHWM")
    values_bytes = 2 * args.batch * config.reco.k * dim * 4
    result = {
        "machine": machine(), "jax": jax.__version__, "memory_rows": args.rows, "train_rows": args.train_rows,
        "memory_bytes_on_disk": memory_bytes, "peak_rss_bytes": peak, "peak_rss_over_memory": peak / memory_bytes,
        "rss_before_memory_bytes": before_memory, "rss_after_placing_bytes": after_placing,
        "peak_rss_while_placing_bytes": peak_placing,
        "memory_held_over_memory": (after_placing - before_memory) / memory_bytes,
        "peak_rss_after_placing_and_searching_bytes": after_neighbours,
        "peak_rss_above_start_over_memory": (peak - before_memory) / memory_bytes,
        "host_to_device_bytes_per_step": sum(batch_bytes.values()), "batch_fields": batch_bytes,
        "neighbour_values_bytes_if_shipped": values_bytes, "steps": args.steps, "train_seconds": round(seconds, 1),
    }
    print(json.dumps(result, indent=1))
    print(f"memory held: {(after_placing - before_memory) / 2**30:.2f} GiB for {memory_bytes / 2**30:.2f} GiB on disk = "
          f"{(after_placing - before_memory) / memory_bytes:.2f} (peak while placing "
          f"{(peak_placing - before_memory) / memory_bytes:.2f}); with the neighbour search "
          f"{(after_neighbours - before_memory) / memory_bytes:.2f}")
    print(f"peak RSS {peak / 2**30:.2f} GiB / memory on disk {memory_bytes / 2**30:.2f} GiB = "
          f"{peak / memory_bytes:.2f} (target <= 1.5); above the {before_memory / 2**30:.2f} GiB held before the "
          f"memory is read: {(peak - before_memory) / memory_bytes:.2f}; host->device {sum(batch_bytes.values()) / 2**20:.2f} MiB per "
          f"step (neighbour values would add {values_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
