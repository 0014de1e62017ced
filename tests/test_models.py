"""CLIP / SigLIP model behaviour: shapes, dtypes, partitioning metadata, remat, configs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.models import CLIP, CLIPConfig, siglip_b16, tiny, vit_b16, vit_b32, vit_l14
from vlm_jax.weights.hf_config import from_hf_config, to_hf_config

LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "patch", "proj", None}


def _inputs(config: CLIPConfig, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    pixels = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    ids = rng.integers(3, config.text.vocab_size - 2, size=(batch, config.text.context_length))
    ids[:, 6] = config.text.eos_token_id
    return pixels, jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encoders_return_float32_embeddings_and_patch_tokens(kind):
    config = tiny(kind)
    model = CLIP(config, rngs=nnx.Rngs(0))
    pixels, ids = _inputs(config)
    image = model.encode_image(pixels)
    text = model.encode_text(ids)
    tokens = model.image_tokens(pixels)
    assert image.shape == (2, config.embed_dim) and image.dtype == jnp.float32
    assert text.shape == (2, config.embed_dim) and text.dtype == jnp.float32
    assert tokens.shape == (2, config.vision.num_patches, config.vision.width)
    assert np.isfinite(np.asarray(image)).all() and np.isfinite(np.asarray(text)).all()
    assert (model.logit_bias is None) == (kind == "clip")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_every_param_names_a_logical_axis_per_dimension(kind):
    model = nnx.eval_shape(lambda: CLIP(tiny(kind), rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == len(variable.shape), path
        assert set(names) <= LOGICAL_NAMES, path
        if len(variable.shape) >= 2:
            assert any(name is not None for name in names), path


def test_partition_specs_follow_the_trainer_rules():
    model = nnx.eval_shape(lambda: CLIP(tiny(), rngs=nnx.Rngs(0)))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
             ("proj", "tensor"), ("kv", None), ("patch", None))
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    layer = specs["vision_model"]["encoder"]["layers"][0]
    assert tuple(layer["self_attn"]["q_proj"]["kernel"].get_value()) == ("fsdp", "tensor", None)
    assert tuple(layer["mlp"]["fc2"]["kernel"].get_value()) == ("tensor", "fsdp")
    token_embedding = specs["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert tuple(token_embedding.get_value()) == ("tensor", "fsdp")
    assert tuple(specs["logit_scale"].get_value()) == ()


def test_model_builds_without_a_mesh_and_jits():
    model = CLIP(tiny(), rngs=nnx.Rngs(0))
    pixels, ids = _inputs(model.config)
    encode = nnx.jit(lambda m, x: m.encode_image(x))
    np.testing.assert_allclose(np.asarray(encode(model, pixels)), np.asarray(model.encode_image(pixels)),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bfloat16_compute_stays_close_to_float32(kind):
    config = tiny(kind)
    reference = CLIP(config, rngs=nnx.Rngs(0))
    bf16 = CLIP(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    pixels, ids = _inputs(config)
    for encode in ("encode_image", "encode_text"):
        want = np.asarray(getattr(reference, encode)(pixels if encode == "encode_image" else ids))
        got = np.asarray(getattr(bf16, encode)(pixels if encode == "encode_image" else ids))
        cosine = (want * got).sum(-1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got, axis=-1)
        assert cosine.min() > 0.999, (encode, cosine)
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), encode


def test_bfloat16_params_are_stored_in_bfloat16():
    model = CLIP(tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    pixels, _ = _inputs(model.config)
    assert np.isfinite(np.asarray(model.encode_image(pixels))).all()


def _loss(model, pixels, ids):
    return jnp.sum(model.encode_image(pixels) * model.encode_text(ids))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_keeps_outputs_and_gradients(policy):
    config = tiny()
    plain = CLIP(config, rngs=nnx.Rngs(0))
    remat = CLIP(config.replace(remat=True, remat_policy=policy), rngs=nnx.Rngs(0))
    pixels, ids = _inputs(config)
    grad_fn = nnx.jit(nnx.value_and_grad(_loss))
    plain_loss, plain_grads = grad_fn(plain, pixels, ids)
    remat_loss, remat_grads = grad_fn(remat, pixels, ids)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
    for (path, want), (_, got) in zip(nnx.to_flat_state(plain_grads), nnx.to_flat_state(remat_grads)):
        np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), atol=1e-5, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_keep_the_params_outputs_and_gradients_of_unrolled_ones(remat):
    base = tiny(remat=remat)
    config = base.replace(vision=dataclasses.replace(base.vision, depth=3), text=dataclasses.replace(base.text, depth=4))
    unrolled = CLIP(config.replace(scan_layers=False), rngs=nnx.Rngs(0))
    scanned = CLIP(config.replace(scan_layers=True), rngs=nnx.Rngs(0))
    unrolled_state, scanned_state = nnx.to_flat_state(nnx.state(unrolled)), nnx.to_flat_state(nnx.state(scanned))
    assert [path for path, _ in scanned_state] == [path for path, _ in unrolled_state]  # layers.<i> as before
    pixels, ids = _inputs(config)
    for name in ("encode_image", "encode_text", "image_tokens"):
        inputs = ids if name == "encode_text" else pixels
        np.testing.assert_allclose(np.asarray(getattr(scanned, name)(inputs)),
                                   np.asarray(getattr(unrolled, name)(inputs)), atol=1e-5, err_msg=name)
    grad_fn = nnx.jit(nnx.value_and_grad(_loss))
    want_loss, want_grads = grad_fn(unrolled, pixels, ids)
    got_loss, got_grads = grad_fn(scanned, pixels, ids)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, want), (_, got) in zip(nnx.to_flat_state(want_grads), nnx.to_flat_state(got_grads)):
        np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), atol=1e-5, err_msg=str(path))

    def compiled_text(model):
        graphdef, state = nnx.split(model)
        loss = lambda state: _loss(nnx.merge(graphdef, state), pixels, ids)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(state).compile().as_text()

    # The scanned towers loop over their blocks (forward and backward); the unrolled ones have no loop.
    assert compiled_text(scanned).count(" while(") >= 2
    assert " while(" not in compiled_text(unrolled)


def test_causal_text_embedding_ignores_tokens_after_eos_and_siglip_sees_them():
    for kind, affected in (("clip", False), ("siglip", True)):
        model = CLIP(tiny(kind), rngs=nnx.Rngs(0))
        _, ids = _inputs(model.config)
        changed = ids.at[:, 8].set(ids[:, 8] + 1)
        if kind == "siglip":
            changed = ids.at[:, 2].set(ids[:, 2] + 1)
        delta = np.abs(np.asarray(model.encode_text(changed) - model.encode_text(ids))).max()
        assert (delta > 1e-4) == affected, (kind, delta)


def test_text_shorter_than_context_length_uses_leading_positions():
    model = CLIP(tiny(), rngs=nnx.Rngs(0))
    _, ids = _inputs(model.config)
    short = ids[:, :8]
    np.testing.assert_allclose(np.asarray(model.encode_text(short)), np.asarray(model.encode_text(ids)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(jnp.concatenate([ids, ids], axis=1))


def test_wrong_image_size_is_rejected():
    model = CLIP(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected images \[B, 32, 32, 3\]"):
        model.encode_image(jnp.zeros((1, 24, 24, 3)))


def test_invalid_configs_list_every_problem():
    with pytest.raises(ValueError) as error:
        dataclasses.replace(tiny("siglip"), embed_dim=48, logit_bias_init=None)
    assert "embed_dim (48) must equal vision.width (64)" in str(error.value)
    assert "logit_bias_init" in str(error.value)
    with pytest.raises(ValueError, match="act 'relu'"):
        tiny(vision=dataclasses.replace(tiny().vision, act="relu"))


@pytest.mark.parametrize("preset", [vit_b32, vit_b16, vit_l14, siglip_b16])
def test_presets_round_trip_through_hf_config(preset):
    config = preset()
    assert from_hf_config(to_hf_config(config)) == config


def test_presets_build_abstractly_with_expected_sizes():
    counts = {}
    for preset in (vit_b32, vit_b16):
        model = nnx.eval_shape(lambda: CLIP(preset(), rngs=nnx.Rngs(0)))
        leaves = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in leaves)
        counts[preset.__name__] = sum(int(np.prod(v.shape)) for v in leaves)
    # Parameter counts of openai/clip-vit-base-patch32 and -patch16 in transformers.
    assert counts == {"vit_b32": 151_277_313, "vit_b16": 149_620_737}


def _block(**kwargs):
    from vlm_jax.models.layers import Block

    return Block(32, 4, 64, "gelu", eps=1e-5, rngs=nnx.Rngs(0), **kwargs)


def test_block_computes_only_the_requested_query_rows_with_the_same_values():
    block = _block()
    hidden = jax.random.normal(jax.random.key(0), (2, 6, 32))
    key_mask = jnp.array([[True] * 6, [True, True, False, True, False, True]])
    full = block(hidden, key_mask=key_mask, is_causal=True)
    first = block(hidden, key_mask=key_mask, is_causal=True, num_queries=2)
    assert first.shape == (2, 2, 32)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :2]), atol=1e-6)


def test_block_cross_attention_ignores_masked_context_and_needs_a_context():
    block = _block(cross_attention=True, context_width=16)
    queries = jax.random.normal(jax.random.key(0), (2, 3, 32))
    context = jax.random.normal(jax.random.key(1), (2, 5, 16))
    context_mask = jnp.array([[True, True, False, True, False], [True] * 5])
    reference = block(queries, context=context, context_mask=context_mask)
    changed = jnp.where(context_mask[..., None], context, 1e3)
    np.testing.assert_array_equal(np.asarray(block(queries, context=changed, context_mask=context_mask)),
                                  np.asarray(reference))
    assert not np.allclose(block(queries, context=context.at[1, 0].add(1.0))[1], reference[1])
    with pytest.raises(ValueError, match="needs a context"):
        block(queries)
    with pytest.raises(ValueError, match="refuses it"):
        _block()(queries, context=context)


def test_block_dropout_runs_only_with_an_rng():
    block = _block(dropout=0.5)
    hidden = jax.random.normal(jax.random.key(0), (2, 4, 32))
    np.testing.assert_array_equal(np.asarray(block(hidden)), np.asarray(block(hidden, rng=None)))
    assert not np.allclose(block(hidden, rng=jax.random.key(1)), block(hidden))


def _conv_stem_config(**vision):
    base = tiny()
    return base.replace(vision=dataclasses.replace(base.vision, stem="conv", stem_channels=(8, 16, 32), **vision))


def test_conv_stem_keeps_the_token_grid_names_every_axis_and_round_trips_through_our_format(tmp_path, caplog):
    import logging

    from vlm_jax.weights import load_pretrained, save_pretrained

    config = _conv_stem_config()
    model = CLIP(config, rngs=nnx.Rngs(0))
    pixels, ids = _inputs(config)
    assert model.image_tokens(pixels).shape == (2, config.vision.num_patches, config.vision.width)
    stage = model.vision_model.embeddings.stem[0]
    assert stage.kernel.shape == (3, 3, 3, 8)
    assert model.vision_model.embeddings.patch_embedding.kernel.shape == (32, config.vision.width)
    # Each token sees its own 8x8 cell and, through the 3x3 overlaps, a few pixels of its neighbours.
    far = pixels.at[:, 24:, 24:].add(5.0)
    embeddings = model.vision_model.embeddings
    tokens, moved = embeddings(pixels), embeddings(far)  # [B, 1 + 16, width], the class token first
    assert np.allclose(tokens[:, 1], moved[:, 1], atol=1e-5) and not np.allclose(tokens[:, -1], moved[:, -1])

    abstract = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
             ("proj", "tensor"), ("kv", None), ("patch", None))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == len(variable.shape) and set(names) <= LOGICAL_NAMES, path
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    assert tuple(specs["vision_model"]["embeddings"]["stem"][0]["kernel"].get_value()) == (None, None, None, "fsdp")

    with caplog.at_level(logging.INFO):
        save_pretrained(model, tmp_path)
    assert "cannot represent vision.stem='conv'" in caplog.text
    loaded = load_pretrained(tmp_path)
    assert loaded.config == config
    np.testing.assert_array_equal(np.asarray(loaded.model.encode_image(pixels)), np.asarray(model.encode_image(pixels)))
    np.testing.assert_array_equal(np.asarray(loaded.model.encode_text(ids)), np.asarray(model.encode_text(ids)))


def test_conv_stem_must_halve_the_image_down_to_the_patch_grid():
    with pytest.raises(ValueError, match="log2"):
        _conv_stem_config(patch_size=16)
    with pytest.raises(ValueError, match="'patch' or 'conv'"):
        dataclasses.replace(tiny().vision, stem="convolution")


def _step_temp_bytes(config) -> int:
    """Temporary bytes XLA allocates for one value-and-grad of `_loss` at batch 16."""
    graphdef, state = nnx.split(CLIP(config, rngs=nnx.Rngs(0)))
    pixels, ids = _inputs(config, batch=16)
    loss = lambda state: _loss(nnx.merge(graphdef, state), pixels, ids)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes


def test_remat_policy_sets_what_the_scanned_backward_keeps():
    # Scanned blocks (the default) keep per-block residuals in the loop's stacked buffers, so what a
    # policy saves shows in the step's temporaries. (Unrolled, XLA CPU's schedule keeps 131 MB of
    # temporaries at batch 256 whichever policy is set.)
    base = tiny().replace(scan_layers=True)
    base = base.replace(vision=dataclasses.replace(base.vision, depth=3), text=dataclasses.replace(base.text, depth=3))
    saved = {name: _step_temp_bytes(config) for name, config in (
        ("everything", base),
        ("dots", base.replace(remat=True, remat_policy="dots_with_no_batch_dims_saveable")),
        ("nothing", base.replace(remat=True, remat_policy="nothing_saveable")))}
    assert saved["everything"] > saved["dots"] > saved["nothing"], saved


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat_policy 'dots' is not one of"):
        tiny().replace(remat=True, remat_policy="dots")
