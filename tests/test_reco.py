"""RECO: uni-modal search / cross-modal fusion, the ablations, the three-term loss, precomputed
neighbours, what trains, the method object and its views, and the premise."""

import dataclasses
import functools
import math
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vlm_jax.config_lib import ConfigError
from vlm_jax.evaluate.views import StoredPrompts, stored_view
from vlm_jax.memory.device import DeviceRetriever, place_memory
from vlm_jax.memory.neighbours import precompute_neighbours
from vlm_jax.methods import reco
from vlm_jax.models.clip import CLIP, tiny
from vlm_jax.train import optim

EMBED_DIM = 32  # tiny()'s embed_dim
FREEZE_CLIP = dict(learning_rate=1e-2, schedule="constant", weight_decay=0.0, grad_clip_norm=None,
                   trainable=((r"^clip/", False), (r".*", True)))
FUSION = dict(heads=4, width=32, zero_init_output=False, retrieved_dropout=0.0)


def _unit(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class StubClipConfig:
    embed_dim: int = EMBED_DIM


class StubClip(nnx.Module):
    """What RECO reads of its CLIP when batches carry embeddings: embed_dim and the temperature
    (building a CLIP eagerly takes seconds on a shared CPU)."""

    def __init__(self):
        self.config = StubClipConfig()
        self.logit_scale = nnx.Param(jnp.asarray(2.5))


def tiny_clip_config():
    """tiny() cut to one layer per tower: these tests exercise RECO, not the towers."""
    config = tiny()
    return config.replace(vision=dataclasses.replace(config.vision, depth=1),
                          text=dataclasses.replace(config.text, depth=1))


@functools.lru_cache(maxsize=1)
def _shared_clip() -> CLIP:
    return CLIP(tiny_clip_config(), rngs=nnx.Rngs(0))


def reco_config(**fields) -> reco.RecoConfig:
    section = {"k": 3, "fusion_config": dict(FUSION), **fields}
    return reco.parse_reco(section)


def make_model(clip=None, **fields) -> reco.RECO:
    return reco.RECO(clip if clip is not None else StubClip(), reco_config(**fields), rngs=nnx.Rngs(1))


def pixel_model(**fields) -> reco.RECO:
    return make_model(nnx.clone(_shared_clip()), **fields)


def random_memory(rows=24, seed=0):
    rng = np.random.default_rng(seed)
    return (_unit(rng.normal(size=(rows, EMBED_DIM))).astype(np.float32),
            _unit(rng.normal(size=(rows, EMBED_DIM))).astype(np.float32))


def retriever_of(images, texts):
    return DeviceRetriever(place_memory(images, texts))


def embedding_batch(batch=6, seed=1):
    images, texts = random_memory(rows=batch, seed=seed)
    return {"image_embedding": jnp.asarray(images), "text_embedding": jnp.asarray(texts)}


def pixel_batch(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
            "text_ids": jnp.asarray(rng.integers(1, 998, size=(batch, 16)), jnp.int32)}


def nearest(queries, keys, k=3):
    return np.argsort(-(np.asarray(queries, np.float64) @ np.asarray(keys, np.float64).T), axis=1)[:, :k]


@nnx.jit(static_argnames="modality")
def _refine_from_memory(model, retriever, modality, queries):
    values, valid = reco.retrieve(retriever, modality, queries, model.config)
    return model.refine(modality, queries, values, valid)


def refine_from_memory(model, retriever, modality, queries):
    """Unit queries [B, D] -> refined float32 [B, D] over the memory `retriever` holds (jitted:
    eager fusion ops are slow on CPU)."""
    return np.asarray(_refine_from_memory(model, retriever, modality, jnp.asarray(queries)))


@nnx.jit
def fuse(fusion, queries, retrieved, valid=None):
    """fusion(queries [B, D], retrieved [B, k, D], valid [B, k]) under jit."""
    return fusion(queries, retrieved, valid)


# --------------------------------------------------------------------------------------------------
# Search and fusion


@pytest.mark.parametrize("search", ["unimodal", "crossmodal"])
def test_refined_embedding_is_the_fusion_of_the_query_and_the_paired_values_of_its_nearest_keys(search):
    model = make_model(search=search)
    images, texts = random_memory()
    queries_image, queries_text = random_memory(rows=5, seed=3)
    retriever = retriever_of(images, texts)

    # Uni-modal: an image searches memory images and receives their paired texts; a text searches
    # texts and receives images. Cross-modal: each query searches and receives the other modality.
    image_keys, text_keys = (images, texts) if search == "unimodal" else (texts, images)
    retrieved = texts[nearest(queries_image, image_keys)]
    by_hand = fuse(model.image_fusion, jnp.asarray(queries_image), jnp.asarray(retrieved))
    np.testing.assert_allclose(refine_from_memory(model, retriever, "image", queries_image), np.asarray(by_hand),
                               atol=1e-5)
    by_hand = fuse(model.text_fusion, jnp.asarray(queries_text), jnp.asarray(images[nearest(queries_text, text_keys)]))
    np.testing.assert_allclose(refine_from_memory(model, retriever, "text", queries_text), np.asarray(by_hand),
                               atol=1e-5)


def test_mean_ablation_refines_to_the_normalized_mean_of_query_and_retrieved_texts():
    model = make_model(fusion="mean")
    images, texts = random_memory()
    queries, _ = random_memory(rows=5, seed=3)
    expected = _unit(np.concatenate([queries[:, None], texts[nearest(queries, images)]], axis=1).mean(axis=1))
    np.testing.assert_allclose(refine_from_memory(model, retriever_of(images, texts), "image", queries), expected,
                               atol=1e-5)
    assert not jax.tree.leaves(nnx.state(model.image_fusion, nnx.Param))


def test_none_ablation_is_the_plain_clip_and_its_loss_needs_no_memory():
    model = make_model(fusion="none")
    queries, _ = random_memory(rows=5, seed=3)
    unused = jnp.zeros((5, 3, EMBED_DIM))
    np.testing.assert_array_equal(np.asarray(model.refine("image", jnp.asarray(queries), unused, unused[..., 0] > 0)),
                                  queries)
    assert model.image_fusion is None and model.text_fusion is None
    batch = embedding_batch()
    loss, metrics = jax.jit(reco.loss_fn)(model, batch, reco.RecoConstants(None), None)
    np.testing.assert_allclose(float(loss), 3 * float(metrics["loss_refined_refined"]), rtol=1e-6)


def test_temperature_starts_from_the_clip_or_the_config():
    assert float(make_model().logit_scale[...]) == pytest.approx(2.5)
    assert float(make_model(logit_scale_init=math.log(20.0)).logit_scale[...]) == pytest.approx(math.log(20.0))


@pytest.mark.parametrize("field, value", [("search", "bimodal"), ("fusion", "max"), ("k", 0),
                                          ("training_retrieval", "lazy")])
def test_a_bad_reco_value_is_a_one_line_config_error(field, value):
    with pytest.raises(ConfigError, match=f"reco.{field}") as error:
        reco.parse_reco({field: value})
    assert "\n" not in str(error.value)


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
    batch = embedding_batch()
    loss, metrics = jax.jit(reco.loss_fn)(model, batch, reco.RecoConstants(retriever_of(images, texts)), None)

    v, t = np.asarray(batch["image_embedding"]), np.asarray(batch["text_embedding"])
    v_bar = np.asarray(fuse(model.image_fusion, jnp.asarray(v), jnp.asarray(texts[nearest(v, images)])))
    t_bar = np.asarray(fuse(model.text_fusion, jnp.asarray(t), jnp.asarray(images[nearest(t, texts)])))
    expected = _nce(v_bar, t_bar, 10.0) + _nce(v_bar, t, 10.0) + _nce(v, t_bar, 10.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_refined_text"]), _nce(v, t_bar, 10.0), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_refined_image"]), _nce(v_bar, t, 10.0), rtol=1e-5)


