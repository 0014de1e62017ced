"""Classification by description and the region evaluator, on hand-set embeddings worked out by hand."""

from __future__ import annotations

import io
import json
import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.config_lib import ConfigError, require_eval_files
from vlm_jax.evaluate import descriptions, suite
from vlm_jax.evaluate.common import get_evaluator
from vlm_jax.evaluate.descriptions import (DescriptionsEvaluator, class_texts, description_text, global_scores,
                                           read_descriptors, region_scores, write_descriptors)
from vlm_jax.evaluate.region_boxes import RegionsEvaluator, match_regions
from vlm_jax.evaluate.views import View, pixel_view


def _unit(vector):
    vector = np.asarray(vector, np.float32)
    return vector / np.linalg.norm(vector)


def _text_vector(text: str, dim: int = 6) -> np.ndarray:
    """A fixed random unit vector per text."""
    return _unit(np.random.default_rng(zlib.crc32(text.encode())).normal(size=dim))


def _view(table=None, regions=None):
    """Images are batch["image_embedding"]; a prompt is table[text] (else its fixed random vector)."""
    table = table or {}
    return View(images=lambda batch: np.asarray(batch["image_embedding"], np.float32), captions=None,
                prompts=lambda texts: np.stack([table.get(t, _text_vector(t)) for t in texts]).astype(np.float32),
                regions=regions)


def _angle(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0]


# -- the text rule ----------------------------------------------------------------------------------

def test_description_text_rule():
    assert description_text("a photo of a {}.", "heron", "long neck") == "a photo of a heron, which has long neck"
    assert description_text("a photo of a {}.", "heron", "is grey") == "a photo of a heron, which is grey"
    for verb in ("has", "are", "have", "can", "looks", "Is"):
        assert description_text("a {}", "cat", f"{verb} x") == f"a cat, which {verb} x"
    # A word that merely starts like a verb is not one.
    assert description_text("a {}", "cat", "island fur") == "a cat, which has island fur"
    assert description_text("itap of a {c} .", "dog", " can swim ") == "itap of a dog, which can swim"
    assert description_text(lambda c: f"the {c}.", "owl", "big eyes") == "the owl, which has big eyes"


def test_class_texts_order_and_errors():
    texts = class_texts(["cat", "dog"], ["a {}.", "the {}"], {"cat": ["is small", "whiskers"], "dog": ["barks"]})
    assert texts == [["a cat, which is small", "the cat, which is small", "a cat, which has whiskers",
                      "the cat, which has whiskers"], ["a dog, which has barks", "the dog, which has barks"]]
    assert class_texts(["cat"], ["a {}."], None) == [["a cat."]]
    with pytest.raises(ValueError, match=r"classes \['dog'\]"):
        class_texts(["cat", "dog"], ["a {}"], {"cat": ["x"]})
    with pytest.raises(ValueError, match="no descriptors"):
        class_texts(["cat"], ["a {}"], {"cat": []})
    with pytest.raises(ValueError, match="non-empty strings"):
        class_texts(["cat"], ["a {}"], {"cat": "is small"})
    with pytest.raises(ValueError, match="one per class"):
        class_texts(["cat", "dog"], ["a {}"], [["x"]])


# -- scores -----------------------------------------------------------------------------------------

def test_class_score_is_the_mean_of_similarities_not_the_similarity_of_the_mean():
    # Class "wide" has two texts at +-60 degrees from the image: mean similarity 0.5, but their
    # normalized mean points at the image (similarity 1). Class "near" has one text at similarity 0.7.
    table = {"a wide, which is left": _unit(_angle(60)), "a wide, which is right": _unit(_angle(-60)),
             "a near, which is close": _unit([0.7, math.sqrt(1 - 0.49), 0.0])}
    evaluator = DescriptionsEvaluator(
        data=lambda: [{"image_embedding": np.array([[1.0, 0.0, 0.0]], np.float32), "label": np.array([1])}],
        class_names=["wide", "near"], templates=["a {}."],
        descriptors={"wide": ["is left", "is right"], "near": ["is close"]})
    metrics = evaluator.run(_view(table))
    assert metrics["top1"] == 1.0     # "near" wins: 0.7 > 0.5 (the normalized mean would give "wide" 1.0)
    scores = global_scores(np.array([[1.0, 0.0, 0.0]]), np.stack(list(table.values())), [2, 1])
    np.testing.assert_allclose(scores, [[0.5, 0.7]], atol=1e-6)


