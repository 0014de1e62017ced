"""RECO: uni-modal search / cross-modal fusion, the three-term loss, frozen CLIP, memory paths, premise."""

import dataclasses
import functools
import math
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vlm_jax.evaluate import ZeroShotEvaluator
from vlm_jax.methods import reco
from vlm_jax.models.clip import CLIP, tiny
from vlm_jax.train import optim

EMBED_DIM = 32  # tiny()'s embed_dim
FREEZE_CLIP = dict(learning_rate=1e-2, schedule="constant", weight_decay=0.0, grad_clip_norm=None,
                   trainable=((r"^clip/", False), (r".*", True)))


def _unit(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def tiny_clip_config():
    """tiny() cut to one layer per tower: these tests exercise RECO, not the towers."""
    config = tiny()
    return config.replace(vision=dataclasses.replace(config.vision, depth=1),
                          text=dataclasses.replace(config.text, depth=1))


@functools.lru_cache(maxsize=1)
def _shared_clip() -> CLIP:
    return CLIP(tiny_clip_config(), rngs=nnx.Rngs(0))


def make_model(**reco_fields) -> reco.RECO:
    section = dict(k=3, fusion_config=dict(heads=4, width=32, zero_init_output=False, retrieved_dropout=0.0))
    section.update(reco_fields)
    config = reco.RecoConfig.from_config(section, embed_dim=EMBED_DIM)
    # Building a CLIP eagerly takes seconds on a shared CPU: every test gets a copy of one.
    return reco.RECO(nnx.clone(_shared_clip()), config, rngs=nnx.Rngs(1))


def random_memory(rows=24, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(rows, EMBED_DIM))), _unit(rng.normal(size=(rows, EMBED_DIM)))


@nnx.jit(static_argnames="method")
def call(model, inputs, method):
    """model.<method>(inputs) under jit (eager CLIP towers are slow on CPU)."""
    return getattr(model, method)(inputs)


def clip_embeddings(model, batch):
    """Normalized frozen-CLIP embeddings v, t (float64 numpy) of a tiny batch."""
    return (_unit(np.asarray(call(model.clip, batch["image"], "encode_image"))),
            _unit(np.asarray(call(model.clip, batch["text_ids"], "encode_text"))))


def tiny_batch(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
            "text_ids": jnp.asarray(rng.integers(1, 998, size=(batch, 16)), jnp.int32)}


# --------------------------------------------------------------------------------------------------
# Search


def crossed_memory():
    """Memory where an image query's nearest memory *image* is pair 0 but its nearest memory *text*
    is pair 1 (and the text query's nearest text is pair 2, its nearest image pair 3)."""
    e = np.eye(EMBED_DIM)
    images = np.stack([e[0], e[5], e[6], e[1]]).astype(np.float32)
    texts = np.stack([e[7], e[0], e[1], e[8]]).astype(np.float32)
    image_query, text_query = e[0][None], e[1][None]
    return images, texts, image_query, text_query


@pytest.mark.parametrize("search, image_pick, text_pick", [("unimodal", 0, 2), ("crossmodal", 1, 3)])
def test_search_picks_the_expected_pair_and_returns_the_other_modality(search, image_pick, text_pick):
    images, texts, image_query, text_query = crossed_memory()
    memory = reco.place_memory(images, texts)
    ids, values = reco.search_device_memory(jnp.asarray(image_query), memory, modality="image", search=search, k=1)
    assert int(ids[0, 0]) == image_pick
    np.testing.assert_allclose(values[0, 0], texts[image_pick])  # an image always receives texts
    ids, values = reco.search_device_memory(jnp.asarray(text_query), memory, modality="text", search=search, k=1)
    assert int(ids[0, 0]) == text_pick
    np.testing.assert_allclose(values[0, 0], images[text_pick])  # a text always receives images


