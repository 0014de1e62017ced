"""GRAIN's data and experiment: boxes through preprocessing and the pipeline, annotation files joined by id,
short region contexts, presets, misspelt fields before any work, export round trip, and the smoke run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.config_lib import ConfigError, load_config_file
from vlm_jax.data import pipeline, shapes_world
from vlm_jax.data.annotations import read_annotations, write_annotation_line
from vlm_jax.data.bad_input import Fetched
from vlm_jax.data.preprocess import PreprocessSpec, resize_and_crop, transform_boxes
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.methods import grain_clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "grain_clip.py"
ROWS = ("clip", "grain", "pipeline", "no_box", "no_region")


def experiment_config(argument="shapes"):
    return load_config_file(f"{EXPERIMENT}:{argument}")


def _tokenizer(length=16):
    return Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"), context_length=length)


@pytest.mark.parametrize("spec", [PreprocessSpec.clip(32), PreprocessSpec(image_size=32, resize="squash", crop=False),
                                  PreprocessSpec(image_size=48, resize_size=40)])
@pytest.mark.parametrize("shape", [(40, 64), (64, 40), (32, 32), (20, 24)])
def test_transformed_boxes_cover_the_same_pixels_after_resize_and_crop(spec, shape):
    """A box painted white before preprocessing is where transform_boxes says it is after it."""
    height, width = shape
    box = np.asarray([[0.25, 0.3, 0.7, 0.8]])  # x0, y0, x1, y1 normalized
    image = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = (box[0] * [width, height, width, height]).round().astype(int)
    image[y0:y1, x0:x1] = 255
    spec = dataclasses.replace(spec, resample="nearest")
    out, keep = transform_boxes(box, height, width, spec)
    pixels = resize_and_crop(image, spec)[..., 0] > 127
    size = pixels.shape[0]
    ys, xs = np.nonzero(pixels)
    assert keep[0] and len(xs)
    measured = np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
    np.testing.assert_allclose(out[0], np.clip(measured, 0, 1), atol=2.0 / size)


def test_a_box_cropped_away_is_dropped():
    # A 100 x 50 image centre-cropped to its middle 50 x 50: a box in the left fifth leaves the input.
    out, keep = transform_boxes(np.asarray([[0.0, 0.2, 0.2, 0.8], [0.4, 0.2, 0.6, 0.8]]), 50, 100, PreprocessSpec.clip(50))
    assert keep.tolist() == [False, True]
    np.testing.assert_allclose(out[1], [0.3, 0.2, 0.7, 0.8], atol=1e-6)


def _data(**overrides):
    config = pipeline.default_config()
    config.update(tfds_name="shapes_world/test", split="pretrain", text_keys=("weak_caption",), regions_key="regions",
                  id_key="index", max_regions=4, shuffle=False)
    config.update(overrides)
    return config


def test_the_pipeline_gives_padded_boxes_and_descriptions_of_shapes_world_regions():
    shapes_world.prepare(None, "test")
    tokenizer = _tokenizer()
    batch = next(pipeline.make_eval_iterator(_data(), PreprocessSpec.clip(64), tokenizer, 8))
    record = pipeline.make_source(_data())[int(batch["index"][0])]
    count = len(record["regions"]["description"])
    assert batch["boxes"].shape == (8, 4, 4) and batch["region_ids"].shape == (8, 4, 16)
    assert batch["box_mask"][0].tolist() == [True] * count + [False] * (4 - count)
    ymin, xmin, ymax, xmax = record["regions"]["bbox"][0]
    np.testing.assert_allclose(batch["boxes"][0, 0], [(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin],
                               atol=1e-6)
    assert batch["region_texts"][0, 0] == record["regions"]["description"][0].decode()
    np.testing.assert_array_equal(batch["region_ids"][0, 0], tokenizer([batch["region_texts"][0, 0]])[0])
    assert (batch["region_ids"][0, count:] == tokenizer.pad_id).all()
    assert not batch["boxes"][0, count:].any()


def test_a_short_region_context_embeds_descriptions_exactly_in_a_causal_text_tower():
    from vlm_jax.models import clip as clip_models

    tokenizer = _tokenizer()
    short = pipeline.make_decoder(_data(region_context_length=8), PreprocessSpec.clip(64), tokenizer)
    full = pipeline.make_decoder(_data(), PreprocessSpec.clip(64), tokenizer)
    source = pipeline.make_source(_data())
    rng = np.random.default_rng(0)
    a, b = short.random_map(Fetched(0, source[0]), rng), full.random_map(Fetched(0, source[0]), rng)
    assert a["region_ids"].shape[-1] == 8 and b["region_ids"].shape[-1] == 16
    config = clip_models.tiny()
    text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, context_length=16)
    model = clip_models.CLIP(config.replace(text=text), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.encode_text(jnp.asarray(a["region_ids"])),
                               model.encode_text(jnp.asarray(b["region_ids"])), rtol=1e-5, atol=1e-6)


def test_max_examples_cuts_the_source():
    assert len(pipeline.make_source(_data(max_examples=5))) == 5
    assert len(pipeline.make_source(_data())) > 5


def test_annotated_source_puts_annotation_boxes_where_the_decoder_reads_them(tmp_path):
    path = tmp_path / "annotations.jsonl"
    with open(path, "w") as file:
        write_annotation_line(file, "3", [[0.1, 0.2, 0.5, 0.6]], ["a dotted red ring"], [0.9], caption="a rewrite")
    source = pipeline.make_source(_data())
    annotated = grain_clip.AnnotatedSource(source, read_annotations(str(path)), id_key="index", key="regions",
                                           caption_key="annotation_caption", fallback_key="weak_caption")
    position = next(i for i in range(len(source)) if int(source[i]["index"]) == 3)
    record = annotated[position]
    np.testing.assert_allclose(record["regions"]["bbox"][0], [0.2, 0.1, 0.6, 0.5])  # ymin, xmin, ymax, xmax
    assert record["regions"]["description"] == ["a dotted red ring"] and record["annotation_caption"] == "a rewrite"
    other = annotated[(position + 1) % len(source)]
    assert other["regions"]["description"] == [] and other["annotation_caption"] == other["weak_caption"]
    decoder = pipeline.make_decoder(_data(), PreprocessSpec.clip(64), _tokenizer())
    example = decoder.random_map(Fetched(position, record), np.random.default_rng(0))
    np.testing.assert_allclose(example["boxes"][0], [0.3, 0.4, 0.4, 0.4], atol=1e-6)
    assert example["box_mask"].tolist() == [True, False, False, False]


@pytest.mark.parametrize("argument", ["shapes", "shapes,smoke=True", "shapes,seeds=3", "cc3m_b16", "cc12m_b16"])
def test_presets_load_with_their_rows(argument):
    config = experiment_config(argument)
    assert config.task == "grain" and config.method == "grain"
    assert config.seeds == (3 if "seeds=3" in argument else 1)
    if argument.startswith("shapes"):
        assert set(config.variants) == set(ROWS) and tuple(config.row_order) == ROWS
        assert config.variants.no_box.grain.box_l1_weight == 0 and config.variants.no_region.grain.region_weight == 0
        assert config.variants.pipeline.grain.annotations == grain_clip.PIPELINE
    else:
        assert config.global_batch_size == 2048 and config.grain.decoder.depth == 6 and config.grain.decoder.width == 512
        assert config.optim.b2 == 0.98 and config.optim.weight_decay == 0.1 and config.grain.annotation_captions
        from vlm_jax.data import datasets

        assert len(config.evals) == 12 and all(spec.data.dataset in datasets.REGISTRY for spec in config.evals.values())
        assert all(spec.type == "descriptions" for spec in config.evals.values())


@pytest.mark.parametrize("where, change, message", [
    ("grain", {"box_weight": 1.0}, "config.grain.box_weight is not a field"),
    ("decoder", {"layers": 2}, "grain.decoder.layers is not a field"),
    ("annotate", {"mod": "crops"}, "annotate.mod is not a field"),
    ("variants", {"bad": {"grain": {"region_weigth": 0.0}}}, "variants.bad.grain.region_weigth is not a field"),
    ("variants", {"bad": {"method": "reco"}}, "variants.bad.method='reco' is not 'grain' or 'clip'"),
    ("evals", {"among": "novl"}, "among='novl' is not one of the class subsets"),
    ("variants", {"bad": {"grain": {"decoder": {"heads": 3}}}}, "variants.bad.grain.decoder: .* not divisible"),
])
def test_misspelt_fields_stop_before_any_work(tmp_path, where, change, message):
    config = experiment_config("shapes,smoke=True")
    with config.unlocked():
        if where == "variants":
            config.variants.update(change)
        elif where == "decoder":
            config.grain.decoder.update(change)
        elif where == "evals":
            config.evals.descriptions_novel.update(change)
        else:
            config[where].update(change)
    config.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=message):
        grain_clip.grain_task(config, tmp_path / "work")
    assert not (tmp_path / "cache").exists()


def test_export_reads_back_into_the_same_model(tmp_path):
    from vlm_jax.models import clip as clip_models
    from vlm_jax.models.regions import GrainCLIP, RegionDecoderConfig

    config = clip_models.tiny()
    model = GrainCLIP(clip_models.CLIP(config, rngs=nnx.Rngs(0)), RegionDecoderConfig(
        token_width=config.vision.width, embed_dim=config.embed_dim, width=32, depth=1, heads=4, mlp_dim=64,
        num_regions=3), rngs=nnx.Rngs(1))
    method = grain_clip.GrainMethod(tokenizer=_tokenizer(config.text.context_length),
                                    preprocess=PreprocessSpec.clip(config.vision.image_size))
    method.export(model, tmp_path)
    loaded, pretrained = grain_clip.load_grain(tmp_path / "export")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, config.vision.image_size,
                                                                config.vision.image_size, 3)), jnp.float32)
    for got, want in zip(loaded.encode_regions(images), model.encode_regions(images)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-6)
    assert pretrained.preprocess.image_size == config.vision.image_size


@pytest.mark.slow
def test_smoke_run_annotates_trains_every_row_and_prints_the_table(tmp_path, capsys):
    config = experiment_config("shapes,smoke=True")
    config.cache_dir = str(tmp_path / "cache")
    config.data_dir = str(tmp_path / "tfds")
    results = grain_clip.grain_task(config, tmp_path / "work")
    table = capsys.readouterr().out
    labels = [config.variant_labels[row] for row in ROWS]
    assert [table.index(label) for label in labels] == sorted(table.index(label) for label in labels)
    for row in ROWS:
        assert 0.0 <= results[f"{row}/descriptions_novel/top1"] <= 1.0
    # The region columns exist for GRAIN rows and are "-" (nan) for the CLIP row and the baseline.
    assert np.isnan(results["clip/regions/mean_iou"]) and np.isnan(results["baseline/regions/mean_iou"])
    assert 0.0 <= results["grain/regions/mean_iou"] <= 1.0
    summary = json.loads((tmp_path / "work" / "annotations" / "summary.json").read_text())
    assert summary["written"] == config.data.max_examples
    assert len(read_annotations(str(tmp_path / "work" / "annotations"))) == summary["kept"]
    # Without the box loss the matched boxes' L1 still is logged but has no weight in the loss.
    no_box = [json.loads(line) for line in
              (tmp_path / "work" / "runs" / "no_box" / "seed_0" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/box_l1" in record for record in no_box)
    clip_run = (tmp_path / "work" / "runs" / "clip" / "seed_0" / "metrics.jsonl").read_text()
    assert "train/box_l1" not in clip_run
