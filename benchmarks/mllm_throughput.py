"""Embedded MLLM throughput on this machine: candidate scoring, generation, and serving over HTTP.

The model is a captioner export (`--model_dir`, what experiments/captioner.py writes) or, without one, a
random-init captioner of the Shapes World preset's sizes (image tower 64 px, 8 px patches, width 128, depth 3,
4 heads, MLP 256; decoder width 128, depth 2, 4 heads, MLP 512; context 160; the Shapes World tokenizer, vocab
640), saved with `save_captioner` to a temporary directory and loaded back with `EmbeddedMLLM.load`.

Timed (each after an untimed warm-up call with the same shapes, so compilation is excluded; the median of
`--iters` calls):
  score     `EmbeddedMLLM.score`: `--score_images` random images x 5 random Shapes World entity names (about
            4 tokens each) -> candidates/s.
  generate  `EmbeddedMLLM.generate`, batch `--batch` (one jitted call), `--max_tokens`, greedy and beam
            search (`--beam`) -> tokens/s, counting batch x max_tokens (decoding always runs max_tokens
            steps; after eos a row decodes pad).
  http      `OpenAIClient.generate` (png images, max_tokens `--http_max_tokens`) against `make_server` over
            the same backend on loopback, `--requests` requests at each client concurrency of
            `--concurrency` -> requests/s. The server gathers concurrent requests into one backend call of
            at most the backend's batch size (`--batch`), padded to it.

  python benchmarks/mllm_throughput.py --output /tmp/mllm_throughput.json
  python benchmarks/mllm_throughput.py --model_dir /path/to/captioner/export
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import bench_common

PROMPT = "What is this?"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="", help="a captioner export; '': a random Shapes World-sized one")
    parser.add_argument("--batch", type=int, default=64, help="the backend's batch size (rows per jitted call)")
    parser.add_argument("--score_images", type=int, default=256, help="images per score call (5 candidates each)")
    parser.add_argument("--max_tokens", type=int, default=32, help="generate: tokens per answer")
    parser.add_argument("--beam", type=int, default=4, help="generate: the beam search's beam size")
    parser.add_argument("--http_max_tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="http: requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16", help="http: comma-separated client concurrencies")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per measurement (the median is kept)")
    parser.add_argument("--output", default="", help="also write the results as JSON to this file")
    return parser.parse_args()


def _machine() -> str:
    """bench_common.machine() with whether the CPU has AVX-512 (the avx512f flag)."""
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        avx512 = False
    return f"{bench_common.machine()}, {'AVX-512' if avx512 else 'no AVX-512'}"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median_seconds(call: Callable[[], object], iters: int) -> float:
    """Median wall seconds of `iters` calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _random_export(directory: str) -> str:
    """Saves a random-init captioner of the Shapes World preset's sizes with the Shapes World tokenizer."""
    from flax import nnx

    from vlm_jax.data import shapes_world
    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.mllm.embedded import save_captioner
    from vlm_jax.models.captioner import Captioner, CaptionerConfig
    from vlm_jax.models.clip import VisionConfig

    tokenizer = Tokenizer.from_dir(shapes_world.save_tokenizer(os.path.join(directory, "tokenizer")))
    config = CaptionerConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=3, heads=4, mlp_dim=256),
        vocab_size=tokenizer.vocab_size, context_length=160, width=128, depth=2, heads=4, mlp_dim=512,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    export = os.path.join(directory, "export")
    save_captioner(Captioner(config, rngs=nnx.Rngs(0)), export, tokenizer, PreprocessSpec.clip(64))
    return export