def test_search_excludes_given_rows_and_near_duplicates_and_marks_missing_slots():
    images, texts = random_memory(rows=6)
    query = jnp.asarray(images[2:3])
    memory = reco.place_memory(images, texts)
    ids, _ = reco.search_device_memory(query, memory, modality="image", search="unimodal", k=6)
    assert int(ids[0, 0]) == 2
    ids, values = reco.search_device_memory(query, memory, modality="image", search="unimodal", k=6,
                                            exclude_rows=jnp.array([2]))
    assert 2 not in ids[0, :5].tolist() and int(ids[0, 5]) == -1 and not np.any(values[0, 5])
    ids, _ = reco.search_device_memory(query, memory, modality="image", search="unimodal", k=6, dedup_threshold=0.99)
    assert 2 not in ids[0].tolist()
    expected = np.argsort(-(images @ images[2]))[1:]
    assert ids[0, :5].tolist() == expected.tolist()


def _sharded_search_check():
    from vlm_jax.train.sharding import make_mesh

    images, texts = random_memory(rows=37, seed=3)
    queries = jnp.asarray(random_memory(rows=5, seed=4)[0], jnp.float32)
    exclude = jnp.array([[3, 10], [-1, -1], [36, 0], [-1, 5], [1, 2]])
    dense = reco.search_device_memory(queries, reco.place_memory(images, texts), modality="text",
                                      search="unimodal", k=7, exclude_rows=exclude)
    for mesh in (make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1))), jax.make_mesh((8,), ("memory",))):
        memory = reco.place_memory(images, texts, mesh=mesh)
        sharded = jax.jit(lambda q: reco.search_device_memory(
            q, memory, modality="text", search="unimodal", k=7, exclude_rows=exclude))(queries)
        np.testing.assert_array_equal(np.asarray(sharded[0]), np.asarray(dense[0]))
        np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(dense[1]))


def test_search_over_memory_sharded_on_8_devices_equals_dense_search():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
               "import test_reco as m; m._sharded_search_check()")
    result = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_scann_host_search_inside_jit_matches_device_search():
    pytest.importorskip("scann")
    images, texts = random_memory(rows=40, seed=5)
    queries = jnp.asarray(random_memory(rows=4, seed=6)[1], jnp.float32)
    exclude = jnp.array([[1], [-1], [7], [-1]], jnp.int32)
    host = reco.HostMemory(images, texts, {"backend": "scann"})
    host_ids, host_values = jax.jit(lambda q: host(q, exclude, modality="text", k=5, dedup_threshold=None))(queries)
    device_ids, device_values = reco.search_device_memory(
        queries, reco.place_memory(images, texts), modality="text", search="unimodal", k=5, exclude_rows=exclude)
    np.testing.assert_array_equal(np.asarray(host_ids), np.asarray(device_ids))
    np.testing.assert_allclose(np.asarray(host_values), np.asarray(device_values), atol=1e-6)
    # Text queries search memory texts: only that index was built; the image one waits for its first use.
    assert sorted(host.indexes) == ["text"]
    assert sorted(host.build().indexes) == ["image", "text"]


def test_memory_rows_are_normalized_without_copying_unit_float32_rows():
    images, _ = random_memory(rows=10, seed=2)
    unit = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float32)
    assert reco._normalized(unit) is unit
    scaled = 3.0 * unit
    normalized = reco._normalized(scaled)
    np.testing.assert_allclose(normalized, unit, rtol=1e-6)
    np.testing.assert_allclose(scaled, 3.0 * unit)  # the input is left as it was
    assert reco._normalized(unit.astype(np.float16)).dtype == np.float32


# --------------------------------------------------------------------------------------------------
# The model


def test_encode_image_equals_fusion_of_query_and_paired_texts_of_its_nearest_memory_images():
    model = make_model()
    images, texts = random_memory()
    model.attach_memory(reco.place_memory(images, texts))
    batch = tiny_batch()
    refined = call(model, batch["image"], "encode_image")

    query, text_query = clip_embeddings(model, batch)
    top = np.argsort(-(query @ images.T), axis=1)[:, :3]
    by_hand = model.image_fusion(jnp.asarray(query, jnp.float32), jnp.asarray(texts[top], jnp.float32))
    np.testing.assert_allclose(np.asarray(refined), np.asarray(by_hand), atol=1e-5)

    top = np.argsort(-(text_query @ texts.T), axis=1)[:, :3]
    by_hand = model.text_fusion(jnp.asarray(text_query, jnp.float32), jnp.asarray(images[top], jnp.float32))
    np.testing.assert_allclose(np.asarray(call(model, batch["text_ids"], "encode_text")), np.asarray(by_hand),
                               atol=1e-5)