def test_precomputed_neighbour_ids_in_the_batch_give_the_on_the_fly_loss_with_self_exclusion():
    model = make_model()
    images, texts = random_memory()
    # Training pairs that are memory pairs: each one's nearest neighbour is itself, unless excluded.
    pairs = np.array([0, 7, 5, 11, 13, 9])
    own_rows = np.array([0, -1, 5, -1, -1, 9], np.int32)
    batch = {"image_embedding": jnp.asarray(images[pairs]), "text_embedding": jnp.asarray(texts[pairs])}
    v, t = images[pairs], texts[pairs]
    ids = {"image": precompute_neighbours(v, images, k=3, exclude_rows=own_rows),
           "text": precompute_neighbours(t, texts, k=3, exclude_rows=own_rows)}
    assert not (ids["image"] == own_rows[:, None]).any() and not (ids["text"] == own_rows[:, None]).any()
    constants = reco.RecoConstants(retriever_of(images, texts))
    loss = jax.jit(reco.loss_fn)
    on_the_fly, _ = loss(model, {**batch, "memory_row": jnp.asarray(own_rows)}, constants, None)
    precomputed = reco.NeighbourIds(ids)({**batch, "index": np.arange(6)})
    from_batch, _ = loss(model, {key: jnp.asarray(value) for key, value in precomputed.items()}, constants, None)
    np.testing.assert_allclose(float(from_batch), float(on_the_fly), rtol=1e-6)
    # Without the exclusion each of those pairs would retrieve itself first.
    np.testing.assert_array_equal(precompute_neighbours(v, images, k=1)[:, 0], pairs)