def test_global_and_region_scores_against_loops():
    rng = np.random.default_rng(0)
    counts = [3, 1, 4]
    texts = np.stack([_unit(v) for v in rng.normal(size=(sum(counts), 5))])
    images = np.stack([_unit(v) for v in rng.normal(size=(2, 5))])
    regions = np.stack([[_unit(v) for v in rng.normal(size=(3, 5))] for _ in range(2)])
    starts = np.cumsum([0, *counts])
    want_global = np.zeros((2, 3))
    want_region = np.zeros((2, 3))
    for b in range(2):
        for c in range(3):
            group = range(starts[c], starts[c + 1])
            want_global[b, c] = np.mean([images[b] @ texts[t] for t in group])
            want_region[b, c] = np.mean([max(regions[b, q] @ texts[t] for t in group) for q in range(3)])
    np.testing.assert_allclose(global_scores(images, texts, counts), want_global, atol=1e-5)
    np.testing.assert_allclose(region_scores(regions, texts, counts), want_region, atol=1e-5)
    # Chunked over classes (a chunk smaller than one batch of similarities) gives the same.
    descriptions_chunk = descriptions._REGION_CHUNK
    try:
        descriptions._REGION_CHUNK = 7
        np.testing.assert_allclose(region_scores(regions, texts, counts), want_region, atol=1e-5)
    finally:
        descriptions._REGION_CHUNK = descriptions_chunk


def _region_setup():
    """Two classes, one text each; the image embedding prefers class 0 (0.6 vs 0.5), its two region
    queries prefer class 1: region score class 0 = (0.0 + 0.2) / 2 = 0.1, class 1 = (0.9 + 0.5) / 2 = 0.7."""
    e0, e1 = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    table = {"a zero, which is a": e0.astype(np.float32), "a one, which is b": e1.astype(np.float32)}
    image = _unit([0.6, 0.5, math.sqrt(1 - 0.61), 0.0])
    region_a = np.array([0.0, 0.9, math.sqrt(1 - 0.81), 0.0])
    region_b = np.array([0.2, 0.5, 0.0, math.sqrt(1 - 0.29)])
    batch = {"image_embedding": image[None], "label": np.array([1]),
             "regions": np.stack([region_a, region_b])[None].astype(np.float32)}
    regions = lambda batch: (np.zeros((1, 2, 4), np.float32), batch["regions"])  # noqa: E731
    return table, batch, regions


@pytest.mark.parametrize("weight,top1", [(0.0, 0.0), (0.1, 0.0), (0.5, 1.0), (1.0, 1.0)])
def test_region_weight_mixes_global_and_region_scores(weight, top1):
    table, batch, regions = _region_setup()
    evaluator = DescriptionsEvaluator(data=lambda: [batch], class_names=["zero", "one"], templates=["a {}"],
                                      descriptors={"zero": ["is a"], "one": ["is b"]}, region_weight=weight)
    metrics = evaluator.run(_view(table, regions))
    # final(class 0) = (1-w) 0.6 + w 0.1, final(class 1) = (1-w) 0.5 + w 0.7: class 1 wins for w > 1/3.
    assert metrics["top1"] == top1
    if weight > 0:
        assert metrics["top1_global"] == 0.0


def test_region_weight_without_regions_and_out_of_range_are_errors():
    table, batch, _ = _region_setup()
    evaluator = DescriptionsEvaluator(data=lambda: [batch], class_names=["zero", "one"], templates=["a {}"],
                                      descriptors={"zero": ["is a"], "one": ["is b"]}, region_weight=0.5)
    with pytest.raises(ValueError, match="region_weight=0.5 needs region embeddings"):
        evaluator.run(_view(table))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DescriptionsEvaluator(data=lambda: [], class_names=["zero"], templates=["a {}"], descriptors=[["x"]],
                              region_weight=1.5)


