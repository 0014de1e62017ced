"""Where the time goes: a per-op profile of our jitted CLIP and of transformers' PyTorch CLIPModel.

Two tasks, the ones encode_throughput.py and train_step.py time:
  text        the text tower forward (`encode_text`, batch x 77 tokens), no grad;
  train_step  the trainer's whole step (both towers, InfoNCE, backward, clip, AdamW) against
              CLIPModel(return_loss=True) + clip_grad_norm_ + torch.optim.AdamW (train_step.py's).

Ours is traced with `jax.profiler` (XLA's CPU runtime records one event per executed thunk: a fused
kernel, a dot, a copy); each thunk is put in a category by what its HLO computes (read from the
compiled module), and a category's time is the wall time during which at least one of its thunks
ran (intervals merged across threads). PyTorch is traced with `torch.profiler` and each aten op's
self time goes to the same categories. Both sides run the same weights and batch in one process.

  python benchmarks/profile_towers.py --task text --shape vit_b32 --batch 32 --iters 5
  python benchmarks/profile_towers.py --task train_step --shape vit_b32 --batch 32 --iters 2
  python benchmarks/profile_towers.py --task text --xla_flags=--xla_cpu_experimental_ynn_fusion_type=

Prints per category ms per call on each side, the matmul share, the matmul rate (the analytic
FLOPs of flops.py / train_step.py, matmuls and attention, over the matmul time), the top ops of
each side, and writes it all with --json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time

import bench_common
import flops

CATEGORIES = ("matmul", "attention", "reduction", "copy/transpose", "elementwise", "optimizer", "other")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("text", "train_step"), default="text")
    parser.add_argument("--shape", default="vit_b32", help="vit_b32 or vit_b16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="profiled calls per side (after a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
    parser.add_argument("--top", type=int, default=8, help="ops listed per side")
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# Ours: thunk events of a jax.profiler trace, categorized by the compiled HLO
# --------------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_MOVES = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate", "pad", "parameter",
          "tuple", "get-tuple-element", "constant", "dynamic-slice", "dynamic-update-slice", "iota", "gather",
          "scatter", "reverse"}


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """{instruction name: category} for every instruction of a compiled HLO module: a fusion takes
    the category of the heaviest op it calls (dot/convolution > reduce > elementwise > data movement)."""
    bodies: dict[str, list[str]] = {}
    current = None
    calls: dict[str, list[str]] = {}
    opcodes: dict[str, str] = {}
    owner: dict[str, str] = {}
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header[1]
            bodies[current] = []
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, opcode = match[1], match[2]
            bodies[current].append(opcode)
            opcodes[name] = opcode
            owner[name] = current
            calls[name] = _CALLS.findall(line)

    def ops_of(computation: str, seen: set) -> set:
        if computation in seen or computation not in bodies:
            return set()
        seen.add(computation)
        found = set(bodies[computation])
        for name, callees in calls.items():
            if owner.get(name) == computation:
                for callee in callees:
                    found |= ops_of(callee, seen)
        return found

    categories = {}
    for name, opcode in opcodes.items():
        ops = {opcode}
        for callee in calls[name]:
            ops |= ops_of(callee, set())
        if ops & {"dot", "convolution"} or name.startswith(("ynn_", "xnn_", "onednn")):
            categories[name] = "matmul"
        elif ops & {"reduce", "reduce-window", "sort", "reduce-precision"}:
            categories[name] = "reduction"
        elif ops - _MOVES - {"fusion", "call", "custom-call"}:
            categories[name] = "elementwise"
        elif ops & _MOVES:
            categories[name] = "copy/transpose"
        else:
            categories[name] = "other"
    return categories


def _merged_ms(intervals: list[tuple[int, int]]) -> float:
    """Wall milliseconds covered by the union of [start, end) nanosecond intervals."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def trace_ours(fn, hlo_text: str, iters: int, trace_dir: str) -> dict:
    """Calls fn() `iters` times under jax.profiler; per category wall ms per call, and the top thunks."""
    import jax
    from jax.profiler import ProfileData

    categories = hlo_categories(hlo_text)
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    wall_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    intervals = collections.defaultdict(list)
    by_op = collections.Counter()
    unknown = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = event.name.removeprefix("end: ")
                base = name.split(":")[0]
                if name.startswith("ThunkExecutor::Execute"):
                    intervals["executor"].append((int(event.start_ns), int(event.start_ns + event.duration_ns)))
                    continue
                if base not in categories:
                    if not base.startswith(("Threadpool", "ThunkExecutor", "PjRt", "Execute", "Common")):
                        unknown[base] += event.duration_ns
                    continue
                span = (int(event.start_ns), int(event.start_ns + event.duration_ns))
                intervals[categories[base]].append(span)
                intervals["all"].append(span)
                by_op[base] += event.duration_ns
    per_call = {category: _merged_ms(spans) / iters for category, spans in intervals.items()}
    return dict(wall_ms=1000 * wall_s / iters, busy_ms=per_call.pop("all", 0.0),
                executor_ms=per_call.pop("executor", 0.0),
                categories={c: per_call.get(c, 0.0) for c in CATEGORIES},
                top=[(name, categories[name], ns / 1e6 / iters) for name, ns in by_op.most_common()],
                unattributed_ms=sum(unknown.values()) / 1e6 / iters)


