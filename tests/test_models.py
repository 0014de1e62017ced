"""CLIP / SigLIP model behaviour: shapes, dtypes, partitioning metadata, remat, configs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.models import CLIP, CLIPConfig, siglip_b16, tiny, vit_b16, vit_b32, vit_l14

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
def test_remat_keeps_outputs_and_gradients():
    config = tiny()
    plain = CLIP(config, rngs=nnx.Rngs(0))
    remat = CLIP(config.replace(remat=True), rngs=nnx.Rngs(0))
    pixels, ids = _inputs(config)
    grad_fn = nnx.jit(nnx.value_and_grad(_loss))
    plain_loss, plain_grads = grad_fn(plain, pixels, ids)
    remat_loss, remat_grads = grad_fn(remat, pixels, ids)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
    for (path, want), (_, got) in zip(nnx.to_flat_state(plain_grads), nnx.to_flat_state(remat_grads)):
        np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), atol=1e-5, err_msg=str(path))


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
    assert CLIPConfig.from_hf_config(config.to_hf_config()) == config


def test_presets_build_abstractly_with_expected_sizes():
    counts = {}
    for preset in (vit_b32, vit_b16):
        model = nnx.eval_shape(lambda: CLIP(preset(), rngs=nnx.Rngs(0)))
        leaves = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in leaves)
        counts[preset.__name__] = sum(int(np.prod(v.shape)) for v in leaves)
    # Parameter counts of openai/clip-vit-base-patch32 and -patch16 in transformers.
    assert counts == {"vit_b32": 151_277_313, "vit_b16": 149_620_737}
