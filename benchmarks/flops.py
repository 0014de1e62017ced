"""Train-step FLOPs: XLA's count of the compiled CLIP step against the analytic 3x forward count.

The step is the trainer's (`trainer.make_train_step` around `ClipMethod.loss_fn`, with the Shapes World
preset's AdamW, clipping and schedule, as benchmarks/train_step.py sets them up), lowered and compiled on
abstract shapes: the model is traced with `nnx.eval_shape` and the state, optimizer state and batch are
`jax.ShapeDtypeStruct`s, so no parameter is ever materialized. The mesh is one device of the default
backend, so the program is the whole global batch's step. `compiled.cost_analysis()["flops"]` is read and
split into:
  matmul     dot FLOPs of the compiled HLO (2 x output elements x contracted size, per dot);
  optimizer  XLA's count for the update alone (global-norm clip, AdamW, decay, schedule), compiled apart;
  other      the rest: LayerNorms, softmax, activations, residual adds, the loss, casts.

Analytic count (`forward_flops`), 2 FLOPs per multiply-add, per image-text pair: per transformer block
over T tokens of width W and MLP width M, 2 T (4 W^2 + 2 W M) for the q/k/v/out projections and the MLP
plus 4 T^2 W for QK^T and AV (the causal text mask counted in full); the patch embedding
2 N (P^2 3) W, both projections 2 W E, and the contrastive logits 2 x 2 B E (the trainer's sharded loss
builds the image->text and the text->image blocks with a matmul each). Training = 3 x forward
(backward = 2 x forward). Norms, activations, softmax and the optimizer are left out.

open_clip's profile counts the forward in multiply-adds (fvcore: one "FLOP" per multiply-add): ViT-B/32
is 7.39 GMACs per pair, ViT-B/16 20.54. The per-pair figures 44.3 and 123.3 GFLOP are 6 x those, i.e.
3 x the forward at 2 FLOPs per multiply-add: the training FLOPs of a pair, not its forward. This script
checks that `forward_flops` reproduces them (towers only; the logits add 0.004% at batch 256).

Where the compiled count departs from 3 x forward:
- pooling reads one row of each tower's last block (class token, EOT position), and the encoders
  compute only that row there (`VisionTransformer.pooled`, `TextTransformer.pooled`; keys and values
  still come from every row): `pooled_skip_flops` per pair fewer, 6.7% of ViT-B/32's forward and 6.9% of
  ViT-B/16's. `ratio_to_computed` compares XLA's count with the analytic one less this.
- backward needs no gradient of the pixels, so the patch embedding's input-gradient matmul
  (2 N P^2 3 W per pair, `unbuilt_pixel_gradient_flops`) is never built.
- remat (`model.remat`: each transformer block is `nnx.remat`-ed, nothing saved) recomputes each
  block's forward in the backward, but only what the gradients read: the out-projection and fc2
  outputs are not needed, so XLA drops those matmuls and remat costs ~0.7 of a forward, not a whole one.
- other (LayerNorm, softmax, activations, residual adds, loss) and optimizer FLOPs are what the
  analytic count leaves out: ~0.3% and 0.03% of ViT-B's step in float32. On the CPU a bfloat16 step
  counts more "other": XLA's CPU backend computes bfloat16 dots in float32 and counts the converts.
- with small activations XLA's CPU fusion copies elementwise producers into each of their consumers,
  so "other" grows with depth: a 4-block width-64 encoder counts 2.7x its unoptimized HLO's elementwise
  FLOPs at [128, 17, 64] float32 activations (0.56 MB) and 1.0x at [512, 17, 64] (2.2 MB).
  `unoptimized_flops`, the count of the HLO before optimization, shows it; ViT-B shapes at batch 256
  are far above that size.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/flops.py --out /tmp/flops.json
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/flops.py --shapes vit_b32 --remat off --dump_hlo /tmp/hlo

Bounds: compiled / analytic <= 1.05 without remat, <= 1.40 with it. XLA's CPU cost analysis is what
this machine measures (the backend is printed and recorded); a GPU's can differ (fusions, library calls).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import time

import bench_common
import train_step

BOUNDS = {False: 1.05, True: 1.40}  # remat -> largest compiled / analytic ratio accepted
OPEN_CLIP_TRAIN_GFLOPS = {"vit_b32": 44.3, "vit_b16": 123.3}  # per pair, 3 x forward, 2 FLOPs per MAC

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(?\s*[a-z0-9]+\[([0-9,]*)\]")
_DOT = re.compile(r"\sdot\(%([\w.\-]+),\s*%[\w.\-]+\).*?lhs_contracting_dims=\{([0-9,]*)\}")
_GEMM = re.compile(r'\scustom-call\(%([\w.\-]+),\s*%[\w.\-]+.*custom_call_target="__cublas\$(?:lt\$matmul|gemm)"'
                   r'.*?"lhs_contracting_dimensions":\[([0-9",]*)\]')


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="vit_b32,vit_b16", help="comma-separated: vit_b32, vit_b16, tiny")
    parser.add_argument("--batch", type=int, default=256, help="global batch of the step")
    parser.add_argument("--remat", choices=("both", "on", "off"), default="both")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay float32)")
    parser.add_argument("--dump_hlo", default="", help="write each compiled step's HLO text into this directory")
    parser.add_argument("--out", default="", help="write the rows as JSON to this file")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# Analytic count
# --------------------------------------------------------------------------------------------------


def forward_flops(model_config, batch: int) -> dict[str, float]:
    """Forward FLOPs per image-text pair of a CLIP (kind "clip", patch stem) by part, 2 per multiply-add.

    Keys: vision_blocks, vision_attention, patch_embedding, visual_projection, text_blocks,
    text_attention, text_projection, logits (this pair's share of the two [B, B] logit matmuls).
    """
    vision, text, embed = model_config.vision, model_config.text, model_config.embed_dim
    if model_config.kind != "clip" or vision.stem != "patch":
        raise ValueError(f"forward_flops counts CLIP with a patch stem; got kind {model_config.kind!r}, "
                         f"stem {vision.stem!r}")

    def blocks(tower, tokens: int) -> float:
        return tower.depth * 2 * tokens * (4 * tower.width**2 + 2 * tower.width * tower.mlp_dim)

    def attention(tower, tokens: int) -> float:
        return tower.depth * 4 * tokens**2 * tower.width

    image_tokens = vision.num_patches + 1
    return {
        "vision_blocks": blocks(vision, image_tokens),
        "vision_attention": attention(vision, image_tokens),
        "patch_embedding": 2 * vision.num_patches * vision.patch_size**2 * 3 * vision.width,
        "visual_projection": 2 * vision.width * embed,
        "text_blocks": blocks(text, text.context_length),
        "text_attention": attention(text, text.context_length),
        "text_projection": 2 * text.width * embed,
        "logits": 2 * 2 * batch * embed,
    }


def pooled_skip_flops(model_config) -> float:
    """Forward FLOPs per pair that `forward_flops` counts but the encoders never compute: the last block
    of a tower computes only the row its pooling reads (class token, EOT position), so each of the
    other T - 1 rows skips its query and out projections, its attention and its MLP, 2 (2 W^2 + 2 W M
    + 2 T W) FLOPs (keys and values are still projected from every row)."""

    def skipped(tower, tokens: int) -> float:
        return 2 * (tokens - 1) * (2 * tower.width**2 + 2 * tower.width * tower.mlp_dim + 2 * tokens * tower.width)

    vision, text = model_config.vision, model_config.text
    image = skipped(vision, vision.num_patches + 1) if vision.pooling == "cls" else 0.0
    return image + skipped(text, text.context_length)


def train_flops_per_pair(model_config, batch: int, *, logits: bool = True) -> float:
    """3 x `forward_flops` summed: the analytic training FLOPs of one pair (logits=False: towers only)."""
    parts = forward_flops(model_config, batch)
    return 3.0 * sum(value for name, value in parts.items() if logits or name != "logits")


# --------------------------------------------------------------------------------------------------
# Compiled count
# --------------------------------------------------------------------------------------------------


def matmul_flops(hlo_text: str) -> float:
    """Sum over the dots of an HLO module's text (plain `dot` and cuBLAS gemm custom calls) of
    2 x output elements x contracted size; operand shapes are read from their definitions."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for line in hlo_text.splitlines():
        definition = _DEFINITION.match(line)
        if not definition:
            continue
        shape = tuple(int(size) for size in definition.group(2).split(",") if size)
        shapes[definition.group(1)] = shape
        product = _DOT.search(line) or _GEMM.search(line)
        if product:
            lhs = shapes[product.group(1)]
            contracted = math.prod(lhs[int(axis)] for axis in product.group(2).replace('"', "").split(",") if axis)
            total += 2 * math.prod(shape) * contracted
    return float(total)


def xla_flops(compiled) -> float:
    """XLA's `cost_analysis()["flops"]` of a lowered or compiled computation."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def clip_setup(model_config, batch: int):
    """(experiment config, ClipMethod) for `model_config`: train_step.py's setup (the Shapes World
    preset's optimizer and mesh, a vocabulary from the config instead of a tokenizer) with this model."""
    from vlm_jax.methods.clip import ClipMethod, model_config_dict

    config, _ = train_step.benchmark_setup("vit_b32", batch, "", dtype=model_config.dtype, remat=model_config.remat)
    config.model = model_config_dict(model_config)
    text = model_config.text
    vocabulary = train_step.PresetVocabulary(text.vocab_size, text.eos_token_id, text.pad_token_id, text.bos_token_id)
    return config, ClipMethod(tokenizer=vocabulary)


def compile_abstract_step(config, method):
    """(lowered train step, its compiled form, compiled optimizer update, model config), on abstract shapes.

    The step is `trainer.make_train_step` with the optimizer `optim.make_optimizer` builds from
    config.optim, on a one-device mesh, donating the train state as the trainer does.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vlm_jax.train import optim, sharding, trainer

    mesh = sharding.make_mesh(config.sharding.mesh, devices=jax.devices()[:1])
    optim_section = optim.optim_config().to_dict() | dict(config.optim) | {"trainable": method.trainable_policy(config)}
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: method.create_model(config, nnx.Rngs(0)))
    graphdef, params, frozen = trainer.split_trainable(model, optim_section["trainable"])
    tx, _ = optim.make_optimizer(optim_section, params)
    step = trainer.make_train_step(method, graphdef, tx, optim.make_schedule(optim_section),
                                   int(optim_section["accumulation_steps"]))
    opt_state = jax.eval_shape(tx.init, params)
    state = {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32),
             "rng": jax.eval_shape(lambda: jax.random.key(0))}
    vision, text, batch = model.config.vision, model.config.text, int(config.global_batch_size)
    inputs = {"image": jax.ShapeDtypeStruct((batch, vision.image_size, vision.image_size, 3), jnp.float32),
              "text_ids": jax.ShapeDtypeStruct((batch, text.context_length), jnp.int32)}
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, inputs, method.constants(config, mesh))

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return lowered, lowered.compile(), jax.jit(update).lower(params, opt_state, params).compile(), model.config


def measure(name: str, model_config, batch: int, dump_hlo: str = "") -> dict:
    """One row: XLA's FLOPs of the compiled step (total, matmul, optimizer, other) against the analytic count."""
    import jax

    config, method = clip_setup(model_config, batch)
    start = time.perf_counter()
    lowered, compiled, compiled_update, model_config = compile_abstract_step(config, method)
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    if dump_hlo:
        path = pathlib.Path(dump_hlo) / f"{name}_{'remat' if model_config.remat else 'no_remat'}.hlo.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hlo)
    analytic = batch * train_flops_per_pair(model_config, batch)
    total, matmul, optimizer = xla_flops(compiled), matmul_flops(hlo), xla_flops(compiled_update)
    parts = forward_flops(model_config, batch)
    computed = analytic - 3 * batch * pooled_skip_flops(model_config)
    row = dict(shape=name, batch=batch, remat=model_config.remat, dtype=model_config.dtype,
               backend=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
               xla_flops=total, matmul_flops=matmul, optimizer_flops=optimizer,
               other_flops=total - matmul - optimizer, unoptimized_flops=xla_flops(lowered), analytic_flops=analytic,
               analytic_computed_flops=computed,
               analytic_gflops_per_pair=analytic / batch / 1e9,
               analytic_towers_gflops_per_pair=train_flops_per_pair(model_config, batch, logits=False) / 1e9,
               forward_gflops_per_pair={part: value / 1e9 for part, value in parts.items()},
               # The pixels need no gradient, so backward skips the patch embedding's input matmul.
               unbuilt_pixel_gradient_flops=batch * parts["patch_embedding"],
               ratio=total / analytic, matmul_ratio=matmul / analytic, ratio_to_computed=total / computed,
               bound=BOUNDS[bool(model_config.remat)],
               compile_s=compile_s)
    row["within_bound"] = row["ratio"] <= row["bound"]
    if name in OPEN_CLIP_TRAIN_GFLOPS:
        row["open_clip_gflops_per_pair"] = OPEN_CLIP_TRAIN_GFLOPS[name]
        towers = round(row["analytic_towers_gflops_per_pair"], 1)
        row["reproduces_open_clip"] = towers == OPEN_CLIP_TRAIN_GFLOPS[name]
    return row


def model_for(name: str, *, dtype: str, remat: bool):
    """A CLIPConfig by preset name (vit_b32, vit_b16, tiny) in `dtype` with float32 params."""
    from vlm_jax import models

    if name not in ("vit_b32", "vit_b16", "tiny"):
        raise ValueError(f"--shapes entry {name!r} is not one of vit_b32, vit_b16, tiny.")
    # Unrolled: XLA's cost analysis counts a while loop's body once, so a scanned tower (the default,
    # `CLIPConfig.scan_layers`) would count one block of its loop. The program per block is the same.
    return getattr(models, name)(dtype=dtype, param_dtype="float32", remat=remat, scan_layers=False)


def step_flops(model_config, batch: int) -> float:
    """XLA's FLOPs of the train step of `model_config` at `batch`, counted on its unrolled form (the
    cost analysis counts a scanned loop's body once); compiled on abstract shapes, nothing runs."""
    return xla_flops(compile_abstract_step(*clip_setup(model_config.replace(scan_layers=False), batch))[1])


def print_table(rows: list[dict]) -> None:
    print("\n| shape | remat | batch | XLA GFLOP/pair | matmul | optimizer | other | analytic 3x fwd | ratio "
          "| matmul ratio | ratio to computed | bound | open_clip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_pair = {key: row[key] / row["batch"] / 1e9 for key in
                    ("xla_flops", "matmul_flops", "optimizer_flops", "other_flops")}
        open_clip = "-"
        if "open_clip_gflops_per_pair" in row:
            verdict = "reproduced" if row["reproduces_open_clip"] else "differs"
            open_clip = f"{row['open_clip_gflops_per_pair']} ({verdict})"
        print(f"| {row['shape']} | {'on' if row['remat'] else 'off'} | {row['batch']} | {per_pair['xla_flops']:.3f} "
              f"| {per_pair['matmul_flops']:.3f} | {per_pair['optimizer_flops']:.4f} | {per_pair['other_flops']:.3f} "
              f"| {row['analytic_gflops_per_pair']:.3f} | {row['ratio']:.4f} | {row['matmul_ratio']:.4f} "
              f"| {row['ratio_to_computed']:.4f} | {'<=' if row['within_bound'] else 'EXCEEDS'} {row['bound']:.2f} "
              f"| {open_clip} |")


def main() -> None:
    args = _parse_args()
    import jax

    print(f"machine: {bench_common.machine()}")
    print(f"jax {jax.__version__}; backend {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    remats = {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]
    rows = []
    for name in args.shapes.split(","):
        for remat in remats:
            row = measure(name, model_for(name, dtype=args.dtype, remat=remat), args.batch, args.dump_hlo)
            print(f"{name} remat {'on' if remat else 'off'}: {row['xla_flops']:.4e} FLOPs/step, ratio "
                  f"{row['ratio']:.4f} (bound {row['bound']}), compile {row['compile_s']:.1f}s", flush=True)
            rows.append(row)
    print_table(rows)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(machine=bench_common.machine(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
