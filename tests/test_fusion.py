"""RECO's fusion transformer: shapes, identity start, masking, dropout only in training, axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.models.fusion import Fusion, FusionConfig, MeanFusion
from vlm_jax.train.sharding import path_to_name

EMBED_DIM, K, BATCH = 16, 5, 3


def make_fusion(**overrides):
    fields = dict(embed_dim=EMBED_DIM, width=32, heads=4, depth=2, zero_init_output=False)
    return Fusion(FusionConfig(**(fields | overrides)), rngs=nnx.Rngs(0))


def inputs(seed=0):
    query_key, retrieved_key = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(query_key, (BATCH, EMBED_DIM)), jax.random.normal(retrieved_key, (BATCH, K, EMBED_DIM)))


@pytest.mark.parametrize("width", [None, 32])
def test_output_is_one_embedding_per_query_with_or_without_input_projection(width):
    fusion = make_fusion(width=width)
    query, retrieved = inputs()
    refined = fusion(query, retrieved)
    assert refined.shape == (BATCH, EMBED_DIM) and refined.dtype == jnp.float32
    assert (fusion.in_proj is None) == (width is None)


def test_untrained_residual_fusion_returns_its_query_exactly():
    fusion = make_fusion(zero_init_output=True)
    query, retrieved = inputs()
    np.testing.assert_array_equal(np.asarray(fusion(query, retrieved)), np.asarray(query))


def test_invalid_retrieved_items_do_not_affect_the_output():
    fusion = make_fusion()
    query, retrieved = inputs()
    valid = jnp.array([[True, False, True, True, False], [True] * K, [False] * K])
    reference = fusion(query, retrieved, valid)
    changed = jnp.where(valid[..., None], retrieved, 1e3 * jax.random.normal(jax.random.key(7), retrieved.shape))
    changed = changed.at[0, 1].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(fusion(query, changed, valid)), np.asarray(reference))
    # And valid items do matter, so the check above is not vacuous.
    assert not np.allclose(fusion(query, retrieved.at[1, 0].add(1.0), valid)[1], reference[1])


def test_all_items_missing_equals_fusing_the_query_alone():
    fusion = make_fusion()
    query, retrieved = inputs()
    none_valid = fusion(query, retrieved, jnp.zeros((BATCH, K), bool))
    alone = fusion(query, retrieved[:, :0])
    np.testing.assert_allclose(np.asarray(none_valid), np.asarray(alone), atol=1e-6)


def test_dropped_items_are_masked_like_missing_ones():
    fusion = make_fusion(retrieved_dropout=0.5, dropout=0.0)
    query, retrieved = inputs()
    rng = jax.random.key(3)
    dropped_out = fusion(query, retrieved, rng=rng)
    # Reproduce the drop pattern the module draws from its rng.
    item_rng, _ = jax.random.split(rng)
    kept = jax.random.bernoulli(item_rng, 0.5, (BATCH, K))
    assert 0 < int(kept.sum()) < BATCH * K
    changed = jnp.where(kept[..., None], retrieved, -retrieved + 5.0)
    np.testing.assert_array_equal(np.asarray(fusion(query, changed, rng=rng)), np.asarray(dropped_out))


def test_dropout_runs_only_with_an_rng():
    fusion = make_fusion(retrieved_dropout=0.5, dropout=0.3)
    query, retrieved = inputs()
    evaluation = fusion(query, retrieved)
    np.testing.assert_array_equal(np.asarray(fusion(query, retrieved)), np.asarray(evaluation))
    np.testing.assert_array_equal(np.asarray(fusion(query, retrieved, rng=None)), np.asarray(evaluation))
    assert not np.allclose(fusion(query, retrieved, rng=jax.random.key(1)), evaluation)


def test_every_param_has_logical_axis_names():
    fusion = make_fusion()
    params = nnx.state(fusion, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    names = {path_to_name(path): variable.get_metadata().get("out_sharding") for path, variable in leaves}
    assert all(axes is not None and len(axes) == variable.get_value().ndim
               for (_, variable), axes in zip(leaves, names.values()))
    assert names["in_proj/kernel"] == ("proj", "embed")
    assert names["out_proj/kernel"] == ("embed", "proj")
    assert names["layers/0/self_attn/q_proj/kernel"] == ("embed", "heads", "kv")


def test_bfloat16_compute_stays_close_to_float32():
    query, retrieved = inputs()
    full = make_fusion()
    half = make_fusion(dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(half(query, retrieved)), np.asarray(full(query, retrieved)), atol=0.1)


def test_mean_fusion_is_the_normalized_mean_of_valid_items():
    query, retrieved = inputs()
    valid = jnp.array([[True, False, True, True, False], [True] * K, [False] * K])
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, r, v = np.asarray(query), np.asarray(retrieved), np.asarray(valid)
    expected = []
    for row in range(BATCH):
        items = np.concatenate([unit(q[row])[None], unit(r[row][v[row]])])
        expected.append(unit(items.mean(axis=0)))
    np.testing.assert_allclose(np.asarray(MeanFusion()(query, retrieved, valid)), np.stack(expected), atol=1e-6)


def test_config_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        FusionConfig(embed_dim=16, width=30, heads=4)


def _numpy_fusion(fusion, query, retrieved, valid):
    """The module docstring's equations in float64 numpy, every layer over every token."""
    from math import erf

    params = {"/".join(map(str, path)): np.asarray(value[...], np.float64)
              for path, value in nnx.to_flat_state(nnx.state(fusion, nnx.Param))}

    def norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return x * params[f"{name}/scale"] + params[f"{name}/bias"]

    def dense(x, name, contract=1):
        kernel = params[f"{name}/kernel"]
        return np.tensordot(x, kernel, axes=contract) + params[f"{name}/bias"]

    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0))))
    query, retrieved = np.asarray(query, np.float64), np.asarray(retrieved, np.float64)
    tokens = dense(np.concatenate([query[:, None], retrieved], 1), "in_proj")
    types = params["type_embedding"]
    tokens = tokens + np.concatenate([types[:1], np.repeat(types[1:], retrieved.shape[1], 0)])[None]
    key_mask = np.concatenate([np.ones((len(query), 1), bool), valid], 1)
    hidden = tokens
    for layer in range(fusion.config.depth):
        name = f"layers/{layer}"
        x = norm(hidden, f"{name}/layer_norm1")
        q, k, v = (dense(x, f"{name}/self_attn/{p}_proj") for p in "qkv")  # [B, T, heads, kv]
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, v)
        hidden = hidden + dense(attended, f"{name}/self_attn/out_proj", contract=2)
        x = norm(hidden, f"{name}/layer_norm2")
        hidden = hidden + dense(gelu(dense(x, f"{name}/mlp/fc1")), f"{name}/mlp/fc2")
    return query + dense(norm(hidden[:, 0], "final_norm"), "out_proj")


@pytest.mark.parametrize("depth", [1, 2])
def test_matches_a_numpy_encoder_over_every_token(depth):
    # The last layer computes the query row only; the reference computes every row and reads row 0.
    fusion = make_fusion(depth=depth, act="gelu")
    query, retrieved = inputs(3)
    valid = np.array([[True, False, True, True, False], [True] * K, [False] * K])
    np.testing.assert_allclose(np.asarray(fusion(query, retrieved, jnp.asarray(valid))),
                               _numpy_fusion(fusion, query, retrieved, valid), rtol=1e-5, atol=1e-5)