def test_neighbour_ids_of_a_mixture_are_found_by_source_and_position_within_it():
    ids = {"image": np.arange(10)[:, None] * np.ones((1, 2), np.int32), "text": -np.ones((10, 2), np.int32)}
    batch = reco.NeighbourIds(ids, offsets=(0, 4))({"index": np.array([1, 0, 3]), "source": np.array([1, 0, 1])})
    assert batch["neighbours_image"][:, 0].tolist() == [5, 0, 7] and batch["neighbours_text"].dtype == np.int32


# --------------------------------------------------------------------------------------------------
# What trains


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
    # Pixels in the batch: the frozen towers run in the step and must receive no gradient.
    model = pixel_model(fusion_config=dict(FUSION, retrieved_dropout=0.2))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    constants = reco.RecoConstants(retriever_of(*random_memory()))
    table, grads = _train_step(model, FREEZE_CLIP, pixel_batch(batch=6), constants, jax.random.key(0))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert {name for name, entry in table.items() if entry["label"] == "trainable"} == {
        name for name in table if not name.startswith("clip/")}
    for (path, old), new, grad in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after),
                                      jax.tree.leaves(grads)):
        name = jax.tree_util.keystr(path)
        if "'clip'" in name:
            np.testing.assert_array_equal(new, old, err_msg=name)
            assert not np.any(np.asarray(grad)), f"{name}: the loss sends gradient into the frozen CLIP"
    changed = [not np.array_equal(o, n) for o, n in zip(jax.tree.leaves(before["image_fusion"]),
                                                        jax.tree.leaves(after["image_fusion"]))]
    assert sum(changed) > len(changed) // 2
    assert not np.array_equal(before["logit_scale"], after["logit_scale"])


def test_mean_ablation_trains_only_the_temperature():
    model = make_model(fusion="mean")
    constants = reco.RecoConstants(retriever_of(*random_memory()))
    table, _ = _train_step(model, FREEZE_CLIP, embedding_batch(), constants, jax.random.key(0))
    assert [name for name, entry in table.items() if entry["label"] == "trainable"] == ["logit_scale"]


# --------------------------------------------------------------------------------------------------
# The method object


def fake_memory(images, texts):
    """A stand-in for `vlm_jax.memory.store.Memory` with the fields the method reads."""
    fields = {"image_embeddings": images, "text_embeddings": texts}
    return types.SimpleNamespace(**fields, num_rows=len(images), rows=fields.__getitem__,
                                 ids=np.array([f"m{i}" for i in range(len(images))], object))


def method_config(clip_dir):
    config = ml_collections.ConfigDict(dict(clip_dir=str(clip_dir), dtype="float32", reco=reco.reco_config()))
    config.reco.update(memory_dir="memory", k=4)
    config.reco.fusion_config.heads = 4
    return config


