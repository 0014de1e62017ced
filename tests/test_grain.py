"""GRAIN: the region decoder, its losses against numpy references, 8-device parity, data and export."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vlm_jax.methods import grain_clip
from vlm_jax.models import clip as clip_models
from vlm_jax.models.regions import GrainCLIP, RegionDecoderConfig

TINY = clip_models.tiny()


def _decoder_config(**overrides):
    return RegionDecoderConfig(token_width=TINY.vision.width, embed_dim=TINY.embed_dim, width=32, depth=2, heads=4,
                               mlp_dim=64, num_regions=4, **overrides)


def _model(seed=0, **overrides):
    rngs = nnx.Rngs(seed)
    return GrainCLIP(clip_models.CLIP(TINY, rngs=rngs), _decoder_config(**overrides), rngs=rngs)


def _batch(batch=8, regions=3, seed=0):
    rng = np.random.default_rng(seed)
    size, length = TINY.vision.image_size, TINY.text.context_length
    centres = rng.uniform(0.3, 0.7, (batch, regions, 2))
    sizes = rng.uniform(0.1, 0.4, (batch, regions, 2))
    mask = rng.random((batch, regions)) < 0.7
    mask[0] = False  # an image without boxes
    ids = rng.integers(1, TINY.text.vocab_size - 1, (batch, regions, length)).astype(np.int32)
    ids[1, 1] = ids[2, 0]  # the same description twice in one batch
    return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "text_ids": rng.integers(1, TINY.text.vocab_size - 1, (batch, length)).astype(np.int32),
            "boxes": np.concatenate([centres, sizes], -1).astype(np.float32), "box_mask": mask,
            "region_ids": ids}


def test_decoder_outputs_have_the_documented_shapes_and_ranges():
    model = _model()
    outputs = model.decode(jnp.asarray(_batch()["image"]))
    assert outputs.boxes.shape == (8, 4, 4) and outputs.regions.shape == (8, 4, TINY.embed_dim)
    assert outputs.image.shape == (8, TINY.embed_dim)
    assert float(outputs.boxes.min()) > 0.0 and float(outputs.boxes.max()) < 1.0
    layers = model.regions(model.clip.vision_model.tokens(jnp.asarray(_batch()["image"])), all_layers=True)
    assert len(layers) == 2
    np.testing.assert_allclose(layers[-1].boxes, outputs.boxes, rtol=1e-6)


def test_global_residual_starts_at_the_clips_own_image_embedding():
    model = _model(global_residual=True)
    images = jnp.asarray(_batch()["image"])
    # The same embedding up to float rounding: the CLIP's own path computes its last block for the
    # class token alone, GRAIN's for every token (the decoder reads them all).
    np.testing.assert_allclose(model.encode_image(images), model.clip.encode_image(images), rtol=1e-5, atol=1e-6)
    literal = _model(global_residual=False)
    assert not np.allclose(literal.encode_image(images), literal.clip.encode_image(images))


def test_decoder_refuses_a_clip_of_another_width():
    with pytest.raises(ValueError, match="vision width"):
        GrainCLIP(clip_models.CLIP(TINY, rngs=nnx.Rngs(0)), dataclasses.replace(_decoder_config(), token_width=99),
                  rngs=nnx.Rngs(0))


def _unit(rows):
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_region_description_loss_matches_a_numpy_reference_with_duplicates_and_padding():
    rng = np.random.default_rng(1)
    batch, count, dim, group, scale = 8, 3, 6, 4, 5.0
    regions = rng.normal(size=(batch, count, dim)).astype(np.float32)
    descriptions = rng.normal(size=(batch, count, dim)).astype(np.float32)
    mask = rng.random((batch, count)) < 0.75
    ids = rng.integers(0, 50, (batch, count, 4)).astype(np.int32)
    ids[1, 0], mask[1, 0], mask[2, 2] = ids[2, 2], True, True  # a duplicate text inside the first group
    loss, accuracy = grain_clip.region_description_loss(jnp.asarray(regions), jnp.asarray(descriptions),
                                                        jnp.asarray(ids), jnp.asarray(mask), np.log(scale), group)
    losses, correct = [], []
    for start in range(0, batch, group):
        r = _unit(regions[start:start + group].reshape(-1, dim)).astype(np.float64)
        d = _unit(descriptions[start:start + group].reshape(-1, dim)).astype(np.float64)
        m = mask[start:start + group].reshape(-1)
        t = ids[start:start + group].reshape(-1, 4)
        for i in np.flatnonzero(m):
            columns = [j for j in np.flatnonzero(m) if j == i or not np.array_equal(t[i], t[j])]
            logits = scale * d[columns] @ r[i]
            own = columns.index(i)
            losses.append(np.log(np.sum(np.exp(logits))) - logits[own])
            correct.append(np.argmax(logits) == own)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(accuracy, np.mean(correct), rtol=1e-6)
    # The duplicate is not a negative: telling the two texts apart changes the loss.
    distinct = ids.copy()
    distinct[1, 0, 0] += 1
    apart, _ = grain_clip.region_description_loss(jnp.asarray(regions), jnp.asarray(descriptions),
                                                  jnp.asarray(distinct), jnp.asarray(mask), np.log(scale), group)
    assert abs(float(apart) - float(loss)) > 1e-4


def test_box_losses_match_numpy_on_matched_pairs():
    rng = np.random.default_rng(2)
    pred = np.concatenate([rng.uniform(0.3, 0.7, (4, 3, 2)), rng.uniform(0.1, 0.3, (4, 3, 2))], -1)
    gt = np.concatenate([rng.uniform(0.3, 0.7, (4, 3, 2)), rng.uniform(0.1, 0.3, (4, 3, 2))], -1)
    mask = rng.random((4, 3)) < 0.6
    l1, giou_loss, iou = grain_clip.box_losses(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask))

    def xyxy(b):
        return np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])

    l1s, gious, ious = [], [], []
    for b, q in zip(*np.nonzero(mask)):
        p, g = xyxy(pred[b, q]), xyxy(gt[b, q])
        inter = max(0, min(p[2], g[2]) - max(p[0], g[0])) * max(0, min(p[3], g[3]) - max(p[1], g[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
        ious.append(inter / union)
        gious.append(1 - (inter / union - (hull - union) / hull))
        l1s.append(np.abs(pred[b, q] - gt[b, q]).sum())
    np.testing.assert_allclose([l1, giou_loss, iou], [np.mean(l1s), np.mean(gious), np.mean(ious)], rtol=1e-5)


def _method(group=4, mesh=None):
    method = grain_clip.GrainMethod()
    config = ml_collections.ConfigDict({"grain": grain_clip.grain_config(), "global_batch_size": 8, "loss": "softmax",
                                        "sharding": {"batch_axes": ("data", "fsdp")}, "label_smoothing": 0.0})
    config.grain.region_group = group
    method.constants(config, mesh)
    return method


def test_loss_is_finite_with_an_image_without_boxes_and_every_term_gets_gradient():
    model, batch = _model(), _batch()
    method = _method()

    def loss(m):
        return method.loss_fn(m, jax.tree.map(jnp.asarray, batch), None, None)

    (value, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    assert np.isfinite(float(value))
    for name in ("caption_loss", "box_l1", "box_giou_loss", "region_loss", "region_accuracy", "box_iou"):
        assert np.isfinite(float(metrics[name])), name
    flat = {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(grads)}
    for prefix in ("regions/box_mlp", "regions/region_proj", "regions/image_proj", "clip/text_model"):
        norms = [float(jnp.linalg.norm(leaf[...])) for name, leaf in flat.items() if name.startswith(prefix)]
        assert norms and all(np.isfinite(norms)) and max(norms) > 0, prefix
    expected = (metrics["caption_loss"] + 1.5 * metrics["box_l1"] + 1.5 * metrics["box_giou_loss"]
                + metrics["region_loss"])
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_the_default_group_is_the_per_device_batch():
    assert _method(group=0)._group == 8


def _check_sharded_decoder_and_loss_equal_one_device():
    from vlm_jax.train import sharding

    assert jax.device_count() == 8
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    model, batch = _model(), _batch(batch=16)
    dense_method, sharded_method = _method(group=2), _method(group=2, mesh=mesh)
    graphdef, state = nnx.split(model)

    def loss(method, state, batch):
        value, metrics = method.loss_fn(nnx.merge(graphdef, state), batch, None, None)
        return value, metrics

    dense = jax.jit(jax.value_and_grad(lambda s, b: loss(dense_method, s, b), has_aux=True))
    sharded = jax.jit(jax.value_and_grad(lambda s, b: loss(sharded_method, s, b), has_aux=True))
    batch = jax.tree.map(jnp.asarray, batch)
    placed = {name: jax.device_put(value, sharding.batch_sharding(mesh, value.ndim)) for name, value in batch.items()}
    (dense_value, dense_metrics), dense_grads = dense(state, batch)
    (value, metrics), grads = sharded(state, placed)
    np.testing.assert_allclose(value, dense_value, rtol=1e-5)
    for name in dense_metrics:
        np.testing.assert_allclose(metrics[name], dense_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    decode = jax.jit(lambda s, images: nnx.merge(graphdef, s).decode(images))
    np.testing.assert_allclose(decode(state, placed["image"]).boxes, decode(state, batch["image"]).boxes, atol=1e-5)


def test_decoder_and_losses_on_8_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_grain as m; "
               "m._check_sharded_decoder_and_loss_equal_one_device()")
    result = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
