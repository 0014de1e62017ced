"""One accelerator check, one JSON: train-step MFU, encode throughput against PyTorch, exact memory search.

Run through benchmarks/gpu_check.sh, which first makes sure JAX has a GPU backend. Three parts:

1. Train step (ViT-B/16, bfloat16 compute, float32 master weights and moments, batch 256), without and
   with remat (`model.remat`): the trainer's step (`trainer.build_training` on `ClipMethod`), compiled,
   warmed up, then `--steps` steps dispatched back to back. Achieved FLOP/s is XLA's count of the
   compiled step (`cost_analysis()["flops"]`, remat's recomputation included; counted on the unrolled
   step, since the analysis counts a scanned loop's body once) over the step time;
   `xla_flops_utilization` divides it by the device's peak, `mfu` divides the analytic 3x forward count
   (benchmarks/flops.py, no recomputation) by the same time and peak.
2. Encode throughput (ViT-B/16, batch 256, bfloat16): our jitted `encode_image` / `encode_text` against
   transformers' CLIPModel in bfloat16 on the same device, eager and under `torch.compile`, timed
   alternately (encode_throughput.py's `_interleaved`), from one randomly initialized HF directory.
3. Exact search: top-10 of `vlm_jax.memory.device.top_k` over 10M x 512 unit bfloat16 rows made on the
   device, in batches of `--search_batch` queries; q/s over `--search_batches` batches after a warm-up
   one, whose queries are table rows (each must find itself first).

Peak bfloat16 dense FLOP/s comes from `PEAK_TFLOPS` by device kind (`--peak_tflops` overrides; unknown
kinds get no MFU). --dry runs every part at tiny shapes on the CPU in seconds (torch.compile only with
--torch_compile on: inductor's C++ build takes minutes there).

  benchmarks/gpu_check.sh --out /tmp/gpu_check.json
  benchmarks/gpu_check.sh --dry --out /tmp/gpu_check_dry.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import statistics
import tempfile
import time

import bench_common
import encode_throughput
import flops
import train_step

# Dense bfloat16 tensor-core peak per device, TFLOP/s, by a substring of jax's device_kind (first match).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
)
FULL = dict(model="vit_b16", train_batch=256, steps=10, warmup=2, encode_batch=256, encode_iters=10,
            memory_rows=10_000_000, memory_dim=512, search_batch=512, search_batches=8)
DRY = dict(model="tiny", train_batch=8, steps=2, warmup=1, encode_batch=8, encode_iters=2,
           memory_rows=10_000, memory_dim=512, search_batch=32, search_batches=2)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak; 0: from PEAK_TFLOPS")
    parser.add_argument("--torch_compile", choices=("auto", "on", "off"), default="auto",
                        help="auto: on for accelerator runs, off for --dry")
    for name, value in FULL.items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value} (--dry: {DRY[name]})")
    args = parser.parse_args()
    for name, value in (DRY if args.dry else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def peak_tflops(device_kind: str, override: float) -> float | None:
    """The device's dense bfloat16 peak in TFLOP/s: `override` if set, else PEAK_TFLOPS's first match."""
    if override:
        return override
    return next((peak for name, peak in PEAK_TFLOPS if name in device_kind), None)


def train_step_utilization(model_name: str, batch: int, *, remat: bool, steps: int, warmup: int,
                           peak: float | None) -> dict:
    """Step time of the trainer's bfloat16 step and its FLOP/s: XLA's compiled count and the analytic one."""
    import jax

    from vlm_jax.train import sharding

    model_config = flops.model_for(model_name, dtype="bfloat16", remat=remat).replace(scan_layers=True)  # as trained
    ours = train_step.build_trainer_step(*flops.clip_setup(model_config, batch))
    training = ours.training
    inputs = sharding.shard_batch(train_step.make_batch(ours.model_config, batch), training.mesh, training.batch_axes)
    start = time.perf_counter()
    compiled = training.train_step.lower(training.state, training.frozen, inputs, training.constants).compile()
    compile_s = time.perf_counter() - start
    state = training.state

    def run(count: int):
        nonlocal state
        for _ in range(count):  # dispatched back to back, as the trainer does, and waited for once
            state, metrics = compiled(state, training.frozen, inputs, training.constants)
        return jax.block_until_ready(metrics)

    run(warmup)
    start = time.perf_counter()
    metrics = run(steps)
    step_s = (time.perf_counter() - start) / steps
    xla_flops = flops.step_flops(ours.model_config, batch)  # the scanned step's own count has one block per loop
    model_flops = batch * flops.train_flops_per_pair(ours.model_config, batch)
    row = dict(model=model_name, remat=remat, batch=batch, steps=steps, step_s=step_s, samples_per_s=batch / step_s,
               compile_s=compile_s, loss=float(metrics["loss"]), xla_flops_per_step=xla_flops,
               model_flops_per_step=model_flops, xla_tflops_per_s=xla_flops / step_s / 1e12,
               model_tflops_per_s=model_flops / step_s / 1e12, peak_tflops=peak)
    row["xla_flops_utilization"] = row["xla_tflops_per_s"] / peak if peak else None
    row["mfu"] = row["model_tflops_per_s"] / peak if peak else None
    return row


def _torch_references(model, torch, compile_too: bool) -> dict:
    """{implementation: {task: fn(**inputs) -> features}}: eager, and compiled when asked."""
    eager = {"image": model.get_image_features, "text": model.get_text_features}
    references = {"torch_bf16": eager}
    if compile_too:
        references["torch_compile"] = {task: torch.compile(fn) for task, fn in eager.items()}
    return references


def encode_rows(model_name: str, batch: int, iters: int, *, compile_too: bool) -> list[dict]:
    """Images/s and texts/s of our bfloat16 encoders and transformers' (eager, compiled) on one device."""
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from vlm_jax import models
    from vlm_jax.weights import load_model, save_pretrained

    config = flops.model_for(model_name, dtype="float32", remat=False).replace(scan_layers=True)  # as loaded
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(models.CLIP(config, rngs=nnx.Rngs(0)), directory)
        ours = load_model(directory, dtype="bfloat16")
        reference = transformers.CLIPModel.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    graphdef, state = nnx.split(ours)
    encoders = {"image": jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x)),
                "text": jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))}
    rng = np.random.default_rng(0)
    size, text = config.vision.image_size, config.text
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, text.vocab_size - 1, size=(batch, text.context_length)).astype(np.int32)
    ids[:, -1] = text.eos_token_id
    ours_inputs = {"image": jax.device_put(pixels), "text": jax.device_put(ids)}
    torch_inputs = {"image": {"pixel_values": torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device, torch.bfloat16)},
                    "text": {"input_ids": torch.from_numpy(ids.astype(np.int64)).to(device)}}

    def run_reference(fn, task):
        with torch.inference_mode():
            features = fn(**torch_inputs[task]).pooler_output
        if device == "cuda":
            torch.cuda.synchronize()
        return features

    rows = []
    for implementation, functions in _torch_references(reference, torch, compile_too).items():
        for task, encode in encoders.items():
            ours_fn = functools.partial(lambda f, x: f(state, x).block_until_ready(), encode, ours_inputs[task])
            reference_fn = functools.partial(run_reference, functions[task], task)
            start = time.perf_counter()
            diff = float(np.abs(np.asarray(ours_fn(), np.float32) - reference_fn().float().cpu().numpy()).max())
            first_call_s = time.perf_counter() - start
            ours_times, reference_times = encode_throughput._interleaved(ours_fn, reference_fn, iters)
            rows.append(dict(model=model_name, task=task, reference=implementation, batch=batch, iters=iters,
                             ours_per_s=batch / statistics.median(ours_times),
                             reference_per_s=batch / statistics.median(reference_times),
                             max_abs_diff=diff, first_calls_s=first_call_s, device=device))
            rows[-1]["ratio"] = rows[-1]["ours_per_s"] / rows[-1]["reference_per_s"]
    return rows


