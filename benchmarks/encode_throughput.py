"""Image and text encoding throughput: our jitted CLIP vs transformers' PyTorch CLIPModel.

Both models load the same randomly initialised Hugging Face directory (written once by
``save_pretrained``), run on the same machine in the same process, and use every core
(torch.set_num_threads(os.cpu_count()); XLA's CPU client uses all cores by default).
Timed batches alternate between the two implementations so that load from other
processes hits both alike; the per-batch median is reported.

  python benchmarks/encode_throughput.py --shapes vit_b32,vit_b16 --batch 32 --iters 5
  python benchmarks/encode_throughput.py --xla_flags=--xla_cpu_use_thunk_runtime=false

Prints images/s and texts/s for each implementation and the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import bench_common


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="vit_b32,vit_b16",
                        help="comma-separated presets from vlm_jax.models (vit_b32, vit_b16, vit_l14, siglip_b16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed batches per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches after compilation")
    parser.add_argument("--dtype", default="float32", help="compute dtype of our model")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
    parser.add_argument("--skip_text", action="store_true")
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _interleaved(ours, reference, iters: int) -> tuple[list[float], list[float]]:
    """Per-batch seconds of ours and reference, run alternately."""
    ours_times, reference_times = [], []
    for _ in range(iters):
        start = time.perf_counter()
        ours()
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference()
        reference_times.append(time.perf_counter() - start)
    return ours_times, reference_times


def main() -> None:
    args = _parse_args()
    bench_common.append_xla_flags(args.xla_flags)

    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from vlm_jax import models
    from vlm_jax.weights import load_model, save_pretrained

    torch.set_num_threads(args.threads)
    print(f"machine: {bench_common.machine()}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  load average at start: {_load()}")

    results = []
    for shape in args.shapes.split(","):
        config = getattr(models, shape)()
        with tempfile.TemporaryDirectory() as directory:
            save_pretrained(models.CLIP(config, rngs=nnx.Rngs(0)), directory)
            ours = load_model(directory, dtype=args.dtype)
            reference = transformers.CLIPModel.from_pretrained(directory).eval()

        graphdef, state = nnx.split(ours)

        @jax.jit
        def encode_image(state, pixels):
            return nnx.merge(graphdef, state).encode_image(pixels)

        @jax.jit
        def encode_text(state, ids):
            return nnx.merge(graphdef, state).encode_text(ids)

        rng = np.random.default_rng(0)
        size = config.vision.image_size
        pixels = rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
        ids = rng.integers(1, config.text.vocab_size - 1, size=(args.batch, config.text.context_length))
        ids[:, -1] = config.text.eos_token_id
        ids = ids.astype(np.int32)
        pixels_jax, ids_jax = jax.device_put(pixels), jax.device_put(ids)
        pixels_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        ids_torch = torch.from_numpy(ids.astype(np.int64))

        def ours_image():
            return encode_image(state, pixels_jax).block_until_ready()

        def ours_text():
            return encode_text(state, ids_jax).block_until_ready()

        def reference_image():
            with torch.inference_mode():
                return reference.get_image_features(pixel_values=pixels_torch).pooler_output

        def reference_text():
            with torch.inference_mode():
                return reference.get_text_features(input_ids=ids_torch).pooler_output

        tasks = [("image", ours_image, reference_image)]
        if not args.skip_text:
            tasks.append(("text", ours_text, reference_text))
        for task, ours_fn, reference_fn in tasks:
            start = time.perf_counter()
            ours_out = np.asarray(ours_fn())
            compile_s = time.perf_counter() - start
            diff = float(np.abs(ours_out - reference_fn().numpy()).max())
            for _ in range(args.warmup):
                ours_fn()
                reference_fn()
            ours_times, reference_times = _interleaved(ours_fn, reference_fn, args.iters)
            ours_rate = args.batch / statistics.median(ours_times)
            reference_rate = args.batch / statistics.median(reference_times)
            row = dict(shape=shape, task=task, batch=args.batch, iters=args.iters,
                       ours_per_s=ours_rate, reference_per_s=reference_rate,
                       ratio=ours_rate / reference_rate, max_abs_diff=diff,
                       ours_first_call_s=compile_s, load_average=_load())
            results.append(row)
            unit = "images/s" if task == "image" else "texts/s"
            print(f"{shape} {task}: ours {ours_rate:.2f} {unit}, transformers {reference_rate:.2f} {unit}, "
                  f"ratio {row['ratio']:.2f}x  (max |diff| {diff:.1e}, first call {compile_s:.1f}s, "
                  f"load {row['load_average']})", flush=True)
        del reference, ours, state

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=bench_common.machine(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                           results=results), f, indent=2)


if __name__ == "__main__":
    main()
