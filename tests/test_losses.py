"""Contrastive losses: dense forms against hand-written numpy, sharded forms against dense ones."""

import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.methods import clip


def _run_in_8_device_process(check_name: str) -> None:
    """Runs `check_name()` of this module in a fresh interpreter that sees 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_losses as m; m.{check_name}()"
    result = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _pairs(batch: int = 16, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, dim)).astype(np.float32)
    texts = (images + 0.9 * rng.normal(size=(batch, dim))).astype(np.float32)
    return images, texts


def _unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_softmax_loss_matches_hand_written_symmetric_infonce():
    images, texts = _pairs()
    smoothing, scale = 0.1, 12.0
    logits = scale * _unit(images).astype(np.float64) @ _unit(texts).T
    batch = len(logits)

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_probs = row - np.log(np.sum(np.exp(row)))
            target = np.full(batch, smoothing / batch)
            target[i] += 1 - smoothing
            total -= np.sum(target * log_probs)
        return total / batch

    expected = 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))
    loss, metrics = clip.softmax_contrastive_loss(images, texts, math.log(scale), label_smoothing=smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["i2t_accuracy"], np.mean(logits.argmax(1) == np.arange(batch)))
    np.testing.assert_allclose(metrics["t2i_accuracy"], np.mean(logits.argmax(0) == np.arange(batch)))


def test_softmax_loss_with_hard_negatives_matches_hand_written_negclip_terms():
    images, texts = _pairs()
    negatives = np.random.default_rng(5).normal(size=texts.shape).astype(np.float32)
    mask = np.arange(len(texts)) % 3 != 0  # every third example has no negative
    scale = 9.0
    unit_images = _unit(images).astype(np.float64)
    logits = scale * unit_images @ _unit(texts).T
    negative_logits = scale * unit_images @ _unit(negatives)[mask].T  # masked ones are not candidates
    image_to_text = np.concatenate([logits, negative_logits], axis=1)

    def cross_entropy(rows):
        return -np.mean([row[i] - np.log(np.sum(np.exp(row))) for i, row in enumerate(rows)])

    expected = 0.5 * (cross_entropy(image_to_text) + cross_entropy(logits.T))
    loss, metrics = clip.softmax_contrastive_loss(images, texts, math.log(scale), negatives=negatives,
                                                  negative_mask=mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["i2t_accuracy"], np.mean(image_to_text.argmax(1) == np.arange(len(texts))))
    plain, _ = clip.softmax_contrastive_loss(images, texts, math.log(scale))
    assert float(loss) > float(plain)  # more candidates: a harder image -> text problem
    all_masked, _ = clip.softmax_contrastive_loss(images, texts, math.log(scale), negatives=negatives,
                                                  negative_mask=np.zeros(len(texts), bool))
    np.testing.assert_allclose(all_masked, plain, rtol=1e-6)


def test_sigmoid_loss_matches_hand_written_pairwise_terms():
    images, texts = _pairs()
    scale, bias = 10.0, -4.0
    logits = scale * _unit(images).astype(np.float64) @ _unit(texts).T + bias
    expected = 0.0
    for i in range(len(logits)):
        for j in range(len(logits)):
            sign = 1.0 if i == j else -1.0
            expected -= np.log(1.0 / (1.0 + np.exp(-sign * logits[i, j])))
    expected /= len(logits)
    loss, _ = clip.sigmoid_loss(images, texts, math.log(scale), bias)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_losses_normalize_their_inputs():
    images, texts = _pairs()
    for loss_fn, extra in ((clip.softmax_contrastive_loss, ()), (clip.sigmoid_loss, (-10.0,))):
        raw, _ = loss_fn(images, texts, 2.0, *extra)
        scaled, _ = loss_fn(3.0 * images, 0.5 * texts, 2.0, *extra)
        np.testing.assert_allclose(raw, scaled, rtol=1e-6)


def test_logit_scale_is_clamped_at_100_and_stops_learning_there():
    images, texts = _pairs()
    grad_fn = jax.grad(lambda s: clip.softmax_contrastive_loss(images, texts, s)[0])
    _, metrics = clip.softmax_contrastive_loss(images, texts, jnp.log(1000.0))
    np.testing.assert_allclose(metrics["scale"], 100.0, rtol=1e-6)
    assert float(grad_fn(jnp.log(1000.0))) == 0.0
    assert float(grad_fn(jnp.log(10.0))) != 0.0


def _sharded_equals_dense(mesh_axes, batch_axes):
    from vlm_jax.train import sharding

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(mesh_axes)
    images, texts = _pairs(batch=32, dim=16, seed=1)
    placed = jax.device_put((images, texts), sharding.batch_sharding(mesh, 2, batch_axes))
    cases = [
        (clip.softmax_contrastive_loss, (jnp.log(7.0),), dict(label_smoothing=0.1)),
        (clip.sigmoid_loss, (jnp.log(10.0), jnp.asarray(-3.0)), {}),
    ]
    for loss_fn, scalars, options in cases:
        argnums = tuple(range(2 + len(scalars)))

        def dense(*args):
            return loss_fn(*args, **options)

        def sharded(*args):
            return loss_fn(*args, mesh=mesh, axis=batch_axes, **options)

        (dense_loss, dense_metrics), dense_grads = jax.jit(jax.value_and_grad(dense, argnums, has_aux=True))(
            images, texts, *scalars)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(sharded, argnums, has_aux=True))(*placed, *scalars)
        np.testing.assert_allclose(loss, dense_loss, rtol=1e-5, err_msg=loss_fn.__name__)
        for name in dense_metrics:
            np.testing.assert_allclose(metrics[name], dense_metrics[name], rtol=1e-6, err_msg=name)
        for got, want in zip(grads, dense_grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=loss_fn.__name__)
        # Image gradients come back split like the images: each device holds only its rows.
        assert grads[0].sharding.is_equivalent_to(placed[0].sharding, 2)
    # Hard negatives (NegCLIP): gathered like the texts, values and gradients equal the dense form's.
    negatives = (texts[::-1] + 0.5).astype(np.float32)
    mask = np.arange(len(texts)) % 3 != 0
    placed_negatives = jax.device_put(negatives, sharding.batch_sharding(mesh, 2, batch_axes))
    placed_mask = jax.device_put(mask, sharding.batch_sharding(mesh, 1, batch_axes))

    def with_negatives(i, t, n, m, **kw):
        return clip.softmax_contrastive_loss(i, t, jnp.log(7.0), negatives=n, negative_mask=m, **kw)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (dense_loss, _), dense_grads = jax.jit(grad(with_negatives))(images, texts, negatives, mask)
    (loss, _), grads = jax.jit(grad(functools.partial(with_negatives, mesh=mesh, axis=batch_axes)))(
        *placed, placed_negatives, placed_mask)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
    for got, want in zip(grads, dense_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _check_sharded_losses_equal_dense_over_data_and_fsdp():
    _sharded_equals_dense((("data", 4), ("fsdp", 2), ("tensor", 1)), ("data", "fsdp"))


def _check_sharded_losses_equal_dense_with_tensor_replicas():
    _sharded_equals_dense((("data", 4), ("fsdp", 1), ("tensor", 2)), ("data", "fsdp"))


def test_sharded_losses_equal_dense_values_and_gradients_on_8_devices():
    _run_in_8_device_process("_check_sharded_losses_equal_dense_over_data_and_fsdp")


def test_sharded_losses_equal_dense_when_a_tensor_axis_replicates_the_batch():
    _run_in_8_device_process("_check_sharded_losses_equal_dense_with_tensor_replicas")


def _largest_float_buffer(hlo_text: str) -> int:
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"f32\[([\d,]*)\]", hlo_text)]
    return max(sizes)


def _check_no_device_materializes_the_global_logits():
    from vlm_jax.train import sharding

    mesh = sharding.make_mesh((("data", 8), ("fsdp", 1), ("tensor", 1)))
    batch, dim, local = 64, 4, 8
    images, texts = _pairs(batch=batch, dim=dim)
    placed = jax.device_put((images, texts), sharding.batch_sharding(mesh, 2))

    def compiled_text(loss_fn, *scalars):
        grad_fn = jax.grad(lambda i, t: loss_fn(i, t, *scalars, mesh=mesh)[0], argnums=(0, 1))
        return jax.jit(grad_fn).lower(*placed).compile().as_text()

    # Per device, softmax holds [B_local, B] logits; sigmoid only [B_local, B_local] blocks plus the
    # text chunks its ring passes, [B, D] over all steps, which is smaller than [B_local, B] when D < B_local.
    assert dim < local
    assert _largest_float_buffer(compiled_text(clip.softmax_contrastive_loss, 2.0)) <= local * batch
    assert _largest_float_buffer(compiled_text(clip.sigmoid_loss, 2.0, -10.0)) <= max(local * local, batch * dim)


def test_no_device_materializes_the_global_logits_on_8_devices():
    _run_in_8_device_process("_check_no_device_materializes_the_global_logits")


def test_sharded_loss_rejects_a_batch_that_does_not_split_over_the_mesh():
    mesh = jax.sharding.AbstractMesh((3,), ("data",))
    images, texts = _pairs(batch=16)
    with pytest.raises(ValueError, match="multiple of 3"):
        clip.softmax_contrastive_loss(images, texts, 2.0, mesh=mesh, axis="data")