def test_per_subset_top1_and_mask():
    # Image embedding = the unit vector of its predicted class; 4 classes, one text each.
    names = ["c0", "c1", "c2", "c3"]
    table = {f"a {n}, which is x": np.eye(4, dtype=np.float32)[i] for i, n in enumerate(names)}
    predicted = np.array([0, 1, 1, 3, 2, 0])
    labels = np.array([0, 1, 2, 3, 2, 3])   # right: rows 0, 1, 3, 4; the last row is masked out
    batch = {"image_embedding": np.eye(4, dtype=np.float32)[predicted], "label": labels,
             "mask": np.array([1, 1, 1, 1, 1, 0], bool)}
    evaluator = get_evaluator("descriptions", data=lambda: [batch], class_names=names, templates=["a {}."],
                              descriptors={n: ["is x"] for n in names},
                              subsets={"common": [0, 1], "novel": [2, 3]}, prefix="d/")
    metrics = evaluator.run(_view(table))
    assert metrics["d/top1"] == pytest.approx(4 / 5)
    assert metrics["d/top1_common"] == 1.0
    assert metrics["d/top1_novel"] == pytest.approx(2 / 3)
    assert metrics["d/evaluated"] == 5 and metrics["d/skipped"] == 0
    assert metrics["d/top5"] == 1.0


# -- descriptor files -------------------------------------------------------------------------------

class FakeMLLM:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        self.calls.append((list(images), list(prompts), max_tokens, schema))
        return [self.answers[prompt.split("distinguishing a ")[1].split(" in a photo")[0]] for prompt in prompts]


def test_write_descriptors_round_trip(tmp_path):
    mllm = FakeMLLM({"cat": '{"descriptors": ["whiskers", "is small", "Whiskers", "pointy ears"]}',
                     "dog": "Sure:\n1. floppy ears\n2. can fetch\n", "owl": '["big eyes"]'})
    path = tmp_path / "sub" / "descriptors.json"
    written = write_descriptors(["cat", "dog", "owl"], mllm, str(path), max_descriptors=2, batch_size=2)
    assert written == {"cat": ["whiskers", "is small"], "dog": ["floppy ears", "can fetch"], "owl": ["big eyes"]}
    assert json.loads(path.read_text()) == written
    assert read_descriptors(str(path), ["dog", "cat"]) == {"dog": ["floppy ears", "can fetch"],
                                                          "cat": ["whiskers", "is small"]}
    assert len(mllm.calls) == 2 and mllm.calls[0][0] == [None, None] and mllm.calls[1][0] == [None]
    assert mllm.calls[0][3] == descriptions.DESCRIPTOR_SCHEMA
    assert [p for call in mllm.calls for p in call[1]][2].startswith("What are useful visual features for "
                                                                     "distinguishing a owl")


def test_write_descriptors_unparseable_answer_writes_nothing(tmp_path):
    mllm = FakeMLLM({"cat": '["whiskers"]', "dog": "I cannot help with that."})
    path = tmp_path / "d.json"
    with pytest.raises(ValueError, match=r"1 of 2 descriptor answers held no list \('dog'"):
        write_descriptors(["cat", "dog"], mllm, str(path))
    assert not path.exists()


@pytest.mark.parametrize("content,error", [
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
    ('{"cat": ["x"]}', r"classes \['dog'\]"),
    ('{"cat": ["x"], "dog": []}', "'dog' has no descriptors"),
    ('{"cat": ["x"], "dog": [3]}', "non-empty strings"),
])
def test_read_descriptors_errors(tmp_path, content, error):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=error):
        read_descriptors(str(path), ["cat", "dog"])


def test_read_descriptors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_descriptors"):
        read_descriptors(str(tmp_path / "none.json"))