# --------------------------------------------------------------------------------------------------
# PyTorch: aten self times of a torch.profiler trace
# --------------------------------------------------------------------------------------------------

_TORCH_MATMUL = {"addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "conv2d", "convolution", "_convolution",
                 "mkldnn_convolution", "convolution_backward", "dot", "_mkldnn_linear"}
_TORCH_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")
_TORCH_REDUCTION = ("layer_norm", "sum", "mean", "max", "amax", "logsumexp", "argmax", "norm", "nll_loss",
                    "cross_entropy", "var", "std")
_TORCH_MOVES = {"copy_", "clone", "contiguous", "permute", "transpose", "t", "cat", "embedding", "view", "reshape",
                "expand", "select", "slice", "to", "_to_copy", "empty", "empty_like", "empty_strided", "zero_",
                "zeros", "zeros_like", "fill_", "stack", "gather", "as_strided", "unsqueeze", "squeeze", "flatten",
                "split", "unbind", "narrow", "detach", "alias", "_unsafe_view", "new_empty", "new_zeros",
                "_reshape_alias", "arange", "full", "ones", "ones_like", "resize_", "set_", "item",
                "_local_scalar_dense", "lift_fresh"}


def torch_category(name: str) -> str:
    """An aten op's category (a non-aten event, such as an autograd node or the optimizer's
    record_function, is "optimizer" when it names one, else "other")."""
    if not name.startswith("aten::"):
        return "optimizer" if "optimizer" in name.lower() or "adam" in name.lower() else "other"
    op = name.removeprefix("aten::")
    if op in _TORCH_MATMUL:
        return "matmul"
    if any(key in op for key in _TORCH_ATTENTION):
        return "attention"
    if op.startswith("_foreach") or op in {"lerp_", "addcdiv_", "addcmul_", "_fused_adamw_"}:
        return "optimizer"
    if any(key in op for key in _TORCH_REDUCTION):
        return "reduction"
    if op in _TORCH_MOVES or op.startswith(("index", "scatter", "embedding")):
        return "copy/transpose"
    return "elementwise"


def trace_torch(fn, iters: int) -> dict:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        wall_s = time.perf_counter() - start
    per_category = collections.Counter()
    by_op = []
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1000 / iters
        if self_ms <= 0:
            continue
        category = torch_category(event.key)
        per_category[category] += self_ms
        by_op.append((event.key, category, self_ms))
    by_op.sort(key=lambda row: -row[2])
    return dict(wall_ms=1000 * wall_s / iters, busy_ms=sum(per_category.values()),
                categories={c: per_category.get(c, 0.0) for c in CATEGORIES}, top=by_op)


# --------------------------------------------------------------------------------------------------
# The two tasks
# --------------------------------------------------------------------------------------------------


def text_task(args, directory: str):
    """(ours fn, its compiled HLO text, its FLOPs, PyTorch fn, untimed check) for the text tower."""
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from vlm_jax import models
    from vlm_jax.weights import load_model, save_pretrained

    config = getattr(models, args.shape)()
    save_pretrained(models.CLIP(config, rngs=nnx.Rngs(0)), directory)
    ours = load_model(directory)
    reference = transformers.CLIPModel.from_pretrained(directory).eval()
    graphdef, state = nnx.split(ours)
    encode_text = jax.jit(lambda state, ids: nnx.merge(graphdef, state).encode_text(ids))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.text.vocab_size - 1, size=(args.batch, config.text.context_length))
    ids[:, -1] = config.text.eos_token_id
    ids_jax, ids_torch = jax.device_put(ids.astype(np.int32)), torch.from_numpy(ids.astype(np.int64))
    compiled = encode_text.lower(state, ids_jax).compile()

    def ours_fn():
        return compiled(state, ids_jax).block_until_ready()

    def reference_fn():
        with torch.inference_mode():
            return reference.get_text_features(input_ids=ids_torch).pooler_output

    diff = float(np.abs(np.asarray(ours_fn()) - reference_fn().numpy()).max())
    counts = flops.forward_flops(config, args.batch)
    text_flops = args.batch * (counts["text_blocks"] + counts["text_attention"] + counts["text_projection"])
    return ours_fn, compiled.as_text(), text_flops, reference_fn, f"max |diff| {diff:.1e}"


