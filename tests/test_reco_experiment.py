"""RECO end to end (experiments/reco.py, vlm_jax.methods.reco_pipeline): presets, stored-embedding
training and evaluation, self-exclusion, export, the table, and the smoke run with a resumed memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vlm_jax.methods import reco, reco_pipeline
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, tiny, vit_b32

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "reco.py"
ARGUMENTS = ("shapes", "shapes,smoke=True", "shapes,backend=scann", "cc12m_b32", "cc12m_b32,smoke=True",
             "cc12m_b32,backend=scann", "cc12m_b32,backend=approx")


def experiment():
    spec = importlib.util.spec_from_file_location("experiments_reco", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _clip_config(config) -> CLIPConfig:
    """The frozen CLIP a preset runs on: the Shapes World CLIP of its clip_config, or ViT-B/32 (one
    layer per tower keeps the trace cheap; the fusion sees only its embed_dim)."""
    if not config.clip_config:
        config = vit_b32()
        return config.replace(vision=dataclasses.replace(config.vision, depth=1),
                              text=dataclasses.replace(config.text, depth=1))
    path, _, arg = config.clip_config.partition(":")
    spec = importlib.util.spec_from_file_location("experiments_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fields = module.get_config(arg).model.to_dict()
    return CLIPConfig(vision=VisionConfig(**fields.pop("vision")), text=TextConfig(**fields.pop("text")), **fields)


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_every_preset_builds_and_every_variant_traces_abstractly(argument):
    config = experiment().get_config(argument)
    assert config.task == "reco" and config.method == "reco"
    assert {"reco", "crossmodal", "mean"} <= set(config.variants)
    clip_config = _clip_config(config)
    for variant in config.variants:
        run = reco_pipeline.run_config(config, variant=variant, seed=0, clip_dir="clip", memory_dir="memory",
                                       workdir=pathlib.Path("workdir"))
        reco_config = reco.RecoConfig.from_config(run.reco, embed_dim=clip_config.embed_dim)
        model = nnx.eval_shape(lambda: reco.RECO(CLIP(clip_config, rngs=nnx.Rngs(0)), reco_config, rngs=nnx.Rngs(1)))
        fusion_params = sum(int(np.prod(variable.get_value().shape))
                            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[0] != "clip")
        if variant == "mean":
            assert fusion_params == 1  # only the temperature
        elif not config.clip_config:
            # The paper: ~3.2M fusion parameters for B/32.
            assert 3.0e6 < fusion_params < 3.4e6, fusion_params
    assert run.reco.training_retrieval == "precomputed" and run.optim.trainable[0] == (r"^clip/", False)


def test_a_misspelt_option_or_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        experiment().get_config("shapes,backend=faiss")
    with pytest.raises(ValueError, match="not one of"):
        experiment().get_config("shapes,seeds=2")


def test_run_config_applies_the_variant_and_points_at_the_stored_embeddings():
    config = experiment().get_config("shapes")
    with config.unlocked():
        config.variants.wide = {"k": 4, "fusion_config": {"width": 96}}
    run = reco_pipeline.run_config(config, variant="wide", seed=7, clip_dir="/c", memory_dir="/m",
                                   workdir=pathlib.Path("/w"))
    assert (run.task, run.seed, run.model_dir, run.reco.memory_dir) == ("train", 7, "/c", "/m")
    assert run.reco.k == 4 and run.reco.fusion_config.width == 96 and run.reco.fusion_config.heads == 4
    assert run.reco.train_embeddings_dirs == ("/w/train_embeddings/memory", "/w/train_embeddings/pretrain")
    assert run.reco.train_weights == (0.25, 0.75)  # memory, pretrain
    with config.unlocked():
        config.train_weights = {"pretrain": 3.0}
    weighted = reco_pipeline.run_config(config, variant="reco", seed=0, clip_dir="/c", memory_dir="/m",
                                        workdir=pathlib.Path("/w"))
    assert weighted.reco.train_weights == (0.0, 3.0)
    assert run.reco.eval_embeddings_dir == "/w/eval_embeddings"
    assert config.reco.k == 16  # the experiment config itself is untouched


# --------------------------------------------------------------------------------------------------
# Training on stored embeddings, self-exclusion


def fake_store(images, texts, *, ids=None, split="memory"):
    """A stand-in for `vlm_jax.memory.store.Memory` with the fields the pipeline reads."""
    rows = len(images)
    indices = np.arange(rows)
    return types.SimpleNamespace(
        image_embeddings=_unit(images), text_embeddings=_unit(texts), num_rows=rows, indices=indices,
        ids=np.asarray(ids if ids is not None else indices.astype(str), str),
        manifest={"config": {"data": {"source": "tfds", "tfds_name": "shapes_world/test", "split": split}}})


def method_with(stores: dict) -> reco.RecoMethod:
    method = reco.RecoMethod()
    method._memories.update(stores)
    return method


def train_config(**reco_fields):
    config = ml_collections.ConfigDict(dict(global_batch_size=8, seed=3, reco=reco.reco_config()))
    config.reco.update({"memory_dir": "memory", "train_embeddings_dirs": ("train",), "k": 3, **reco_fields})
    return config


def test_stored_pairs_iterator_adds_the_neighbours_values_and_resumes_exactly():
    rng = np.random.default_rng(0)
    memory = fake_store(rng.normal(size=(40, 16)), rng.normal(size=(40, 16)))
    train = fake_store(rng.normal(size=(32, 16)), rng.normal(size=(32, 16)), split="pretrain")
    method = method_with({"memory": memory, "train": train})
    iterator = method.train_iterator(train_config(), 0, 1)
    batch = next(iterator)
    rows = batch["index"]
    np.testing.assert_allclose(batch["image_embedding"], train.image_embeddings[rows])
    np.testing.assert_allclose(batch["text_embedding"], train.text_embeddings[rows])
    # Uni-modal search: an image's neighbours are the nearest memory images; it receives their texts.
    expected = np.argsort(-(train.image_embeddings[rows] @ memory.image_embeddings.T), axis=1)[:, :3]
    np.testing.assert_array_equal(batch["retrieved_for_image_ids"], expected)
    np.testing.assert_allclose(batch["retrieved_for_image"], memory.text_embeddings[expected], rtol=1e-6)
    state = iterator.get_state()
    following = [next(iterator)["index"] for _ in range(6)]  # past the 4-batch epoch: a reshuffled repeat
    resumed = method.train_iterator(train_config(), 0, 1)
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["index"] for _ in range(6)], following)
    halves = [next(method.train_iterator(train_config(), p, 2))["index"] for p in range(2)]
    assert len(halves[0]) == 4 and not set(halves[0]) & set(halves[1])


def test_train_weights_set_how_often_each_source_is_drawn_and_exclusion_is_per_source():
    rng = np.random.default_rng(3)
    memory = fake_store(rng.normal(size=(32, 16)), rng.normal(size=(32, 16)))
    pretrain = fake_store(rng.normal(size=(64, 16)), rng.normal(size=(64, 16)), split="pretrain")
    method = method_with({"memory": memory, "pretrain": pretrain})
    config = train_config(train_embeddings_dirs=("memory", "pretrain"), train_weights=(1.0, 3.0))
    iterator = method.train_iterator(config, 0, 1)
    rows = np.concatenate([next(iterator)["index"] for _ in range(40)])
    assert 0.18 < np.mean(rows < 32) < 0.32  # a quarter from the memory source (rows 0-31 of the union)
    batch = next(iterator)
    from_memory = batch["index"] < 32
    # Memory pairs never retrieve themselves; pretrain pairs (another source, positional ids) may
    # retrieve any row.
    assert not (batch["retrieved_for_image_ids"][from_memory] == batch["index"][from_memory, None]).any()
    only_pretrain = method.train_iterator(train_config(train_embeddings_dirs=("memory", "pretrain"),
                                                       train_weights=(0.0, 1.0)), 0, 1)
    assert min(next(only_pretrain)["index"].min() for _ in range(5)) >= 32


def test_self_exclusion_drops_each_examples_own_row_when_it_trains_on_the_memory_itself():
    rng = np.random.default_rng(1)
    memory = fake_store(rng.normal(size=(24, 16)), rng.normal(size=(24, 16)))
    method = method_with({"memory": memory, "train": memory})
    own = np.arange(24)
    excluded = reco_pipeline.stored_neighbours(method, train_config().reco.to_dict())
    assert not (excluded.neighbours["image"] == own[:, None]).any()
    assert not (excluded.neighbours["text"] == own[:, None]).any()
    kept = reco_pipeline.stored_neighbours(method, train_config(exclude_self=False).reco.to_dict())
    np.testing.assert_array_equal(kept.neighbours["image"][:, 0], own)  # its own image is its nearest


def test_positional_ids_of_another_source_never_match_but_real_ids_do():
    rng = np.random.default_rng(2)
    memory = fake_store(rng.normal(size=(6, 8)), rng.normal(size=(6, 8)))
    other = fake_store(rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), split="pretrain")
    np.testing.assert_array_equal(reco_pipeline.self_match_rows(other, memory), [-1, -1, -1, -1])
    np.testing.assert_array_equal(reco_pipeline.self_match_rows(memory, memory), np.arange(6))
    named_memory = fake_store(rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), ids=["a", "b", "c"])
    named = fake_store(rng.normal(size=(2, 8)), rng.normal(size=(2, 8)), ids=["c", "z"], split="pretrain")
    np.testing.assert_array_equal(reco_pipeline.self_match_rows(named, named_memory), [2, -1])


# --------------------------------------------------------------------------------------------------
# Export, table


@dataclasses.dataclass(frozen=True)
class StubClipConfig:
    embed_dim: int = 32


class StubClip(nnx.Module):
    """What RECO reads of its CLIP outside encode_*: embed_dim and the temperature (eager CLIP
    creation takes long on a shared CPU, and refine never runs the towers)."""

    def __init__(self):
        self.config = StubClipConfig()
        self.logit_scale = nnx.Param(jax.numpy.asarray(2.5))


def tiny_reco():
    section = dict(k=3, fusion_config=dict(heads=4, width=32, zero_init_output=False))
    return reco.RECO(StubClip(), reco.RecoConfig.from_config(section, embed_dim=32), rngs=nnx.Rngs(5))


def test_exported_fusion_loads_back_onto_its_clip_and_refines_identically(tmp_path):
    model = tiny_reco()
    reco.export_fusion(model, tmp_path)
    loaded = reco.load_fusion(tmp_path, model.clip)
    assert loaded.config == model.config
    rng = np.random.default_rng(0)
    queries, retrieved = _unit(rng.normal(size=(4, 32))), _unit(rng.normal(size=(4 * 3, 32))).reshape(4, 3, 32)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(np.asarray(loaded.refine(modality, queries, retrieved=retrieved)),
                                      np.asarray(model.refine(modality, queries, retrieved=retrieved)))
    assert set(json.loads((tmp_path / reco.FUSION_CONFIG).read_text())) >= {"k", "search", "fusion_config"}


def test_summary_gives_mean_sample_std_and_range_over_seeds_and_the_table_shows_them():
    runs = {"reco": [{"clip/m": 0.2, "reco/m": value} for value in (0.5, 0.6, 0.7)],
            "mean": [{"clip/m": 0.2, "reco/m": 0.3}]}
    results = reco_pipeline.summarize(runs, ["m"])
    assert results["clip/m"] == 0.2
    assert results["reco/m"] == pytest.approx(0.6) and results["reco/m/std"] == pytest.approx(0.1)
    assert (results["reco/m/min"], results["reco/m/max"], results["reco/m/seed_2"]) == (0.5, 0.7, 0.7)
    assert results["mean/m/std"] == 0.0
    table = reco_pipeline.format_table(results, {"clip": "CLIP", "reco": "RECO"}, [("m", "metric")], 3)
    assert "60.0 ± 10.0" in table and "20.0" in table and "3 seed" in table


# --------------------------------------------------------------------------------------------------
# Stored-embedding evaluation equals evaluation on pixels


@pytest.mark.slow
def test_evaluation_on_stored_embeddings_equals_the_evaluators_on_pixels(tmp_path):
    from vlm_jax.data import shapes_world
    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.evaluate import suite
    from vlm_jax.weights import save_pretrained

    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"))
    config = tiny()
    config = config.replace(
        vision=dataclasses.replace(config.vision, depth=1),
        text=dataclasses.replace(config.text, depth=1, vocab_size=tokenizer.vocab_size,
                                 context_length=tokenizer.context_length, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id))
    save_pretrained(CLIP(config, rngs=nnx.Rngs(0)), tmp_path / "clip", tokenizer=tokenizer,
                    preprocess=PreprocessSpec.clip(image_size=32))
    experiment_config = experiment().get_config("shapes,smoke=True")
    with experiment_config.unlocked():
        experiment_config.embeddings.progress = False
        experiment_config.memory.progress = False
    from vlm_jax.memory.build import build_memory

    build_memory(experiment_config.memory, str(tmp_path / "clip"), None, None, tmp_path / "memory")
    reco_pipeline.build_eval_embeddings(experiment_config.evals, str(tmp_path / "clip"), tmp_path / "eval",
                                        experiment_config.embeddings.to_dict())
    run = reco_pipeline.run_config(experiment_config, variant="reco", seed=0, clip_dir=str(tmp_path / "clip"),
                                   memory_dir=str(tmp_path / "memory"), workdir=tmp_path)
    run.reco.eval_embeddings_dir = str(tmp_path / "eval")
    run.reco.fusion_config.zero_init_output = False  # a fusion that changes the embeddings
    method = reco.RecoMethod()
    model = method.create_model(run, nnx.Rngs(1))
    stored = suite.run_evaluators(method.evaluators(run), model)
    run.reco.eval_embeddings_dir = ""
    on_pixels = suite.run_evaluators(method.evaluators(run), model)
    assert set(stored) == set(on_pixels) and any(key.startswith("reco/shapes/top1") for key in stored)
    assert any(stored[f"reco/{k[5:]}"] != stored[k] for k in stored if k.startswith("clip/"))
    for key, value in on_pixels.items():
        assert stored[key] == pytest.approx(value, abs=1e-6), key


# --------------------------------------------------------------------------------------------------
# The smoke run, end to end


def _memory_files(directory: pathlib.Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in sorted(directory.rglob("shard_*"))}


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_a_rerun_resumes_the_memory_build(tmp_path):
    command = [sys.executable, "-m", "vlm_jax.main", "--config=experiments/reco.py:shapes,smoke=True",
               f"--workdir={tmp_path}"]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    config = experiment().get_config("shapes,smoke=True")
    for metric, label in config.table:
        assert label in first.stdout
        for row in ("clip", "reco", "crossmodal", "mean"):
            assert 0.0 <= results[f"{row}/{metric}"] <= 1.0
        assert f"reco/{metric}/std" in results
    assert {"time/clip_s", "time/memory_s", "time/train_embeddings_s", "time/eval_embeddings_s",
            "time/fusion_runs_s", "time/total_s"} <= set(results)
    assert (tmp_path / "runs" / "reco" / "seed_0" / "export" / reco.FUSION_WEIGHTS).exists()

    # An interrupted memory build: the last shard never finished.
    memory = tmp_path / "memory"
    (memory / "complete.json").unlink()
    (memory / "shard_00003.json").unlink()
    before = _memory_files(memory)
    embeddings_before = _memory_files(tmp_path / "train_embeddings")
    second = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _memory_files(memory)
    unchanged = {name for name in before if before[name] == after.get(name)}
    assert {name for name in before if not name.startswith("shard_00003")} <= unchanged
    assert after["shard_00003.json"] and not any(name.startswith("shard_00003") for name in unchanged)
    assert _memory_files(tmp_path / "train_embeddings") == embeddings_before
    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()