def test_mean_ablation_encodes_the_normalized_mean_of_query_and_retrieved_texts():
    model = make_model(fusion="mean")
    images, texts = random_memory()
    model.attach_memory(reco.place_memory(images, texts))
    batch = tiny_batch()
    query, _ = clip_embeddings(model, batch)
    top = np.argsort(-(query @ images.T), axis=1)[:, :3]
    expected = _unit(np.concatenate([query[:, None], texts[top]], axis=1).mean(axis=1))
    np.testing.assert_allclose(np.asarray(call(model, batch["image"], "encode_image")), expected, atol=1e-5)
    assert not jax.tree.leaves(nnx.state(model.image_fusion, nnx.Param))


def test_none_ablation_is_the_plain_clip_and_needs_no_memory():
    model = make_model(fusion="none")
    batch = tiny_batch()
    np.testing.assert_allclose(np.asarray(call(model, batch["image"], "encode_image")),
                               clip_embeddings(model, batch)[0], atol=1e-6)


def test_model_without_memory_says_how_to_attach_one():
    with pytest.raises(ValueError, match="attach_memory"):
        call(make_model(), tiny_batch()["image"], "encode_image")


def test_memory_is_state_but_not_a_param():
    model = make_model()
    params_before = jax.tree.leaves(nnx.state(model, nnx.Param))
    model.attach_memory(reco.place_memory(*random_memory()))
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == len(params_before)
    memory_rows = jax.tree.leaves(nnx.state(model, reco.MemoryRows))
    assert [leaf.shape for leaf in memory_rows] == [(24, EMBED_DIM)] * 2


def test_temperature_starts_from_the_clip_or_the_config():
    assert float(make_model().logit_scale[...]) == pytest.approx(float(make_model().clip.logit_scale[...]))
    assert float(make_model(logit_scale_init=math.log(20.0)).logit_scale[...]) == pytest.approx(math.log(20.0))


def test_zero_shot_evaluator_runs_unchanged_on_the_reco_model():
    model = make_model()
    model.attach_memory(reco.place_memory(*random_memory()))
    rng = np.random.default_rng(0)
    data = lambda: [{"image": rng.normal(size=(5, 32, 32, 3)).astype(np.float32),  # noqa: E731
                     "label": np.arange(5, dtype=np.int32) % 3}]
    tokenizer = lambda texts: np.asarray([[1 + len(t) % 900] * 16 for t in texts], np.int32)  # noqa: E731
    metrics = ZeroShotEvaluator(data, tokenizer, ["a", "bb", "ccc"], ["{}", "a {}"], batch_size=4).run(model)
    assert set(metrics) >= {"top1", "top5"} and 0.0 <= metrics["top1"] <= 1.0


# --------------------------------------------------------------------------------------------------
# The loss