def train_step_task(args, directory: str):
    """The same for the trainer's step and train_step.py's PyTorch step (first-step losses compared)."""
    import jax
    import numpy as np
    from flax import nnx

    import train_step
    from vlm_jax.train import optim, sharding
    from vlm_jax.weights import save_pretrained

    config, method = train_step.benchmark_setup(args.shape, args.batch, os.path.join(directory, "tokenizer"))
    ours = train_step.build_trainer_step(config, method)
    training = ours.training
    host_batch = train_step.make_batch(ours.model_config, int(config.global_batch_size))
    save_pretrained(nnx.merge(training.graphdef, training.state["params"], training.frozen),
                    os.path.join(directory, "hf"))
    optim_section = optim.optim_config().to_dict() | dict(config.optim)
    schedule = optim.make_schedule(optim_section)
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(2 * args.iters + 4)))
    reference = train_step.TorchStep(os.path.join(directory, "hf"), optim_section, lambda step: lrs[step],
                                     host_batch)
    device_batch = sharding.shard_batch(host_batch, training.mesh, training.batch_axes)
    arguments = (training.state, training.frozen, device_batch, training.constants)
    compiled = training.train_step.lower(*arguments).compile()

    def ours_fn():
        training.state, metrics = training.train_step(training.state, training.frozen, device_batch,
                                                      training.constants)
        return jax.block_until_ready(metrics)

    ours_loss, reference_loss = float(ours_fn()["loss"]), reference()
    step_flops = int(config.global_batch_size) * train_step.model_flops_per_example(ours.model_config, args.batch)
    return (ours_fn, compiled.as_text(), step_flops, reference,
            f"first-step loss ours {ours_loss:.5f}, PyTorch {reference_loss:.5f}")


def _timed(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    args = _parse_args()
    bench_common.append_xla_flags(args.xla_flags)
    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {bench_common.machine()}")
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as directory:
        build = text_task if args.task == "text" else train_step_task
        ours_fn, hlo_text, count, reference_fn, check = build(args, directory)
        print(f"{args.task} {args.shape} batch {args.batch}: {check}; analytic {count / 1e9:.1f} GFLOP per call",
              flush=True)
        ours_fn(), reference_fn()  # warm-up
        # Untimed-by-profiler medians first (profilers add overhead), alternating sides.
        medians = {"ours": [], "reference": []}
        for _ in range(args.iters):
            medians["ours"].append(_timed(ours_fn, 1))
            medians["reference"].append(_timed(reference_fn, 1))
        medians = {side: statistics.median(times) for side, times in medians.items()}
        profiles = {"ours": trace_ours(ours_fn, hlo_text, args.iters, os.path.join(directory, "trace")),
                    "reference": trace_torch(reference_fn, args.iters)}
    load = os.getloadavg()[0]
    print(f"\nms per call (plain median of {args.iters}): ours {medians['ours']:.1f}, PyTorch "
          f"{medians['reference']:.1f}, ratio PyTorch/ours {medians['reference'] / medians['ours']:.2f}x; "
          f"load {load:.2f}")
    print("\n| category | ours ms | ours share | PyTorch ms | PyTorch share |\n|---|---|---|---|---|")
    for category in CATEGORIES:
        cells = []
        for side in ("ours", "reference"):
            value, busy = profiles[side]["categories"][category], profiles[side]["busy_ms"] or 1.0
            cells += [f"{value:.1f}", f"{100 * value / busy:.0f}%"]
        print(f"| {category} | " + " | ".join(cells) + " |")
    for side in ("ours", "reference"):
        profile = profiles[side]
        print(f"| profiled call ({side}) | {profile['wall_ms']:.1f} | busy {profile['busy_ms']:.1f} |"
              + (f" executing {profile['executor_ms']:.1f} | unattributed {profile['unattributed_ms']:.1f} |"
                 if side == "ours" else ""))
    for side, label in (("ours", "ours (XLA thunks)"), ("reference", "PyTorch (aten self time)")):
        matmul_ms = profiles[side]["categories"]["matmul"]
        rate = count / (matmul_ms / 1000) / 1e9 if matmul_ms else float("nan")
        print(f"\n{label}: matmul {matmul_ms:.1f} ms per call, >= {rate:.0f} GFLOP/s of the module's FLOPs; top ops:")
        for name, category, ms in profiles[side]["top"][: args.top]:
            print(f"  {ms:9.2f} ms  {category:15s} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=bench_common.machine(), task=args.task, shape=args.shape, batch=args.batch,
                           iters=args.iters, xla_flags=os.environ.get("XLA_FLAGS", ""), analytic_flops=count,
                           median_ms=medians, load_average=load,
                           profiles={side: {**p, "top": p["top"][:50]} for side, p in profiles.items()}),
                      f, indent=2)


if __name__ == "__main__":
    main()