def test_shapes_world_builder_descriptors():
    from vlm_jax.data import shapes_world
    from vlm_jax.data.shapes_world import world

    names = shapes_world.class_names()
    table = descriptions.shapes_world_descriptors(names, "attributes")
    shape, colour, pattern = world.entity_attributes(37)
    assert table[names[37]] == [f"is {colour}", f"is {pattern}", f"is shaped like a {shape}"]
    assert len({tuple(v) for v in table.values()}) == world.NUM_ENTITIES   # every entity described differently
    whole = descriptions.shapes_world_descriptors(names)
    assert whole[names[37]] == [f"is a {pattern} {colour} {shape}"]
    # The description is the one the dataset defines the name by ("a zorvid is a striped red star").
    assert world.make_entities(0, 64, 32)[37].description == f"a {names[37]} {whole[names[37]][0]}"
    spec = suite.eval_spec(type="descriptions", classes="shapes_world", descriptors="builder:attributes")
    class_names, texts = suite.class_names_and_texts(spec)
    assert class_names == list(names) and len(texts[0]) == 3 * len(shapes_world.prompt_templates())
    assert texts[37][0] == f"a photo of a {names[37]}, which is {colour}"
    spec = suite.eval_spec(type="descriptions", classes="shapes_world", descriptors="builder")
    _, texts = suite.class_names_and_texts(spec)
    assert texts[37][0] == f"a photo of a {names[37]}, which is a {pattern} {colour} {shape}"


def test_among_scores_a_closed_set_of_classes():
    # Three classes; the images of classes 1 and 2 scored among {1, 2} only.
    class View:
        regions = None

        @staticmethod
        def prompts(texts):
            return np.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)[[int(t[-1]) for t in texts]]

        @staticmethod
        def images(batch):
            return batch["x"]

    x = np.asarray([[1.0, 0.0], [0.0, 1.0], [0.97, 0.243], [0.6, 0.8]], np.float32)
    batch = {"x": x, "label": np.asarray([0, 1, 2, 2])}
    evaluator = descriptions.DescriptionsEvaluator(lambda: [batch], ["c0", "c1", "c2"], ["{}"], None)
    everything = evaluator.run(View)
    closed = descriptions.DescriptionsEvaluator(lambda: [batch], ["c0", "c1", "c2"], ["{}"], None,
                                                among=[1, 2]).run(View)
    # Among all three, image 2 ([0.97, 0.243]) goes to class 0; among {1, 2} it goes to class 2.
    assert everything["top1"] == 0.75 and closed["top1"] == 1.0
    assert closed["evaluated"] == 3
    from vlm_jax.evaluate.zero_shot import ZeroShotEvaluator

    assert ZeroShotEvaluator(lambda: [batch], ["c0", "c1", "c2"], ["{}"]).run(View)["top1"] == 0.75
    assert ZeroShotEvaluator(lambda: [batch], ["c0", "c1", "c2"], ["{}"], among=[1, 2]).run(View)["top1"] == 1.0


def test_among_is_checked_before_any_work():
    spec = dict(classes="shapes_world", subsets="frequency")
    suite.check_among({"x": suite.eval_spec(type="zero_shot", among="novel", **spec)})
    with pytest.raises(ConfigError, match="among='novl' is not one of the class subsets"):
        suite.check_among({"x": suite.eval_spec(type="descriptions", among="novl", **spec)})
    with pytest.raises(ConfigError, match="applies to zero_shot and descriptions specs, not 'retrieval'"):
        suite.check_among({"x": suite.eval_spec(type="retrieval", among="novel")})


# -- the suite --------------------------------------------------------------------------------------