def _nce(images, texts, scale):
    logits = scale * _unit(images) @ _unit(texts).T
    targets = np.arange(len(logits))

    def cross_entropy(rows):
        log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -log_probs[targets, targets].mean()

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def test_loss_is_the_sum_of_three_hand_written_infonce_terms():
    model = make_model(logit_scale_init=math.log(10.0))
    images, texts = random_memory()
    memory = reco.place_memory(images, texts)
    batch = tiny_batch(batch=6)
    loss, metrics = nnx.jit(reco.loss_fn)(model, batch, reco.RecoConstants(memory), None)

    v, t = clip_embeddings(model, batch)
    v_bar = np.asarray(model.image_fusion(jnp.asarray(v, jnp.float32), jnp.asarray(
        texts[np.argsort(-(v @ images.T), axis=1)[:, :3]], jnp.float32)))
    t_bar = np.asarray(model.text_fusion(jnp.asarray(t, jnp.float32), jnp.asarray(
        images[np.argsort(-(t @ texts.T), axis=1)[:, :3]], jnp.float32)))
    expected = _nce(v_bar, t_bar, 10.0) + _nce(v_bar, t, 10.0) + _nce(v, t_bar, 10.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_refined_text"]), _nce(v, t_bar, 10.0), rtol=1e-5)


def test_precomputed_neighbours_in_the_batch_give_the_on_the_fly_loss():
    model = make_model()
    images, texts = random_memory()
    batch = tiny_batch(batch=6)
    v, t = clip_embeddings(model, batch)
    own_rows = np.array([0, -1, 5, -1, -1, 9])
    neighbours = reco.precompute_neighbours(v, t, images, texts, k=3, exclude_rows=own_rows)
    precomputed = reco.AddRetrieved(neighbours, images, texts)({**batch, "index": np.arange(6)})
    on_the_fly, _ = nnx.jit(reco.loss_fn)(model, {**batch, "memory_row": jnp.asarray(own_rows)},
                                 reco.RecoConstants(reco.place_memory(images, texts)), None)
    from_batch, _ = nnx.jit(reco.loss_fn)(model, precomputed, reco.RecoConstants(None), None)
    np.testing.assert_allclose(float(from_batch), float(on_the_fly), rtol=1e-5)
    assert not np.any(neighbours["image"][0] == 0) and not np.any(neighbours["text"][5] == 5)


def test_memory_rows_of_matches_example_ids_to_memory_rows():
    rows = reco.memory_rows_of(np.array(["b", "x", "a"], object), [b"a", b"b", b"c"])
    assert rows.tolist() == [1, -1, 0]
    batch = reco.AddMemoryRow(["a", "b", "c"])({"id": np.array(["c", "q"])})
    assert batch["memory_row"].tolist() == [2, -1]


def _train_step(model, tx_config, batch, constants, rng):
    tx, table = optim.make_optimizer(tx_config, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch, rng):
        grads = nnx.grad(lambda m: reco.loss_fn(m, batch, constants, rng)[0])(model)
        optimizer.update(model, grads)
        return grads

    return table, step(model, optimizer, batch, rng)


def test_a_train_step_changes_only_fusion_params_and_temperature():
    # A non-zero output projection, so that every fusion param gets gradient in the first step.
    model = make_model(fusion_config=dict(heads=4, width=32, retrieved_dropout=0.2, zero_init_output=False))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    memory = reco.place_memory(*random_memory())
    table, grads = _train_step(model, FREEZE_CLIP, tiny_batch(batch=6), reco.RecoConstants(memory), jax.random.key(0))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert {name for name, entry in table.items() if entry["label"] == "trainable"} == {
        name for name in table if not name.startswith("clip/")}
    for (path, old), new, grad in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after),
                                      jax.tree.leaves(grads)):
        name = jax.tree_util.keystr(path)
        if "'clip'" in name:
            np.testing.assert_array_equal(new, old, err_msg=name)
            assert not np.any(np.asarray(grad)), f"{name}: the loss sends gradient into the frozen CLIP"
    changed = [not np.array_equal(o, n) for o, n in zip(jax.tree.leaves(before.image_fusion),
                                                        jax.tree.leaves(after.image_fusion))]
    assert sum(changed) > len(changed) // 2
    assert not np.array_equal(before.logit_scale, after.logit_scale)


def test_mean_ablation_trains_only_the_temperature():
    model = make_model(fusion="mean")
    memory = reco.place_memory(*random_memory())
    table, _ = _train_step(model, FREEZE_CLIP, tiny_batch(batch=6), reco.RecoConstants(memory), jax.random.key(0))
    assert [name for name, entry in table.items() if entry["label"] == "trainable"] == ["logit_scale"]


# --------------------------------------------------------------------------------------------------
# The method object


