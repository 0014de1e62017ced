"""Recaption pipeline throughput on this machine: the embedded captioner in-process and over HTTP.

The model is a captioner export (`--model_dir`) or, without one, a random-init captioner of the Shapes World
preset's sizes, built as benchmarks/mllm_throughput.py builds it (64 px images, 8 px patches; vision width 128,
depth 3; decoder width 128, depth 2; context 160; the Shapes World tokenizer). The corpus is an ArrayRecord file
of `--items` Shapes World-like 64 px PNG images (one or two patterned shapes of the Shapes World palette on a
noisy background) with an alt-text each, written once; every measurement reads the same records.

Each row is one full `vlm_jax.mllm.recaption.recaption` run into a fresh output directory (reading, decoding,
the prefetch thread, generation, filters, shard writes), mode `--mode` ("ungrounded": the Shapes World
captioner's prompt "Describe the image."), greedy, `--max_tokens` (a dense caption's length), recaption
batch `--batch`; the rate is the pipeline's own items/s (its timed loop, after one untimed warm-up call with
the same shapes, so compilation is excluded). Rows:
  embedded        `EmbeddedMLLM` in-process, backend batch `--batch` (one jitted call per recaption batch).
  http c=N        `OpenAIClient` (png, `mllm.concurrency` N) against `vlm_jax.mllm.serve.make_server` on loopback
                  over an `EmbeddedMLLM` whose batch size, and the server's `max_batch`, is min(N, `--batch`): the
                  server gathers up to that many concurrent requests into one call, and the embedded backend pads
                  every call to its batch size, so a larger one would compute padding rows at low concurrency.
                  The server waits at most `--server_wait_ms` for more requests to join a call; the table reports
                  the calls it made and their mean size.

  python benchmarks/recaption_throughput.py                  # --items 256, concurrency 1,8,32
  python benchmarks/recaption_throughput.py --quick          # a check that it runs: 32 items, 16 tokens
  python benchmarks/recaption_throughput.py --output /tmp/recaption_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="", help="a captioner export; '': a random Shapes World-sized one")
    parser.add_argument("--items", type=int, default=256, help="records recaptioned per measurement")
    parser.add_argument("--batch", type=int, default=64, help="recaption.batch_size, and the embedded batch size")
    parser.add_argument("--max_tokens", type=int, default=48, help="tokens per recaption (a dense caption)")
    parser.add_argument("--mode", default="ungrounded", choices=("ungrounded", "grounded"))
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated HTTP client concurrencies")
    parser.add_argument("--server_wait_ms", type=float, default=5.0,
                        help="the server's max_wait_s (ms) for more requests to join a call (its default: 5)")
    parser.add_argument("--quick", action="store_true", help="small counts: 32 items, max_tokens 16")
    parser.add_argument("--output", default="", help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.quick:
        args.items, args.max_tokens = min(args.items, 32), min(args.max_tokens, 16)
    return args


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _corpus(directory: str, count: int, size: int) -> dict[str, str]:
    """`count` Shapes World-like PNG records with alt-texts in one ArrayRecord file; its data section."""
    import numpy as np

    from vlm_jax.data import corpora
    from vlm_jax.data.shapes_world import render

    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        pixels = rng.normal(128, 12, (size, size, 3))
        words = []
        for _ in range(int(rng.integers(1, 3))):
            shape, colour = rng.choice(render.SHAPES), rng.choice(list(render.COLOUR_RGB))
            pattern = rng.choice(render.PATTERNS)
            side = int(rng.integers(size // 4, size // 2))
            top, left = (int(v) for v in rng.integers(0, size - side, 2))
            mask = render.shape_mask(shape, side, side)
            shade = render.pattern_mask(pattern, side, side, render.pattern_period(size))
            colours = np.where(shade[..., None], render.second_shade(colour), np.asarray(render.COLOUR_RGB[colour]))
            region = pixels[top:top + side, left:left + side]
            region[mask] = colours[mask]
            words.append(f"{pattern} {colour} {shape}")
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        records.append({"id": f"sw-{index:06d}", "image": render.encode_png(image), "caption": " and ".join(words)})

    class Records:
        def __len__(self):
            return len(records)

        def __getitem__(self, index):
            return records[index]

    corpora.convert_to_array_record(Records(), directory, name="corpus")
    return {"source": "array_record", "paths": os.path.join(directory, "corpus-*.array_record")}


def _section(data, args):
    from vlm_jax.mllm.recaption import SHAPES_WORLD_PROMPT, recaption_config

    config = recaption_config()
    config.data.update(data or {"source": "array_record"})
    config.update(mode=args.mode, max_tokens=args.max_tokens, batch_size=args.batch,
                  shard_size=max(args.items, 1), progress=False)
    config.prompts.ungrounded = SHAPES_WORLD_PROMPT
    config.prompts.grounded = "Describe the image.[ Its alt-text is: {alt_text}.]"
    return config


def _warm_up(mllm, images, args, size: int) -> None:
    """One untimed call with the shapes the run will use (compiles the embedded backend's programs)."""
    from vlm_jax.mllm.recaption import render_prompt

    template = _section({}, args).prompts[args.mode]
    prompts = [render_prompt(template, "striped red star", "")] * size
    mllm.generate(images[:size], prompts, args.max_tokens)


def _recaption(data, args, mllm, directory: str) -> dict:
    """One full pipeline run into `directory`; its summary (with wall_s)."""
    from vlm_jax.mllm.recaption import recaption

    started = time.perf_counter()
    summary = recaption(_section(data, args), mllm, directory)
    summary["wall_s"] = time.perf_counter() - started
    if summary["failed"] or summary["written"] != args.items:
        raise RuntimeError(f"the run did not recaption every item: {summary}")
    return summary


def main() -> None:
    args = _parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    from mllm_throughput import _machine, _random_export  # the same machine line and model

    from vlm_jax.mllm.config import mllm_config, parse_mllm
    from vlm_jax.mllm.embedded import EmbeddedMLLM
    from vlm_jax.mllm.http import OpenAIClient
    from vlm_jax.mllm.serve import make_server

    print(f"machine: {_machine()}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), load average at start: {_load()}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or _random_export(os.path.join(scratch, "model"))
        embedded = EmbeddedMLLM.load(model_dir, batch_size=args.batch)
        config = embedded.config
        size = config.vision.image_size
        print(f"model: {args.model_dir or 'random init, Shapes World sizes'}; image {size} px / patch "
              f"{config.vision.patch_size}, vision width {config.vision.width} depth {config.vision.depth}; "
              f"decoder width {config.width} depth {config.depth}, context {config.context_length}")
        data = _corpus(os.path.join(scratch, "corpus"), args.items, size)
        warm = list(np.random.default_rng(1).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8))

        _warm_up(embedded, warm, args, args.batch)
        summary = _recaption(data, args, embedded, os.path.join(scratch, "embedded"))
        rows.append({"name": "embedded in-process", "backend_batch": args.batch, "concurrency": "-",
                     "items_per_s": summary["items_per_s"], "seconds": summary["seconds"],
                     "kept": summary["kept"], "backend_calls": -(-args.items // args.batch)})

        for concurrency in (int(value) for value in args.concurrency.split(",")):
            server_batch = min(concurrency, args.batch)
            backend = EmbeddedMLLM.load(model_dir, batch_size=server_batch)
            server = make_server(backend, max_batch=server_batch, max_wait_s=args.server_wait_ms / 1000)
            threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
            try:
                client = OpenAIClient(parse_mllm(mllm_config(
                    backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                    image_format="png", max_side=size, concurrency=concurrency, max_retries=0, timeout_s=600.0)))
                _warm_up(client, warm, args, concurrency)
                server.batcher.batch_sizes.clear()
                summary = _recaption(data, args, client, os.path.join(scratch, f"http_{concurrency}"))
            finally:
                server.shutdown()
                server.server_close()
            sizes = server.batcher.batch_sizes
            rows.append({"name": f"http c={concurrency}", "backend_batch": server_batch, "concurrency": concurrency,
                         "items_per_s": summary["items_per_s"], "seconds": summary["seconds"],
                         "kept": summary["kept"], "backend_calls": len(sizes),
                         "mean_call": sum(sizes) / len(sizes) if sizes else 0.0})

    print(f"\n{args.items} items, mode {args.mode}, max_tokens {args.max_tokens}, recaption batch {args.batch}, "
          f"greedy, server wait {args.server_wait_ms:g} ms; kept = passed the default quality filters (a random-init "
          "model writes gibberish)\n")
    print("| run | server/backend batch | concurrency | items/s | seconds | backend calls (mean size) | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        calls = f"{row['backend_calls']}" + (f" ({row['mean_call']:.1f})" if "mean_call" in row else "")
        print(f"| {row['name']} | {row['backend_batch']} | {row['concurrency']} | {row['items_per_s']:.2f} | "
              f"{row['seconds']:.2f} | {calls} | {row['kept']} |")
    print(f"\nload average at end: {_load()}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": _machine(), "jax": jax.__version__, "model_dir": args.model_dir,
                       "model": config.to_dict(), "items": args.items, "max_tokens": args.max_tokens,
                       "mode": args.mode, "batch": args.batch, "server_wait_ms": args.server_wait_ms,
                       "load_average_end": os.getloadavg(), "rows": rows},
                      f, indent=2, default=str)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