def _png(value):
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_suite_builds_a_descriptions_evaluator_from_a_descriptor_file(tmp_path):
    from vlm_jax.data import datasets
    from vlm_jax.data.preprocess import PreprocessSpec

    names = datasets.get("cifar10").class_names()
    lines = []
    for row in range(4):
        (tmp_path / f"{row}.png").write_bytes(_png(row))
        lines.append(json.dumps({"image_path": f"{row}.png", "label": row}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "desc.json").write_text(json.dumps({name: [f"is {name}-like"] for name in names}))
    spec = {"type": "descriptions", "classes": "cifar10", "descriptors": str(tmp_path / "desc.json"),
            "templates": ("a photo of a {}.",), "batch_size": 3,
            "data": {"source": "manifest", "paths": str(tmp_path / "data.jsonl"), "label_key": "label"}}
    require_eval_files({"d": spec})
    eye = np.eye(len(names), dtype=np.float32)
    class_of = {f"a photo of a {n}, which is {n}-like": c for c, n in enumerate(names)}
    # Labels 0, 1, 2, 3 embed as classes 0, 1, 0, 5; the prompt of class c as class c.
    view = View(images=lambda batch: eye[np.array([0, 1, 0, 5])[np.asarray(batch["label"])]], captions=None,
                prompts=lambda texts: eye[[class_of[t] for t in texts]])
    evaluator = suite.build_evaluator("d", spec, PreprocessSpec(image_size=8), None,
                                      views=lambda model, inputs: {"clip": view})
    metrics = evaluator.run(None)
    # Rows 0 and 1 right.
    assert metrics["d/top1"] == 0.5 and metrics["d/evaluated"] == 4


def test_suite_rejects_bad_descriptions_specs(tmp_path):
    from vlm_jax.data.preprocess import PreprocessSpec

    preprocess = PreprocessSpec(image_size=8)
    with pytest.raises(ConfigError, match=r"evals.d.descriptor is not a field; did you mean evals.d.descriptors"):
        suite.build_evaluator("d", {"type": "descriptions", "descriptor": "builder"}, preprocess, None)
    with pytest.raises(ConfigError, match="region_wieght is not a field"):
        suite.eval_spec(type="descriptions", region_wieght=0.5)
    with pytest.raises(ConfigError, match="mllm.bakend is not a field"):
        suite.build_evaluator("d", {"type": "descriptions", "mllm": {"bakend": "openai"}}, preprocess, None)
    with pytest.raises(ConfigError, match="evals.d.descriptors"):
        require_eval_files({"d": {"type": "descriptions", "descriptors": str(tmp_path / "missing.json")}})
    require_eval_files({"d": {"type": "descriptions", "descriptors": "mllm:" + str(tmp_path / "later.json")},
                        "b": {"type": "descriptions", "descriptors": "builder"}})
    spec = suite.eval_spec(type="descriptions", classes="cifar10", descriptors="builder")
    with pytest.raises(ConfigError, match="Shapes World only"):
        suite.class_names_and_texts(spec, "d")
    spec = suite.eval_spec(type="descriptions", classes="cifar10", descriptors="mllm:" + str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match="backend='openai'"):
        suite.class_names_and_texts(spec, "d")
    with pytest.raises(ConfigError, match="stored_dir"):
        suite.build_evaluator("r", {"type": "regions", "stored_dir": str(tmp_path)}, preprocess, None)


# -- the regions evaluator --------------------------------------------------------------------------

def _region_batch():
    """Two images, R = 3 annotated slots, Q = 4 predictions in shuffled order.

    Image 0: gt A (0.5, 0.5, 0.2, 0.2) predicted exactly (IoU 1) by query 2; gt B (0.3, 0.3, 0.2, 0.2)
    by query 0 shifted 0.05 in x (overlap 0.15 x 0.2 = 0.03, union 0.05: IoU 0.6); slot 3 padding.
    Image 1: gt C (0.3, 0.3, 0.2, 0.2) by query 3 shifted 0.1 in x (IoU 0.02 / 0.06 = 1/3).
    Image 2 is padding (mask False), its boxes garbage.
    """
    far = [0.9, 0.9, 0.05, 0.05]
    pred = np.array([
        [[0.35, 0.3, 0.2, 0.2], far, [0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.05, 0.05]],
        [far, [0.1, 0.9, 0.05, 0.05], [0.9, 0.1, 0.05, 0.05], [0.4, 0.3, 0.2, 0.2]],
        [far, far, far, far],
    ], np.float32)
    gt = np.array([
        [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]],
        [[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]],
        [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]],
    ], np.float32)
    box_mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    texts = np.array([["a red circle", "a blue star", ""], [b"a red circle", "junk", ""], ["x", "y", "z"]],
                     dtype=object)
    # Region embeddings: query 2 of image 0 -> "a red circle" (right), query 0 of image 0 -> "a red
    # circle" (wrong: its box is "a blue star"), query 3 of image 1 -> "a red circle" (right).
    red, blue = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    other = np.array([0, 0, 1.0])
    regions = np.array([[red, other, red, other], [other, other, other, red], [other] * 4], np.float32)
    batch = {"boxes": gt, "box_mask": box_mask, "region_texts": texts, "mask": np.array([1, 1, 0], bool),
             "pred": pred, "regions": regions}
    table = {"a red circle": red.astype(np.float32), "a blue star": blue.astype(np.float32)}
    return batch, table