def _http_rate(mllm, images, requests: int, concurrency: int, max_tokens: int, batch: int) -> dict[str, float]:
    """requests/s of OpenAIClient.generate against make_server(mllm) on loopback; the batches the server ran."""
    from vlm_jax.mllm.config import mllm_config, parse_mllm
    from vlm_jax.mllm.http import OpenAIClient
    from vlm_jax.mllm.serve import make_server

    server = make_server(mllm, max_batch=batch)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        client = OpenAIClient(parse_mllm(mllm_config(
            backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", image_format="png",
            max_side=max(images[0].shape[:2]), concurrency=concurrency, max_retries=0, timeout_s=600.0)))
        client.generate(images[:concurrency], [PROMPT] * concurrency, max_tokens)  # warm-up
        server.batcher.batch_sizes.clear()
        start = time.perf_counter()
        texts = client.generate(images[:requests], [PROMPT] * requests, max_tokens)
        seconds = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    failed = sum(count for name, count in client.counts.items() if name.startswith("failed/"))
    if failed or len(texts) != requests:
        raise RuntimeError(f"{failed} of {requests} requests failed: {client.counts}")
    sizes = server.batcher.batch_sizes
    return {"requests_per_s": requests / seconds, "seconds": seconds, "backend_calls": len(sizes),
            "mean_batch": statistics.mean(sizes)}


def main() -> None:
    args = _parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    from vlm_jax.data import shapes_world
    from vlm_jax.mllm.embedded import EmbeddedMLLM

    print(f"machine: {_machine()}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), load average at start: {_load()}")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or _random_export(scratch)
        greedy = EmbeddedMLLM.load(model_dir, batch_size=args.batch)
        beam = EmbeddedMLLM.load(model_dir, batch_size=args.batch, beam_size=args.beam)
    config = greedy.config
    size = config.vision.image_size
    print(f"model: {args.model_dir or 'random init, Shapes World sizes'}; image {size} px / patch "
          f"{config.vision.patch_size}, vision width {config.vision.width} depth {config.vision.depth}; decoder "
          f"width {config.width} depth {config.depth}, context {config.context_length}, vocab {config.vocab_size}")

    rng = np.random.default_rng(0)
    count = max(args.score_images, args.batch, args.requests)
    images = list(rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8))
    names = list(shapes_world.class_names())
    candidates = [[names[int(i)] for i in rng.choice(len(names), 5, replace=False)] for _ in range(args.score_images)]
    lengths = [len(greedy.coder.encode(name)) for row in candidates for name in row]
    rows = []

    seconds = _median_seconds(lambda: greedy.score(images[: args.score_images], [PROMPT] * args.score_images,
                                                    candidates), args.iters)
    total = args.score_images * 5
    rows.append({"name": "score", "detail": f"{args.score_images} images x 5 candidates "
                 f"({statistics.mean(lengths):.1f} tokens each)", "seconds": seconds, "rate": total / seconds,
                 "unit": "candidates/s"})

    prompts = [PROMPT] * args.batch
    for label, mllm in (("greedy", greedy), (f"beam {args.beam}", beam)):
        seconds = _median_seconds(lambda: mllm.generate(images[: args.batch], prompts, args.max_tokens), args.iters)
        rows.append({"name": f"generate {label}", "detail": f"batch {args.batch}, max_tokens {args.max_tokens}",
                     "seconds": seconds, "rate": args.batch * args.max_tokens / seconds, "unit": "tokens/s"})

    for concurrency in (int(value) for value in args.concurrency.split(",")):
        result = _http_rate(greedy, images, args.requests, concurrency, args.http_max_tokens, args.batch)
        rows.append({"name": f"http concurrency {concurrency}",
                     "detail": f"{args.requests} requests, max_tokens {args.http_max_tokens}, png; "
                               f"{result['backend_calls']} backend calls of {result['mean_batch']:.1f} on average",
                     "seconds": result["seconds"], "rate": result["requests_per_s"], "unit": "requests/s"})

    print(f"\n{'measurement':<22} {'rate':>10}  {'unit':<13} {'seconds':>8}  detail")
    for row in rows:
        print(f"{row['name']:<22} {row['rate']:>10.1f}  {row['unit']:<13} {row['seconds']:>8.3f}  {row['detail']}")
    print(f"load average at end: {_load()}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": _machine(), "jax": jax.__version__, "model_dir": args.model_dir,
                       "model": config.to_dict(), "load_average_end": os.getloadavg(), "rows": rows}, f, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
