"""benchmarks/flops.py: the analytic FLOP count, the HLO matmul count, the compiled train step against
them, and the encoders computing only the rows their pooling reads."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax import models

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import flops  # noqa: E402
import train_step  # noqa: E402

# tiny(): image 32 px in 8 px patches (16 patches + class token = 17 tokens), text 16 tokens, both towers
# 2 blocks of width 64 and MLP 128, embed 32. Per block, 2 T (4 W^2 + 2 W M) = 2 T 32,768 and 4 T^2 W.
TINY_FORWARD = {
    "vision_blocks": 2 * 2 * 17 * 32_768,  # 2,228,224
    "vision_attention": 2 * 4 * 17**2 * 64,  # 147,968
    "patch_embedding": 2 * 16 * (8 * 8 * 3) * 64,  # 393,216
    "visual_projection": 2 * 64 * 32,  # 4,096
    "text_blocks": 2 * 2 * 16 * 32_768,  # 2,097,152
    "text_attention": 2 * 4 * 16**2 * 64,  # 131,072
    "text_projection": 2 * 64 * 32,  # 4,096
    "logits": 2 * 2 * 8 * 32,  # batch 8: 1,024
}
# The last block's other rows: 2 (T - 1) (2 W^2 + 2 W M + 2 T W); vision T = 17, text T = 16.
TINY_POOLED_SKIP = 2 * 16 * (8_192 + 16_384 + 2_176) + 2 * 15 * (8_192 + 16_384 + 2_048)  # 1,654,784


def test_analytic_count_of_the_tiny_clip_matches_the_hand_count():
    config = models.tiny()
    assert flops.forward_flops(config, batch=8) == TINY_FORWARD
    assert flops.train_flops_per_pair(config, 8) == 3 * 5_006_848 == 15_020_544
    assert flops.train_flops_per_pair(config, 8, logits=False) == 3 * (5_006_848 - 1_024)
    assert flops.pooled_skip_flops(config) == TINY_POOLED_SKIP == 1_654_784


def test_analytic_count_reproduces_open_clips_training_gflops_per_pair():
    # open_clip's profile counts multiply-adds; 44.3 / 123.3 are 6x its forward count (2 FLOPs per
    # multiply-add, 3x for forward + backward).
    for name, gflops in flops.OPEN_CLIP_TRAIN_GFLOPS.items():
        config = getattr(models, name)()
        towers = flops.train_flops_per_pair(config, 256, logits=False)
        assert round(towers / 1e9, 1) == gflops
    assert round(flops.train_flops_per_pair(models.vit_b32(), 256, logits=False) / 6e9, 2) == 7.39
    assert round(flops.train_flops_per_pair(models.vit_b16(), 256, logits=False) / 6e9, 2) == 20.54


def test_analytic_count_is_the_one_train_step_reports_mfu_with():
    for config in (models.tiny(), models.vit_b16()):
        assert flops.train_flops_per_pair(config, 256) == train_step.model_flops_per_example(config, 256)


def test_forward_flops_refuses_models_it_does_not_count():
    with pytest.raises(ValueError, match="counts CLIP with a patch stem"):
        flops.forward_flops(models.tiny("siglip"), 8)


def test_matmul_flops_reads_dots_and_cublas_gemms_with_their_operand_shapes():
    hlo = "\n".join([
        "%fused_computation (param_0: f32[4,8,16], param_1: f32[16,32]) -> f32[4,8,32] {",
        "  %param_0.1 = f32[4,8,16]{2,1,0} parameter(0)",
        "  %param_1.1 = f32[16,32]{1,0} parameter(1)",
        "  ROOT %dot.1 = f32[4,8,32]{2,1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={2}, "
        "rhs_contracting_dims={0}, metadata={op_name=\"jit(f)/dot_general\"}",
        "}",
        "  %a = bf16[64,128]{1,0} parameter(0)",
        "  %b = bf16[128,256]{1,0} parameter(1)",
        "  %custom-call.3 = (bf16[64,256]{1,0}, s8[4194304]{0}) custom-call(%a, %b), "
        "custom_call_target=\"__cublas$gemm\", backend_config={\"gemm_backend_config\":{\"dot_dimension_numbers\":"
        "{\"lhs_contracting_dimensions\":[\"1\"],\"rhs_contracting_dimensions\":[\"0\"]}}}",
        "  %add.2 = f32[4,8,32]{2,1,0} add(%dot.1, %dot.1)",
    ])
    assert flops.matmul_flops(hlo) == 2 * (4 * 8 * 32) * 16 + 2 * (64 * 256) * 128


def test_matmul_flops_of_a_compiled_batched_matmul_equals_xlas_count():
    lhs, rhs = jax.ShapeDtypeStruct((3, 8, 16), jnp.float32), jax.ShapeDtypeStruct((3, 16, 4), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(lhs, rhs).compile()
    assert flops.matmul_flops(compiled.as_text()) == 2 * 3 * 8 * 4 * 16 == flops.xla_flops(compiled)


def _random_ids(config, batch: int, seed: int = 0) -> np.ndarray:
    """Ids [B, L] with the EOS at a different position per row, padding after it."""
    text = config.text
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, text.vocab_size - 2, size=(batch, text.context_length)).astype(np.int32)
    for row, length in enumerate(np.linspace(2, text.context_length, batch).astype(int)):
        ids[row, length - 1] = text.eos_token_id
        ids[row, length:] = text.pad_token_id
    return ids


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encoders_computing_only_the_pooled_rows_give_the_full_towers_embeddings(kind):
    graphdef, state = nnx.split(models.CLIP(models.tiny(kind), rngs=nnx.Rngs(0)))
    config = models.tiny(kind)
    pixels = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ids = _random_ids(config, 4)

    @jax.jit
    def pooled_and_full(state, pixels, ids):
        model = nnx.merge(graphdef, state)
        vision, text = model.vision_model, model.text_model
        full_image, full_text = vision.pool(vision.tokens(pixels)), text.pool(text.tokens(ids), ids)
        if model.visual_projection is not None:
            full_image, full_text = model.visual_projection(full_image), model.text_projection(full_text)
        return model.encode_image(pixels), full_image, model.encode_text(ids), full_text

    image, full_image, text, full_text = pooled_and_full(state, pixels, ids)
    np.testing.assert_allclose(image, full_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text, full_text, rtol=1e-5, atol=1e-5)


def test_pooled_encoders_skip_exactly_the_last_blocks_unread_rows():
    config = models.tiny()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.CLIP(config, rngs=nnx.Rngs(0))))
    batch = 4
    pixels = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, config.text.context_length), jnp.int32)

    def matmuls(fn, inputs):
        return flops.matmul_flops(jax.jit(fn).lower(state, inputs).compile().as_text())

    pooled = matmuls(lambda s, x: nnx.merge(graphdef, s).encode_image(x), pixels) + matmuls(
        lambda s, x: nnx.merge(graphdef, s).encode_text(x), ids)
    full = matmuls(lambda s, x: nnx.merge(graphdef, s).vision_model.tokens(x), pixels) + matmuls(
        lambda s, x: nnx.merge(graphdef, s).text_model.tokens(x), ids)
    projections = 2 * 2 * 64 * 32 * batch  # applied to the pooled rows only
    assert full - (pooled - projections) == batch * TINY_POOLED_SKIP


@pytest.mark.slow
def test_compiled_tiny_train_step_stays_within_the_analytic_count():
    # Batch 512: with small activations ([128, 17, 64] float32 is small enough) XLA's CPU fusion copies
    # elementwise producers into several consumers and the non-matmul count grows with depth.
    row = flops.measure("tiny", models.tiny(dtype="float32"), 512)
    analytic = 512 * flops.train_flops_per_pair(models.tiny(), 512)
    assert row["analytic_flops"] == analytic
    assert row["ratio"] <= flops.BOUNDS[False]
    # What the step should compute: 3x the forward without the last blocks' unread rows, less the
    # pixels' gradient through the patch embedding, which nothing needs.
    expected_matmuls = row["analytic_computed_flops"] - row["unbuilt_pixel_gradient_flops"]
    assert row["matmul_flops"] == pytest.approx(expected_matmuls, rel=0.01)
    assert 0.95 <= row["ratio_to_computed"] <= flops.BOUNDS[False]
    assert 0 < row["optimizer_flops"] < 0.01 * row["xla_flops"]