def test_regions_evaluator_by_hand():
    batch, table = _region_batch()
    view = View(images=None, captions=None, prompts=lambda texts: np.stack([table[t] for t in texts]),
                regions=lambda batch: (batch["pred"], batch["regions"]))
    index, iou = match_regions(batch["pred"], batch["boxes"], batch["box_mask"] & batch["mask"][:, None])
    assert index[0, 0] == 2 and index[0, 1] == 0 and index[1, 0] == 3
    np.testing.assert_allclose([iou[0, 0], iou[0, 1], iou[1, 0]], [1.0, 0.6, 1 / 3], atol=1e-5)
    metrics = RegionsEvaluator(data=lambda: [batch], prefix="r/").run(view)
    assert metrics["r/mean_iou"] == pytest.approx((1.0 + 0.6 + 1 / 3) / 3, abs=1e-5)
    assert metrics["r/recall@0.5"] == pytest.approx(2 / 3)
    assert metrics["r/description_accuracy"] == pytest.approx(2 / 3)
    assert metrics["r/regions"] == 3 and metrics["r/evaluated"] == 2


def test_regions_evaluator_errors():
    batch, table = _region_batch()
    view = View(images=None, captions=None, prompts=lambda texts: np.stack([table[t] for t in texts]),
                regions=lambda batch: (batch["pred"][:, :2], batch["regions"][:, :2]))
    with pytest.raises(ValueError, match="3 annotated boxes per image but the model predicts 2"):
        RegionsEvaluator(data=lambda: [batch]).run(view)
    with pytest.raises(ValueError, match="needs a view with region boxes"):
        RegionsEvaluator(data=lambda: [batch]).run(View(images=None, captions=None, prompts=None))
    with pytest.raises(ValueError, match="region_texts"):
        RegionsEvaluator(data=lambda: [{"boxes": batch["boxes"], "box_mask": batch["box_mask"]}]).run(
            View(images=None, captions=None, prompts=None, regions=lambda b: (None, None)))


# -- views ------------------------------------------------------------------------------------------

class RegionLookup(nnx.Module):
    """encode_image / encode_regions from tables indexed by pixel [0, 0, 0]."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = nnx.Param(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32))
        self.boxes = nnx.Param(jnp.asarray(rng.uniform(size=(4, 2, 4)), jnp.float32))
        self.regions = nnx.Param(jnp.asarray(rng.normal(size=(4, 2, 3)) * 3, jnp.float32))

    def encode_image(self, pixels):
        return self.images[pixels[:, 0, 0, 0].astype(jnp.int32)]

    def encode_text(self, ids):
        return jnp.ones((ids.shape[0], 3))

    def encode_regions(self, pixels):
        index = pixels[:, 0, 0, 0].astype(jnp.int32)
        return self.boxes[index], self.regions[index]


def test_pixel_view_offers_regions_and_refined_keeps_them():
    model = RegionLookup()
    images = np.zeros((3, 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = [3, 0, 2]
    view = pixel_view(model, lambda texts: np.zeros((len(texts), 2), np.int32), batch_size=2)
    boxes, embeddings = view.regions({"image": images})
    np.testing.assert_allclose(boxes, np.asarray(model.boxes[...])[[3, 0, 2]], atol=1e-6)
    raw = np.asarray(model.regions[...])[[3, 0, 2]]
    np.testing.assert_allclose(embeddings, raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-5)
    refined = view.refined(lambda x: -x, None, batch_size=2)
    assert refined.regions is view.regions

    class Plain(nnx.Module):
        def encode_image(self, pixels):
            return pixels[:, 0, 0]

        def encode_text(self, ids):
            return ids

    assert pixel_view(Plain(), lambda texts: None).regions is None
