"""Optimizer policies (decay, lr multipliers, freezing), schedules, clipping and accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlm_jax.train import optim


class TinyModel(nnx.Module):
    """Token embedding -> Linear -> LayerNorm -> Linear head, with a CLIP-style logit scale and bias."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.dense = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.3))
        self.logit_bias = nnx.Param(jnp.asarray(-1.0))

    def __call__(self, ids):
        hidden = self.norm(self.dense(self.embed(ids).mean(axis=1)))
        return self.head(hidden) * jnp.exp(self.logit_scale[...]) + self.logit_bias[...]


def _model():
    with nnx.use_eager_sharding(False):
        return TinyModel(rngs=nnx.Rngs(0))


def _loss(model, ids):
    return jnp.mean(model(ids) ** 2)


def _train(model, tx, steps=3):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(_loss)(model, ids)
        optimizer.update(model, grads)

    for _ in range(steps):
        step(model, optimizer)
    return optimizer


def test_default_decay_policy_decays_only_kernels():
    model = _model()
    _, table = optim.make_optimizer(optim.optim_config(), nnx.state(model, nnx.Param))
    decayed = sorted(name for name, entry in table.items() if entry["decay"])
    assert decayed == ["dense/kernel", "head/kernel"]
    assert set(table) == {
        "embed/embedding", "dense/kernel", "dense/bias", "norm/scale", "norm/bias",
        "head/kernel", "head/bias", "logit_scale", "logit_bias",
    }


def test_weight_decay_shrinks_exactly_the_decayed_params_when_gradients_vanish():
    model = _model()
    config = optim.optim_config()
    config.update(schedule="constant", learning_rate=0.5, weight_decay=0.1, grad_clip_norm=None)
    tx, _ = optim.make_optimizer(config, nnx.state(model, nnx.Param))
    params = nnx.state(model, nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"][...], params["dense"]["kernel"][...] * (1 - 0.5 * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(new["norm"]["scale"][...], params["norm"]["scale"][...])
    np.testing.assert_array_equal(new["logit_scale"][...], params["logit_scale"][...])
    np.testing.assert_array_equal(new["embed"]["embedding"][...], params["embed"]["embedding"][...])


def test_param_matching_no_rule_is_an_error():
    config = optim.optim_config()
    config.decay = ((r"kernel$", True),)
    with pytest.raises(ValueError, match=r"'dense/bias' matches no rule of optim.decay"):
        optim.make_optimizer(config, nnx.state(_model(), nnx.Param))


def test_frozen_params_stay_bitwise_unchanged_and_hold_no_optimizer_state():
    model = _model()
    frozen_before = {
        "embed": np.array(model.embed.embedding[...]),
        "norm": np.array(model.norm.scale[...]),
    }
    trained_before = np.array(model.dense.kernel[...])
    config = optim.optim_config()
    config.trainable = ((r"^embed/", False), (r"^norm/", False), (r".*", True))
    tx, table = optim.make_optimizer(config, nnx.state(model, nnx.Param))
    assert {name for name, entry in table.items() if entry["label"] == optim.FROZEN} == {
        "embed/embedding", "norm/scale", "norm/bias"}
    optimizer = _train(model, tx)
    np.testing.assert_array_equal(model.embed.embedding[...], frozen_before["embed"])
    np.testing.assert_array_equal(model.norm.scale[...], frozen_before["norm"])
    assert not np.array_equal(model.dense.kernel[...], trained_before)
    # Adam moments exist for trainable params only: frozen leaves are empty masked nodes.
    state_sizes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer.opt_state))[0]:
        name = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        state_sizes[name] = leaf.size
    assert not any("embed" in name or "norm" in name for name in state_sizes)
    moments = sum(size for name, size in state_sizes.items() if "/mu/" in name)
    trainable = sum(model_leaf.size for name, model_leaf in _named_params(model).items() if table[name]["label"] == optim.TRAINABLE)
    assert moments == trainable


