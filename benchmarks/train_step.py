"""Train-step throughput: the trainer's jitted CLIP step vs a PyTorch/transformers reference.

One train step = forward of both towers, the symmetric InfoNCE (softmax contrastive) loss, backward,
global-norm clipping and the AdamW update, float32 on CPU. Ours is the step `vlm_jax.train.trainer`
builds (`trainer.build_training` for `ClipMethod`: jitted with the trainer's in/out shardings and the
train state donated, on the mesh and optimizer the experiment config gives). The reference is transformers'
`CLIPModel(return_loss=True)` (its loss is the same symmetric InfoNCE) with `torch.optim.AdamW`,
`clip_grad_norm_` and the same learning rate, betas, eps and decay mask (Linear/Conv weights decay;
embeddings, norms, biases and the logit scale do not), started from the same weights: our random
init is written once with `save_pretrained` and loaded by `CLIPModel.from_pretrained`. Both sides
train on the same fixed batch, so only the step is timed (no input pipeline).

Shapes ("--shapes"): `shapes` is the Shapes World default CLIP config of experiments/clip.py (its
model, optimizer, mesh and global batch); `vit_b32` / `vit_b16` are OpenAI CLIP's shapes with that
config's optimizer. The first step's loss of both sides must agree to 1e-4 (relative); the step
after compilation and `--warmup` more are untimed; then ours and the reference take turns of
`--block` timed steps until each has `--iters`, so load from other processes hits both alike.
Each turn starts with one untimed step, because the first step after ~10 s of other work (or of
sleep) is slow on the 2-core VM this was measured on: ViT-B/32 takes 17.2 s after 12 s idle against
10.1 s back to back, with the same page faults (XLA maps the step's 4.5 GB of temporaries afresh
each call), 67% of that step in the kernel's page clearing (`perf`), as when the host reclaims
memory the guest freed. The side that touches more fresh memory pays more, and a training loop
runs its steps back to back, so steady-state steps are the ones compared.
Reported: samples/s from the median step time, and the ratio ours / reference. On a shared 2-core
CPU one side's ViT-B/32 steps spread over 8.7-13.5 s within a run, so a ratio from the default 4
steps per side varied 0.97-1.24x between idle runs; `--iters 8` gave 1.16x and 1.15x (RESULTS.md).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py --shapes shapes,vit_b32 --iters 5
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py --shapes vit_b32 --iters 8
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py --shapes vit_b32 --breakdown
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/train_step.py --shapes vit_b32 --remat \
      --remat_policy dots_with_no_batch_dims_saveable

--breakdown also times forward only and forward + backward on both sides, so the optimizer update
is the remainder. --mfu instead runs only ours, ViT-B/16 in bfloat16 (float32 master weights and
moments) on the default device, and reports model FLOPs utilization against --peak_tflops (default:
H100 SXM dense bf16, 989 TFLOP/s):

  .venv/bin/python benchmarks/train_step.py --mfu --mfu_batch 256 [--remat] [--peak_tflops 989]

MFU uses the analytic model FLOPs (`model_flops_per_example`: matmuls and attention, 3x the forward
for forward + backward, no rematerialization); XLA's own count of the compiled step
(`cost_analysis()["flops"]`, which includes recomputation under --remat and the optimizer; counted
on the unrolled step, `flops.step_flops`) is printed next to it. On CPU the --mfu path runs (at a small batch) but its MFU is meaningless: the
peak is a GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import tempfile
import time

import bench_common

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_BATCHES = "shapes=128,vit_b32=32,vit_b16=8"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="shapes,vit_b32,vit_b16",
                        help="comma-separated: shapes (experiments/clip.py default), vit_b32, vit_b16")
    parser.add_argument("--batches", default=DEFAULT_BATCHES,
                        help="name=batch per shape; shapes not listed use the experiment's global batch")
    parser.add_argument("--iters", type=int, default=4, help="timed steps per implementation")
    parser.add_argument("--block", type=int, default=2,
                        help="timed steps per turn; each turn of one side starts with one untimed step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--breakdown", action="store_true", help="also time forward and forward + backward")
    parser.add_argument("--mfu", action="store_true", help="ViT-B/16 bf16 MFU of ours only (a GPU run)")
    parser.add_argument("--mfu_batch", type=int, default=0, help="0: 256 on an accelerator, 4 on CPU")
    parser.add_argument("--mfu_steps", type=int, default=10, help="timed steps of the --mfu run")
    parser.add_argument("--remat", action="store_true", help="rematerialize each of our blocks (as cc12m_b16)")
    parser.add_argument("--remat_policy", default="nothing_saveable",
                        help="with --remat: what a block keeps for the backward (CLIPConfig.remat_policy)")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="--mfu: device peak TFLOP/s in the compute dtype (H100 SXM bf16 dense: 989)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


def _load() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PresetVocabulary:
    """The tokenizer fields `ClipMethod.model_config` reads, for presets trained without a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None