def test_method_creates_the_frozen_clip_from_clip_dir_and_its_constants_carry_a_device_retriever(tmp_path):
    from vlm_jax.weights import save_pretrained

    clip = _shared_clip()
    save_pretrained(clip, tmp_path / "clip")
    method = reco.RecoMethod()
    method._cache[("memory", "memory")] = fake_memory(*random_memory())
    config = method_config(tmp_path / "clip")
    model = method.create_model(config, nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model.clip.vision_model.embeddings.patch_embedding.kernel[...]),
                                  np.asarray(clip.vision_model.embeddings.patch_embedding.kernel[...]))
    assert float(model.logit_scale[...]) == pytest.approx(float(clip.logit_scale[...]))
    assert method.create_model(config, nnx.Rngs(2)).clip.config == model.clip.config  # loaded once, cached
    constants = method.constants(config, None)
    assert isinstance(constants.retriever, DeviceRetriever) and constants.retriever.table.num_rows == 24
    loss, metrics = jax.jit(method.loss_fn)(model, pixel_batch(batch=4), constants, jax.random.key(0))
    assert np.isfinite(float(loss)) and {"loss_refined_refined", "scale", "loss"} <= set(metrics)

    config.reco.fusion = "none"
    assert method.constants(config, None).retriever is None
    config.reco.fusion, config.reco.index.backend = "transformer", "scann"
    with pytest.raises(ConfigError, match="host backend"):
        method.constants(config, None)
    config.reco.training_retrieval = "precomputed"  # the table then only serves gathers
    assert method.constants(config, None).retriever.table.num_rows == 24


def test_the_reco_view_refines_the_clip_view_with_the_eval_memory():
    method = reco.RecoMethod()
    images, texts = random_memory()
    method._cache[("memory", "eval_memory")] = fake_memory(images, texts)
    model = make_model(eval_memory_dir="eval_memory", memory_dir="train_memory")
    prompt_texts = ["a", "b"]
    prompts = _unit(np.random.default_rng(5).normal(size=(2, EMBED_DIM))).astype(np.float32)
    stored_prompts = StoredPrompts(prompt_texts, prompts)
    views = method.views(model, lambda encoder: stored_view(stored_prompts))
    assert set(views) == {"clip", "reco"}
    batch = {"image_embedding": random_memory(rows=5, seed=3)[0]}
    np.testing.assert_allclose(views["clip"].images(batch), batch["image_embedding"], atol=1e-6)
    retriever = retriever_of(images, texts)
    np.testing.assert_allclose(views["reco"].images(batch),
                               _unit(refine_from_memory(model, retriever, "image", batch["image_embedding"])),
                               atol=1e-5)
    np.testing.assert_allclose(views["reco"].prompts(["b", "a"]),
                               _unit(refine_from_memory(model, retriever, "text", prompts[[1, 0]])), atol=1e-5)


def test_exported_fusion_loads_back_onto_its_clip_and_refines_identically(tmp_path):
    model = make_model(k=2, fusion_config=dict(FUSION, width=64, heads=8))
    reco.RecoMethod().export(model, tmp_path)
    loaded = reco.load_fusion(tmp_path / "export", model.clip)
    assert loaded.config == model.config
    queries = jnp.asarray(random_memory(rows=4, seed=2)[0])
    retrieved = jnp.asarray(random_memory(rows=8, seed=3)[1]).reshape(4, 2, EMBED_DIM)
    valid = jnp.array([[True, True], [True, False], [True, True], [False, False]])
    for fusion, loaded_fusion in ((model.image_fusion, loaded.image_fusion), (model.text_fusion, loaded.text_fusion)):
        np.testing.assert_array_equal(np.asarray(fuse(loaded_fusion, queries, retrieved, valid)),
                                      np.asarray(fuse(fusion, queries, retrieved, valid)))
    np.testing.assert_array_equal(np.asarray(loaded.logit_scale[...]), np.asarray(model.logit_scale[...]))


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
    retriever = retriever_of(memory_images, memory_texts)
    constants = reco.RecoConstants(retriever)
    model = make_model(k=8, fusion_config=dict(width=32, heads=4, retrieved_dropout=0.1))

    def zero_shot_accuracy(refine: bool) -> float:
        images, prompts = test_images, textual.astype(np.float32)
        if refine:
            images = refine_from_memory(model, retriever, "image", images)
            prompts = refine_from_memory(model, retriever, "text", prompts)
        scores = _unit(images) @ _unit(prompts).T
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