def _named_params(model):
    from vlm_jax.train.sharding import path_to_name

    return {path_to_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def test_lr_multiplier_scales_the_whole_step_of_matching_params():
    model = _model()
    params = nnx.state(model, nnx.Param)
    grads = nnx.grad(_loss)(model, jnp.arange(12, dtype=jnp.int32).reshape(3, 4))

    def first_update(lr_mults):
        config = optim.optim_config()
        config.update(schedule="constant", weight_decay=0.0, grad_clip_norm=None, lr_mults=lr_mults)
        tx, _ = optim.make_optimizer(config, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    plain = first_update(((r".*", 1.0),))
    scaled = first_update(((r"^head/", 0.1), (r".*", 1.0)))
    np.testing.assert_allclose(scaled["head"]["kernel"][...], 0.1 * plain["head"]["kernel"][...], rtol=1e-6)
    np.testing.assert_allclose(scaled["head"]["bias"][...], 0.1 * plain["head"]["bias"][...], rtol=1e-6)
    np.testing.assert_array_equal(scaled["dense"]["kernel"][...], plain["dense"]["kernel"][...])


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # warmup 10 to peak 1.0, cosine to 0.1 over the remaining 90 steps.
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 100: 0.1, 150: 0.1}),
        # after warmup: 1 / sqrt(1 + (step - 10) / 20).
        ("rsqrt", {5: 0.5, 10: 1.0, 30: 1 / math.sqrt(2.0), 70: 0.5}),
        ("constant", {3: 0.3, 10: 1.0, 1000: 1.0}),
    ],
)
def test_schedule_values_match_hand_computed_ones(schedule, expected):
    config = optim.optim_config()
    config.update(
        schedule=schedule, learning_rate=1.0, warmup_steps=10, total_steps=100, end_lr_fraction=0.1, rsqrt_timescale=20
    )
    lr = optim.make_schedule(config)
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, atol=1e-7, err_msg=f"{schedule} at step {step}")


def test_gradients_are_clipped_to_the_global_norm_of_trainable_params_only():
    params = {"big": jnp.full((4,), 3.0), "small": jnp.full((4,), 4.0), "frozen": jnp.full((4,), 100.0)}
    config = optim.optim_config()
    # eps = 1 makes Adam's first step g / (|g| + 1), so it shows the size of the clipped gradient.
    config.update(name="adamw", schedule="constant", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=1.0,
                  eps=1.0, trainable=((r"frozen", False), (r".*", True)), decay=((r".*", False),))
    tx, _ = optim.make_optimizer(config, params)
    grads = {"big": jnp.full((4,), 3.0), "small": jnp.full((4,), 4.0), "frozen": jnp.full((4,), 1000.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = math.sqrt(4 * 3.0**2 + 4 * 4.0**2)  # 10: the frozen gradient does not count
    for name, value in (("big", 3.0), ("small", 4.0)):
        clipped = value / norm
        np.testing.assert_allclose(updates[name], -clipped / (clipped + 1.0), rtol=1e-5)
    np.testing.assert_array_equal(updates["frozen"], 0.0)


def test_adafactor_step_is_normalized_by_the_gradient_rms():
    params = {"w": jnp.ones((2, 3))}
    config = optim.optim_config()
    config.update(name="adafactor", schedule="constant", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=None,
                  decay=((r".*", False),))
    tx, _ = optim.make_optimizer(config, params)
    updates, state = tx.update({"w": jnp.full((2, 3), 50.0)}, tx.init(params), params)
    # A uniform gradient divided by its RMS is a step of exactly -lr everywhere.
    np.testing.assert_allclose(updates["w"], -1.0, rtol=1e-4)
    assert jax.tree.leaves(state)


def test_accumulated_gradients_equal_the_full_batch_gradient_for_mean_losses():
    graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(8, 4)), jnp.int32)

    def loss_fn(params, batch):
        loss = _loss(nnx.merge(graphdef, params, rest), batch["ids"])
        return loss, {"loss": loss}

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    (full_loss, _), full_grads = value_and_grad(params, {"ids": ids})
    (loss, aux), grads = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))(value_and_grad, params, {"ids": ids}, 4)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], full_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_microbatches_interleave_rows_so_devices_keep_their_share():
    batch = {"x": jnp.arange(8)}
    split = optim.split_microbatches(batch, 2)
    np.testing.assert_array_equal(split["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="multiple of optim.accumulation_steps"):
        optim.split_microbatches({"x": jnp.arange(6)}, 4)


def test_default_decay_policy_on_clip_skips_norms_biases_embeddings_and_logit_params():
    from vlm_jax.models.clip import CLIP, tiny

    abstract = nnx.eval_shape(lambda: CLIP(tiny("siglip"), rngs=nnx.Rngs(0)))
    _, table = optim.make_optimizer(optim.optim_config(), nnx.state(abstract, nnx.Param))
    decayed = {name for name, entry in table.items() if entry["decay"]}
    assert decayed and all(name.endswith("/kernel") for name in decayed)
    for name in ("logit_scale", "logit_bias", "vision_model/head/probe",
                 "vision_model/embeddings/position_embedding/embedding", "vision_model/post_layernorm/scale"):
        assert name in table and name not in decayed, name