def test_method_creates_a_frozen_clip_with_fresh_fusion_and_places_the_training_memory(tmp_path):
    from vlm_jax.weights import save_pretrained

    clip = _shared_clip()
    save_pretrained(clip, tmp_path / "clip")
    images, texts = random_memory()
    method = reco.RecoMethod()
    method._memories["memory"] = types.SimpleNamespace(
        image_embeddings=images, text_embeddings=texts, ids=np.array([f"m{i}" for i in range(24)], object))
    config = ml_collections.ConfigDict(dict(model_dir=str(tmp_path / "clip"), reco=reco.reco_config()))
    config.reco.memory_dir = "memory"
    config.reco.k = 4
    config.reco.fusion_config.heads = 4
    model = method.create_model(config, nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model.clip.vision_model.embeddings.patch_embedding.kernel[...]),
                                  np.asarray(clip.vision_model.embeddings.patch_embedding.kernel[...]))
    assert float(model.logit_scale[...]) == pytest.approx(float(clip.logit_scale[...]))
    constants = method.constants(config, None)
    assert constants.memory.num_rows == 24
    loss, metrics = jax.jit(method.loss_fn)(model, tiny_batch(batch=4), constants, jax.random.key(0))
    assert np.isfinite(float(loss)) and {"loss_refined_refined", "scale"} <= set(metrics)
    config.reco.training_retrieval = "precomputed"
    assert method.constants(config, None).memory is None


# --------------------------------------------------------------------------------------------------
# The premise: knowledge in memory becomes zero-shot accuracy


@pytest.mark.slow
def test_training_the_fusion_recovers_classes_only_the_memory_knows():
    """Images of class c sit near a visual direction u_c unrelated to the class text t_c, so the frozen
    embeddings classify at chance; the memory pairs u_c-like images with t_c-like texts, so an image's
    neighbours' texts reveal its class. Training the fusion must turn that into zero-shot accuracy."""
    start = time.perf_counter()
    classes, dim, noise = 8, EMBED_DIM, 0.35
    rng = np.random.default_rng(0)
    visual, textual = _unit(rng.normal(size=(classes, dim))), _unit(rng.normal(size=(classes, dim)))

    def pairs(count):
        labels = rng.integers(classes, size=count)
        images = _unit(visual[labels] + noise * rng.normal(size=(count, dim)) / math.sqrt(dim) * 4)
        texts = _unit(textual[labels] + noise * rng.normal(size=(count, dim)) / math.sqrt(dim) * 4)
        return images.astype(np.float32), texts.astype(np.float32), labels

    memory_images, memory_texts, _ = pairs(512)
    train_images, train_texts, _ = pairs(2048)
    test_images, _, test_labels = pairs(512)
    constants = reco.RecoConstants(reco.place_memory(memory_images, memory_texts))
    model = make_model(k=8, fusion_config=dict(width=32, heads=4, retrieved_dropout=0.1))
    model.attach_memory(constants.memory)

    def zero_shot_accuracy(refine: bool) -> float:
        images, prompts = jnp.asarray(test_images), jnp.asarray(textual, jnp.float32)
        if refine:
            images, prompts = model.refine("image", images), model.refine("text", prompts)
        scores = _unit(np.asarray(images)) @ _unit(np.asarray(prompts)).T
        return float(np.mean(scores.argmax(axis=1) == test_labels))

    frozen = zero_shot_accuracy(refine=False)
    untrained = zero_shot_accuracy(refine=True)
    tx, _ = optim.make_optimizer(dict(FREEZE_CLIP, learning_rate=3e-3), nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch, rng):
        grads = nnx.grad(lambda m: reco.loss_fn(m, batch, constants, rng)[0])(model)
        optimizer.update(model, grads)

    batch_size = 64
    for index in range(300):
        rows = rng.integers(len(train_images), size=batch_size)
        batch = {"image_embedding": jnp.asarray(train_images[rows]), "text_embedding": jnp.asarray(train_texts[rows])}
        step(model, optimizer, batch, jax.random.key(index))
    trained = zero_shot_accuracy(refine=True)
    print(f"zero-shot top-1: frozen {frozen:.3f}, untrained fusion {untrained:.3f}, trained {trained:.3f} "
          f"({time.perf_counter() - start:.1f}s)")
    assert frozen < 0.4 and untrained == pytest.approx(frozen, abs=0.05)
    assert trained > 0.9