def exact_search(num_rows: int, dim: int, query_batch: int, batches: int, k: int = 10) -> dict:
    """Queries/s of exact top-k over num_rows x dim unit bfloat16 rows generated on the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vlm_jax.memory import device as memory_device

    @jax.jit
    def unit_rows(key):
        rows = jax.random.normal(key, (num_rows, dim), jnp.bfloat16)
        return (rows * jax.lax.rsqrt(jnp.sum(jnp.square(rows.astype(jnp.float32)), -1, keepdims=True))).astype(
            jnp.bfloat16)

    table = jax.block_until_ready(unit_rows(jax.random.key(0)))
    search = jax.jit(functools.partial(memory_device.top_k, k=k, num_rows=num_rows))
    start = time.perf_counter()
    _, found = search(table[:query_batch].astype(jnp.float32), table)  # rows as queries: each is its own best
    self_match = float(np.mean(np.asarray(found[:, 0]) == np.arange(query_batch)))
    first_call_s = time.perf_counter() - start
    queries = jax.random.normal(jax.random.key(1), (batches, query_batch, dim), jnp.float32)
    jax.block_until_ready(queries)
    start = time.perf_counter()
    results = [search(queries[i], table) for i in range(batches)]  # dispatched back to back
    jax.block_until_ready(results)
    seconds = time.perf_counter() - start
    return dict(rows=num_rows, dim=dim, dtype="bfloat16", k=k, query_batch=query_batch, batches=batches,
                queries_per_s=batches * query_batch / seconds, batch_ms=seconds / batches * 1e3,
                self_match_rate=self_match, first_call_s=first_call_s,
                table_gb=num_rows * dim * 2 / 1e9)


def main() -> None:
    args = _parse_args()
    if args.dry:
        # A dry run checks that every part runs, not how fast: no LLVM optimization halves compile time.
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    import jax

    started = time.perf_counter()
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.peak_tflops)
    compile_too = {"on": True, "off": False, "auto": not args.dry}[args.torch_compile]
    report = dict(machine=bench_common.machine(), device=f"{jax.device_count()} x {device.device_kind}",
                  platform=device.platform, jax=jax.__version__, dry=args.dry, peak_tflops=peak,
                  settings={name: getattr(args, name) for name in FULL})
    print(f"{report['device']} ({device.platform}), jax {jax.__version__}, peak {peak} TFLOP/s", flush=True)
    report["train_step"] = [
        train_step_utilization(args.model, args.train_batch, remat=remat, steps=args.steps, warmup=args.warmup,
                               peak=peak)
        for remat in (False, True)]
    for row in report["train_step"]:
        print(f"train step remat={row['remat']}: {row['step_s'] * 1e3:.1f} ms, {row['xla_tflops_per_s']:.1f} "
              f"XLA TFLOP/s, MFU {row['mfu']}", flush=True)
    try:
        import torch

        report["torch"] = torch.__version__
        if compile_too and not hasattr(torch, "compile"):
            compile_too, report["torch_compile_skipped"] = False, f"torch {torch.__version__} has no torch.compile"
        report["encode"] = encode_rows(args.model, args.encode_batch, args.encode_iters, compile_too=compile_too)
    except ImportError as error:
        report["torch"], report["encode"] = None, []
        report["encode_skipped"] = f"PyTorch or transformers is not installed ({error}); install the test extra"
    if not compile_too:
        report.setdefault("torch_compile_skipped",
                          f"--torch_compile {args.torch_compile}{' with --dry' if args.dry else ''}")
    for row in report["encode"]:
        print(f"encode {row['task']} vs {row['reference']}: ours {row['ours_per_s']:.1f}/s, reference "
              f"{row['reference_per_s']:.1f}/s, ratio {row['ratio']:.2f}x", flush=True)
    report["memory_search"] = exact_search(args.memory_rows, args.memory_dim, args.search_batch, args.search_batches)
    print(f"exact search {args.memory_rows} x {args.memory_dim}: {report['memory_search']['queries_per_s']:.0f} q/s",
          flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    bad = [key for key, value in _numbers(report) if not math.isfinite(value)]
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    if bad:
        raise SystemExit(f"non-finite results at {bad}; see {args.out}")


def _numbers(tree, path: str = ""):
    """(path, value) of every float in a nested dict/list."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{index}]")
    elif isinstance(tree, float):
        yield path, tree


if __name__ == "__main__":
    main()