def _experiment_config():
    spec = importlib.util.spec_from_file_location("experiments_clip", REPO / "experiments" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("shapes")


def benchmark_setup(shape: str, batch: int | None, tokenizer_dir: str, *, dtype: str = "float32",
                    remat: bool = False, remat_policy: str = "nothing_saveable"):
    """(experiment config, ClipMethod) for one shape; the optimizer and mesh are the Shapes World preset's."""
    from vlm_jax import models
    from vlm_jax.data import shapes_world
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.methods.clip import ClipMethod, model_config_dict

    config = _experiment_config()
    if shape == "shapes":
        shapes_world.save_tokenizer(tokenizer_dir)
        tokenizer = Tokenizer.from_dir(tokenizer_dir, context_length=int(config.model.text.context_length))
    elif shape in ("vit_b32", "vit_b16"):
        model = getattr(models, shape)(dtype=dtype, remat=remat, remat_policy=remat_policy)
        config.model = model_config_dict(model)
        text = model.text
        tokenizer = PresetVocabulary(text.vocab_size, text.eos_token_id, text.pad_token_id, text.bos_token_id)
    else:
        raise ValueError(f"--shapes entry {shape!r} is not one of shapes, vit_b32, vit_b16.")
    if batch:
        config.global_batch_size = batch
    config.model.dtype, config.model.remat, config.model.remat_policy = dtype, remat, remat_policy
    return config, ClipMethod(tokenizer=tokenizer)


def model_flops_per_example(model_config, batch: int) -> float:
    """Training FLOPs per image-text pair: 3x the forward's matmul and attention FLOPs.

    Per transformer layer over T tokens of width W and MLP width M, the forward is
    2 T (4 W^2 + 2 W M) for the projections and MLP plus 4 T^2 W for QK^T and AV (causal text
    attention counted in full, as MFU conventions do); plus the patch embedding, the two
    projections and the [B, B] logits. Norms, activations, softmax and the optimizer are left out.
    """

    def tower(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
        return depth * (2 * tokens * (4 * width**2 + 2 * width * mlp_dim) + 4 * tokens**2 * width)

    vision, text, embed = model_config.vision, model_config.text, model_config.embed_dim
    forward = tower(vision.num_patches + 1, vision.width, vision.depth, vision.mlp_dim)
    forward += 2 * vision.num_patches * vision.patch_size**2 * 3 * vision.width + 2 * vision.width * embed
    forward += tower(text.context_length, text.width, text.depth, text.mlp_dim) + 2 * text.width * embed
    forward += 2 * 2 * batch * embed
    return 3.0 * forward


# --------------------------------------------------------------------------------------------------
# Ours: the trainer's step
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainerStep:
    """The trainer's jitted step (`trainer.build_training`) and what the breakdown needs beside it."""

    training: object  # trainer.Training: mesh, graphdef, state, frozen, constants, train_step, batch_axes
    model_config: object
    loss_fn: object  # (params, batch) -> (loss, metrics), the method's loss on the merged model


def build_trainer_step(config, method) -> TrainerStep:
    """The step exactly as `trainer.train` runs it (no data iterator, checkpoints or evals)."""
    import jax
    from flax import nnx

    from vlm_jax.train import trainer

    training = trainer.build_training(config, method)
    model_config = nnx.merge(training.graphdef, training.state["params"], training.frozen).config

    def loss_fn(params, batch):
        model = nnx.merge(training.graphdef, params, training.frozen)
        return method.loss_fn(model, batch, training.constants, jax.random.key(0))

    return TrainerStep(training, model_config, loss_fn)


def make_batch(model_config, batch: int, seed: int = 0):
    """A fixed batch of normalized-looking pixels float32 [B, S, S, 3] and captions int32 [B, L].

    Each caption is BOS, random tokens, EOS at a random position, then padding, so EOT pooling
    finds the EOS on both sides.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    size, text = model_config.vision.image_size, model_config.text
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    special = {text.eos_token_id, text.pad_token_id, text.bos_token_id}
    ordinary = np.array([i for i in range(min(text.vocab_size, 50_000)) if i not in special])
    ids = ordinary[rng.integers(0, len(ordinary), size=(batch, text.context_length))]
    lengths = rng.integers(3, text.context_length + 1, size=batch)
    for row, length in enumerate(lengths):
        if text.bos_token_id is not None:
            ids[row, 0] = text.bos_token_id
        ids[row, length - 1] = text.eos_token_id
        ids[row, length:] = text.pad_token_id
    return {"image": pixels, "text_ids": ids.astype(np.int32)}


# --------------------------------------------------------------------------------------------------
# Reference: transformers CLIPModel + torch.optim.AdamW
# --------------------------------------------------------------------------------------------------


class TorchStep:
    """The same update in PyTorch: CLIPModel(return_loss=True), clip_grad_norm_, AdamW, our lr schedule."""

    def __init__(self, directory: str, optim_section: dict, schedule, batch: dict):
        import numpy as np
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.CLIPModel.from_pretrained(directory).train()
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                is_kernel = name == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                (decay if is_kernel else no_decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(optim_section["weight_decay"])},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(optim_section["learning_rate"]), betas=(optim_section["b1"], optim_section["b2"]),
            eps=optim_section["eps"])
        self.clip_norm = optim_section["grad_clip_norm"]
        self.schedule = schedule
        self.step_index = 0
        self.pixels = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        self.ids = torch.from_numpy(batch["text_ids"].astype(np.int64))

    def loss(self):
        return self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True).loss

    def forward(self) -> float:
        return self.loss().item()

    def forward_backward(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        return loss.item()

    def __call__(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedule(self.step_index))
        loss = self.forward_backward()
        if self.clip_norm is not None:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_norm))
        self.optimizer.step()
        self.step_index += 1
        return loss


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def _alternate(functions: list, iters: int, block: int) -> list[list[float]]:
    """Seconds per call of each function, `iters` calls each, taken in turns of `block` calls.

    Each turn starts with one untimed call: the first step after the other side's turn is slow on
    a VM whose host reclaims freed memory (see the module docstring).
    """
    times = [[] for _ in functions]
    while len(times[0]) < iters:
        for fn, fn_times in zip(functions, times):
            fn()
            for _ in range(min(block, iters - len(fn_times))):
                start = time.perf_counter()
                fn()
                fn_times.append(time.perf_counter() - start)
    return times


def _calls_per_function(args) -> int:
    """Calls `compare` makes of each step: the first, the warm-up, the timed ones, one per turn."""
    return 1 + args.warmup + args.iters + -(-args.iters // args.block)


def compare(shape: str, batch: int | None, args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from vlm_jax.train import optim, sharding
    from vlm_jax.weights import save_pretrained

    load_before = _load()
    with tempfile.TemporaryDirectory() as directory:
        config, method = benchmark_setup(shape, batch, os.path.join(directory, "tokenizer"), remat=args.remat,
                                         remat_policy=args.remat_policy)
        ours = build_trainer_step(config, method)
        training = ours.training
        batch_size = int(config.global_batch_size)
        host_batch = make_batch(ours.model_config, batch_size)
        save_pretrained(nnx.merge(training.graphdef, training.state["params"], training.frozen),
                        os.path.join(directory, "hf"))
        optim_section = optim.optim_config().to_dict() | dict(config.optim)
        schedule = optim.make_schedule(optim_section)
        lrs = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(_calls_per_function(args))))
        reference = TorchStep(os.path.join(directory, "hf"), optim_section, lambda step: lrs[step], host_batch)
    device_batch = sharding.shard_batch(host_batch, training.mesh, training.batch_axes)

    def ours_step():
        training.state, metrics = training.train_step(training.state, training.frozen, device_batch,
                                                      training.constants)
        return jax.block_until_ready(metrics)

    # The breakdown reads the params of the latest step at call time: the next step donates them.
    forward_fn = jax.jit(ours.loss_fn)
    grad_fn = jax.jit(jax.value_and_grad(ours.loss_fn, has_aux=True))

    def ours_forward():
        return jax.block_until_ready(forward_fn(training.state["params"], device_batch))

    def ours_forward_backward():
        return jax.block_until_ready(grad_fn(training.state["params"], device_batch))

    start = time.perf_counter()
    ours_loss = float(ours_step()["loss"])
    ours_first_s = time.perf_counter() - start
    reference_loss = reference()
    relative = abs(ours_loss - reference_loss) / abs(reference_loss)
    if relative > 1e-4:
        raise RuntimeError(f"{shape}: first-step losses differ: ours {ours_loss:.6f}, reference "
                           f"{reference_loss:.6f} (relative {relative:.1e} > 1e-4); the two steps do not "
                           "train the same model on the same batch.")
    timed = [ours_step, reference]
    if args.breakdown:
        timed += [ours_forward, reference.forward, ours_forward_backward, reference.forward_backward]
        ours_forward()
        ours_forward_backward()
    for _ in range(args.warmup):
        for fn in timed:
            fn()
    # Full steps and their parts share one alternating loop, so a change of load hits every part.
    times = _alternate(timed, args.iters, args.block)
    medians = [statistics.median(t) for t in times]
    row = dict(shape=shape, batch=batch_size, iters=args.iters, block=args.block,
               remat=args.remat and args.remat_policy,
               params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(training.state["params"]))),
               ours_per_s=batch_size / medians[0], reference_per_s=batch_size / medians[1],
               ours_step_s=times[0], reference_step_s=times[1],
               ours_first_step_s=ours_first_s, ours_loss=ours_loss, reference_loss=reference_loss,
               loss_relative_diff=relative)
    row["ratio"] = row["ours_per_s"] / row["reference_per_s"]
    if args.breakdown:
        row["breakdown_s"] = {
            side: {"forward": medians[2 + i], "backward": medians[4 + i] - medians[2 + i],
                   "update": medians[i] - medians[4 + i]}
            for i, side in enumerate(("ours", "reference"))
        }
    row["load_before"], row["load_after"] = load_before, _load()
    remat = f" (remat {args.remat_policy})" if args.remat else ""
    line = (f"{shape}{remat} batch {batch_size}: ours {row['ours_per_s']:.2f} samples/s, PyTorch "
            f"{row['reference_per_s']:.2f} samples/s, ratio {row['ratio']:.2f}x  (first-step loss "
            f"{ours_loss:.5f} vs {reference_loss:.5f}, rel {relative:.1e}; our first step {ours_first_s:.1f}s; "
            f"load {load_before:.1f} -> {row['load_after']:.1f})")
    print(line, flush=True)
    if args.breakdown:
        for side, parts in row["breakdown_s"].items():
            print(f"  {side}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items()), flush=True)
    return row


def _names(shape: str) -> str:
    return {"shapes": "Shapes World default CLIP", "vit_b32": "ViT-B/32", "vit_b16": "ViT-B/16"}.get(shape, shape)


def print_table(rows: list[dict]) -> None:
    print("\n| shape | params | batch | timed steps | ours samples/s | PyTorch samples/s | ours / PyTorch "
          "| first-step loss ours / PyTorch | load avg before -> after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {_names(row['shape'])} | {row['params'] / 1e6:.1f}M | {row['batch']} | {row['iters']} "
              f"| {row['ours_per_s']:.2f} | {row['reference_per_s']:.2f} | {row['ratio']:.2f}x "
              f"| {row['ours_loss']:.5f} / {row['reference_loss']:.5f} "
              f"| {row['load_before']:.1f} -> {row['load_after']:.1f} |")
    if any("breakdown_s" in row for row in rows):
        print("\n| shape | side | forward ms | backward ms | clip + AdamW update ms |")
        print("|---|---|---|---|---|")
        for row in rows:
            for side, parts in row.get("breakdown_s", {}).items():
                name = "ours" if side == "ours" else "PyTorch"
                print(f"| {_names(row['shape'])} | {name} | {parts['forward'] * 1000:.0f} "
                      f"| {parts['backward'] * 1000:.0f} | {parts['update'] * 1000:.0f} |")


def mfu(args) -> dict:
    """ViT-B/16 in bfloat16: step time, samples/s and MFU of the trainer's step on the default device."""
    import jax

    from vlm_jax.train import sharding

    device = jax.devices()[0]
    batch = args.mfu_batch or (4 if device.platform == "cpu" else 256)
    with tempfile.TemporaryDirectory() as directory:
        config, method = benchmark_setup("vit_b16", batch, directory, dtype="bfloat16", remat=args.remat,
                                         remat_policy=args.remat_policy)
    ours = build_trainer_step(config, method)
    training = ours.training
    device_batch = sharding.shard_batch(make_batch(ours.model_config, batch), training.mesh, training.batch_axes)
    start = time.perf_counter()
    compiled = training.train_step.lower(training.state, training.frozen, device_batch, training.constants).compile()
    compile_s = time.perf_counter() - start
    import flops  # noqa: PLC0415 (flops.py imports this module)

    xla_flops = flops.step_flops(ours.model_config, batch)  # the scanned step's own count has one block per loop
    model_flops = batch * model_flops_per_example(ours.model_config, batch)

    state = training.state
    for _ in range(max(1, args.warmup)):
        state, metrics = compiled(state, training.frozen, device_batch, training.constants)
    jax.block_until_ready(metrics)
    load_before = _load()
    # Steps are dispatched back to back, as the trainer does, and waited for once.
    start = time.perf_counter()
    for _ in range(args.mfu_steps):
        state, metrics = compiled(state, training.frozen, device_batch, training.constants)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.mfu_steps
    peak = args.peak_tflops * 1e12 * jax.device_count()
    row = dict(shape="vit_b16", dtype="bfloat16", remat=args.remat, batch=batch, steps=args.mfu_steps,
               device=f"{jax.device_count()} x {device.device_kind}", step_s=step_s, samples_per_s=batch / step_s,
               model_flops_per_step=model_flops, xla_flops_per_step=xla_flops,
               model_tflops_per_s=model_flops / step_s / 1e12, xla_tflops_per_s=xla_flops / step_s / 1e12,
               mfu=model_flops / step_s / peak, xla_flops_utilization=xla_flops / step_s / peak,
               peak_tflops_per_device=args.peak_tflops, compile_s=compile_s, loss=float(metrics["loss"]),
               load_before=load_before, load_after=_load())
    print(f"ViT-B/16 bf16{' remat' if args.remat else ''} batch {batch} on {row['device']}: "
          f"{step_s * 1000:.1f} ms/step, {row['samples_per_s']:.1f} samples/s; model FLOPs/step "
          f"{model_flops:.3e} ({row['model_tflops_per_s']:.2f} TFLOP/s, MFU {row['mfu']:.2%}); XLA FLOPs/step "
          f"{xla_flops:.3e} ({row['xla_tflops_per_s']:.2f} TFLOP/s, {row['xla_flops_utilization']:.1%} of peak); "
          f"peak {args.peak_tflops:.0f} TFLOP/s per device; compile {compile_s:.1f}s", flush=True)
    if device.platform == "cpu":
        print("  (CPU run: the peak is a GPU's, so this MFU means nothing; it only checks the path runs.)")
    print("\n| device | model | batch | ms/step | samples/s | model TFLOP/s | MFU | XLA TFLOP/s | peak TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | ViT-B/16 bf16{' remat' if args.remat else ''} | {batch} | {step_s * 1000:.1f} "
          f"| {row['samples_per_s']:.1f} | {row['model_tflops_per_s']:.2f} | {row['mfu']:.2%} "
          f"| {row['xla_tflops_per_s']:.2f} | {args.peak_tflops:.0f} |")
    return row


def main() -> None:
    args = _parse_args()
    import jax

    print(f"machine: {bench_common.machine()}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device(s)); "
          f"1-minute load average at start: {_load():.2f}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.mfu:
        results = [mfu(args)]
    else:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
        batches = {name: int(size) for name, size in (item.split("=") for item in args.batches.split(",") if item)}
        results = [compare(shape, batches.get(shape), args) for shape in args.shapes.split(",")]
        print_table(results)
    print(f"\n1-minute load average at end: {_load():.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=bench_common.machine(), results=results), f, indent=2, default=float)


if __name__ == "__main__":
    main()
