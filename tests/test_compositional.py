"""Compositional benchmarks on small files in each benchmark's published format, scored by a view whose
embeddings are known: images embed as their mean colour, texts as hand-set vectors, so every metric
below is worked out by hand."""

from __future__ import annotations

import collections
import json

import numpy as np
import PIL.Image
import pytest

from vlm_jax.config_lib import BENCHMARK_FILES, ConfigError, require_eval_files
from vlm_jax.data.preprocess import PreprocessSpec
from vlm_jax.evaluate import compositional, suite
from vlm_jax.evaluate.compositional import SYMMETRIC_RELATIONS, lexicon_tagger, order_options, pre_caption
from vlm_jax.evaluate.views import View

# Squash to 4 x 4 with nearest resampling and no normalization: a solid image keeps its colour / 255.
PREPROCESS = PreprocessSpec(image_size=4, resize="squash", crop=False, mean=(0, 0, 0), std=(1, 1, 1),
                            resample="nearest")
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
VECTORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}


def _unit(vectors):
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


class FakeView:
    """images: the unit mean colour of each preprocessed image; prompts: `texts[text]` (or the vector
    of the text's first colour word). Records the rows of every image batch."""

    def __init__(self, texts=None):
        self.texts, self.image_batches = dict(texts or {}), []

    def _text(self, text):
        if text in self.texts:
            return self.texts[text]
        return next(VECTORS[word] for word in text.split() if word in VECTORS)

    def view(self):
        def images(batch):
            self.image_batches.append(len(batch["image"]))
            return _unit(batch["image"].mean(axis=(1, 2)))

        return View(images=images, captions=None, prompts=lambda texts: _unit([self._text(t) for t in texts]))


def _png(path, colour, size=8, mode="RGB", box=None, box_colour=None):
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = colour
    if box is not None:
        x, y, w, h = box
        pixels[y : y + h, x : x + w] = box_colour
    image = PIL.Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("RGBA") if mode == "RGBA" else image).save(path)


def _build(name, spec, fake, tokenizer=None):
    evaluator = suite.build_evaluator(name, spec, PREPROCESS, tokenizer,
                                      views=lambda model, inputs: {"clip": fake.view()})
    return {key.removeprefix(f"{name}/"): value for key, value in evaluator.run(None).items()}


def test_sugarcrepe_per_category_group_means_with_sparse_keys_and_skipped_images(tmp_path):
    _png(tmp_path / "val2017" / "red.jpg", RED)
    _png(tmp_path / "val2017" / "green.jpg", GREEN)
    (tmp_path / "val2017" / "broken.jpg").write_bytes(b"not an image")

    def entry(filename, caption, negative):
        return {"filename": filename, "caption": caption, "negative_caption": negative}

    files = {
        "add_obj": {"0": entry("red.jpg", "a red cup", "a green cup"),  # right
                    "7": entry("green.jpg", "a red cup", "a green cup"),  # wrong
                    "12": entry("missing.jpg", "a red cup", "a green cup")},  # skipped: no file
        "replace_att": {"3": entry("green.jpg", "green grass", "blue grass"), "5": entry("red.jpg", "red", "blue")},
        "swap_obj": {"1": entry("red.jpg", "blue sky", "red sky"), "2": entry("broken.jpg", "red", "blue")},
    }
    for category, entries in files.items():
        (tmp_path / f"{category}.json").write_text(json.dumps(entries))
    fake = FakeView()
    metrics = _build("sugarcrepe", {"type": "sugarcrepe", "path": str(tmp_path), "batch_size": 2}, fake)
    assert metrics == {"add_obj": 0.5, "replace_att": 1.0, "swap_obj": 0.0, "mean": 0.5, "add": 0.5,
                       "replace": 1.0, "swap": 0.0, "evaluated": 5.0, "skipped": 2.0,
                       "skipped/corrupt_image": 1.0, "skipped/missing_image": 1.0}
    assert sum(fake.image_batches) == 2  # each distinct image embedded once, in batches of at most 2

    only = _build("s", {"type": "sugarcrepe", "path": str(tmp_path), "categories": ("replace_att",)}, FakeView())
    assert only["replace_att"] == 1.0 and only["replace"] == 1.0 and "add" not in only and only["evaluated"] == 2
    with pytest.raises(ConfigError, match="swap_att.json"):
        _build("s", {"type": "sugarcrepe", "path": str(tmp_path), "categories": ("swap_att",)}, FakeView())


def _vg_entry(image, relation, true, false, box=(2, 2, 4, 4), **extra):
    x, y, w, h = box
    return {"image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h, "true_caption": true,
            "false_caption": false, "relation_name": relation, **extra}


def test_aro_relation_crops_to_the_box_and_leaves_symmetric_relations_out_of_the_macro(tmp_path):
    # Both images are blue but for a 4 x 4 box (a quarter of them): red in a.png, green in b.png. The
    # whole image would score blue highest; only its crop scores the box colour.
    _png(tmp_path / "images" / "a.png", BLUE, box=(2, 2, 4, 4), box_colour=RED)
    _png(tmp_path / "images" / "b.png", BLUE, box=(2, 2, 4, 4), box_colour=GREEN)
    assert {"next to", "near", "with", "by", "of"} <= SYMMETRIC_RELATIONS
    assert not {"on", "holding"} & SYMMETRIC_RELATIONS
    entries = [
        _vg_entry("a.png", "on", "the red", "the blue"),  # right on the crop (on the whole image: wrong)
        _vg_entry("a.png", "on", "the red", "the green"),  # right
        _vg_entry("b.png", "on", "the red", "the green"),  # wrong
        _vg_entry("b.png", "holding", "the green", "the blue"),  # right on the crop (whole image: wrong)
        _vg_entry("a.png", "next to", "the blue", "the red"),  # wrong, but a symmetric relation
        _vg_entry("a.png", "next to", "the blue", "the red x"),
    ]
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps(entries))
    metrics = _build("vgr", {"type": "aro_relation", "path": str(tmp_path)}, FakeView())
    # Macro: "on" 2/3 and "holding" 1/1 averaged; micro: 3 of the 4 kept cases.
    assert metrics["macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["micro"] == pytest.approx(3 / 4)
    assert metrics["relations"] == 2 and metrics["evaluated"] == 6 and metrics["skipped"] == 0


def test_aro_attribution_averages_the_pairs_with_at_least_25_cases(tmp_path):
    _png(tmp_path / "images" / "red.png", RED)
    right = lambda pair: _vg_entry("red.png", "", "red", "blue", (0, 0, 8, 8), attributes=pair)  # noqa: E731
    wrong = lambda pair: _vg_entry("red.png", "", "blue", "red", (0, 0, 8, 8), attributes=pair)  # noqa: E731
    entries = ([right(["wet", "dry"])] * 20 + [wrong(["wet", "dry"])] * 5  # 25 cases: kept, 0.8
               + [right(["big", "small"])] * 30  # 30 cases: kept, 1.0
               + [wrong(["old", "new"])] * 24)  # 24 cases: left out
    (tmp_path / "visual_genome_attribution.json").write_text(json.dumps(entries))
    metrics = _build("vga", {"type": "aro_attribution", "path": str(tmp_path / "visual_genome_attribution.json")},
                     FakeView())
    assert metrics["pairs"] == 2 and metrics["evaluated"] == 79
    assert metrics["macro"] == pytest.approx((0.8 + 1.0) / 2)
    assert metrics["micro"] == pytest.approx(50 / 55)


def test_order_options_follow_aros_rules_with_a_fixed_tagger():
    nouns, adjectives = {"dog", "ball", "grass", "park"}, {"small", "red", "green", "sunny"}
    tagger = lambda tokens: ["NN" if t in nouns else "JJ" if t in adjectives else "IN" for t in tokens]  # noqa: E731
    caption = "a small dog chases a red ball on the green grass in the sunny park"
    words = caption.split()
    options = order_options(caption, np.random.default_rng(3), tagger)
    original, nouns_adjectives, others, within, across = (option.split() for option in options)
    assert options[0] == caption and len(options) == 5 and len(set(options)) == 5
    assert all(sorted(option.split()) == sorted(words) for option in options)  # the same words, reordered
    kinds = tagger(words)
    assert tagger(nouns_adjectives) == kinds  # nouns move among noun positions, adjectives among theirs
    assert [w for w, k in zip(nouns_adjectives, kinds) if k == "IN"] == [w for w, k in zip(words, kinds) if k == "IN"]
    assert [w for w, k in zip(others, kinds) if k != "IN"] == [w for w, k in zip(words, kinds) if k != "IN"]
    trigrams = [words[i : i + 3] for i in range(0, len(words), 3)]
    assert [sorted(within[i : i + 3]) for i in range(0, len(words), 3)] == [sorted(t) for t in trigrams]
    assert sorted(tuple(across[i : i + len(t)]) for i, t in zip(range(0, len(words), 3), trigrams)) == sorted(
        map(tuple, trigrams)) and across != words
    assert options == order_options(caption, np.random.default_rng(3), tagger)  # seeded

    # ARO cleans every option (lower case, . ! " ( ) * # : ; ~ dropped) and cuts it to 30 words.
    long_caption = "A Dog. " + " ".join(f"w{i}" for i in range(40)) + "!"
    for option in order_options(long_caption, np.random.default_rng(0), tagger):
        assert len(option.split()) == 30 and "." not in option and option == option.lower()
    assert order_options(long_caption, np.random.default_rng(0))[0] == pre_caption(long_caption)
    assert pre_caption(long_caption).split()[:3] == ["a", "dog", "w0"]
    assert lexicon_tagger(["a", "small", "dog", "is", "running", "on", "the", "grass", "."]) == [
        "X", "JJ", "NN", "X", "X", "X", "X", "NN", "X"]


def test_order_evaluator_scores_the_original_against_its_four_perturbations(tmp_path):
    _png(tmp_path / "val2014" / "red.png", RED)
    _png(tmp_path / "val2014" / "green.png", GREEN)
    caption = "a red dog runs on wet green grass near two tall trees"
    entries = [{"image": "val2014/red.png", "caption": [caption]},  # the original (red) wins: right
               {"image": "val2014/green.png", "caption": [caption, "dog"]},  # perturbations (green) win: wrong;
               # "dog" has five equal options: a tie goes to the original, as ARO's argmax
               {"image": "val2014/missing.png", "caption": ["a cat"]}]
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(entries))

    class OrderView(FakeView):
        def _text(self, text):
            return VECTORS["red"] if text in (caption, "dog") else VECTORS["green"]

    spec = {"type": "coco_order", "path": str(tmp_path / "coco_karpathy_test.json"), "seed": 1}
    evaluator = suite.build_evaluator("order", spec, PREPROCESS, None)
    assert [len(set(case.texts)) for case in evaluator.evaluator.cases()] == [5, 5, 1, 1]
    metrics = _build("order", spec, OrderView())
    assert metrics == {"accuracy": pytest.approx(2 / 3), "evaluated": 3.0, "skipped": 1.0,
                       "skipped/missing_image": 1.0}
    flickr = dict(spec, type="flickr30k_order")
    assert _build("order", flickr, OrderView())["accuracy"] == pytest.approx(2 / 3)


def test_winoground_text_image_and_group_scores_on_rgba_images(tmp_path):
    orange = (255, 128, 0)
    reddish = (1, 0.5, 0)
    examples = [  # (image 0, image 1, caption 0 vector, caption 1 vector): text, image
        (RED, GREEN, VECTORS["red"], VECTORS["green"]),  # both right
        (RED, GREEN, VECTORS["red"], reddish),  # text right; image wrong: s(c1, i1) .45 < s(c1, i0) .89
        (RED, orange, VECTORS["red"], VECTORS["green"]),  # image right; text wrong: s(c1, i1) .45 < s(c0, i1) .89
        (RED, GREEN, VECTORS["green"], VECTORS["red"]),  # both wrong
    ]
    lines, texts = [], {}
    for index, (colour_0, colour_1, vector_0, vector_1) in enumerate(examples):
        _png(tmp_path / "images" / f"ex_{index}_img_0.png", colour_0, mode="RGBA")
        _png(tmp_path / "images" / f"ex_{index}_img_1.png", colour_1, mode="RGBA" if index % 2 else "RGB")
        texts[f"caption {index} 0"], texts[f"caption {index} 1"] = vector_0, vector_1
        lines.append({"id": index, "image_0": f"ex_{index}_img_0", "image_1": f"ex_{index}_img_1",
                      "caption_0": f"caption {index} 0", "caption_1": f"caption {index} 1", "tag": "Object",
                      "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object"})
    lines.append({**lines[0], "id": 4, "image_1": "ex_4_img_1"})  # no such image: skipped
    assert PIL.Image.open(tmp_path / "images" / "ex_0_img_0.png").mode == "RGBA"
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = _build("wino", {"type": "winoground", "path": str(tmp_path)}, FakeView(texts))
    assert metrics == {"text": 0.5, "image": 0.5, "group": 0.25, "evaluated": 4.0, "skipped": 1.0,
                       "skipped/missing_image": 1.0}


def _word_tokenizer(words, context_length):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from vlm_jax.data.tokenizer import Tokenizer

    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer.from_tokenizers(backend, context_length=context_length, pad_token="<pad>", bos_token="<bos>",
                                     eos_token="<eos>", unk_token="<unk>")


def test_long_retrieval_recall_context_length_and_truncated_share(tmp_path):
    for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE), ("white", (255, 255, 255))):
        _png(tmp_path / "images" / f"{name}.jpg", colour)
    descriptions = {"d0 " + "long " * 9: VECTORS["red"],  # 10 words + 2 special tokens > 8: truncated
                    "d1 mostly green": (0.6, 0.8, 0),  # green .8 beats red .6
                    "d2 a b c d e": (0.8, 0, 0.6)}  # 6 words + 2 = 8, fits; red .8 beats its own blue .6
    rows = [{"example_id": f"test_{i}", "split": "test", "image_file": f"{name}.jpg", "description": text}
            for i, (name, text) in enumerate(zip(("red", "green", "blue"), descriptions))]
    rows.append({"example_id": "train_0", "split": "train", "image_file": "white.jpg", "description": "d0"})
    (tmp_path / "docci_descriptions.jsonlines").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = _word_tokenizer(["d0", "d1", "d2", "long", "mostly", "green", "a", "b", "c", "d", "e"], 8)
    metrics = _build("docci", {"type": "long_retrieval", "path": str(tmp_path)}, FakeView(descriptions), tokenizer)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # d2 finds red first
    assert metrics["image_retrieval_recall@5"] == 1.0
    assert metrics["text_retrieval_recall@1"] == 1.0  # every image's best description is its own
    assert metrics["context_length"] == 8 and metrics["truncated"] == pytest.approx(1 / 3)
    assert metrics["evaluated"] == 3 and metrics["skipped"] == 0


@pytest.fixture(scope="module")
def shapes_test_records():
    """The compositional split of the embedded `shapes_world/test` build (made once, in TFDS's default dir)."""
    import tensorflow_datasets as tfds

    from vlm_jax.data import shapes_world

    shapes_world.prepare(None, "test")
    return list(tfds.data_source("shapes_world/test", split="eval_compositional"))


SHAPES_SPEC = {"type": "shapes_compositional", "batch_size": 16,
               "data": {"tfds_name": "shapes_world/test", "split": "eval_compositional"}}


def test_shapes_compositional_counts_per_kind_with_known_embeddings(shapes_test_records):
    positives = {record["dense_caption"].decode() for record in shapes_test_records}
    negatives = collections.defaultdict(set)
    for record in shapes_test_records:
        for kind, text in record["negatives"].items():
            negatives[kind].add(text.decode())
    kinds = list(negatives.values())
    assert sum(map(len, [positives, *kinds])) == len(positives.union(*kinds))  # no text has two roles
    # Every image embeds along x; positives lie along x. Negatives: swap_attribute orthogonal (right),
    # replace_attribute equal to the positive (a tie: wrong), replace_object orthogonal, swap_relation
    # at 26.6 degrees (right).
    vectors = {text: (1, 0, 0) for text in positives}
    for kind, vector in (("swap_attribute", (0, 1, 0)), ("replace_attribute", (1, 0, 0)),
                         ("replace_object", (0, 0, 1)), ("swap_relation", (2, 1, 0))):
        vectors.update(dict.fromkeys(negatives[kind], vector))

    class ConstantImages(FakeView):
        def view(self):
            base = super().view()
            return View(images=lambda batch: _unit(np.tile([1.0, 0, 0], (len(batch["image"]), 1))),
                        captions=None, prompts=base.prompts)

    metrics = _build("shapes", SHAPES_SPEC, ConstantImages(vectors))
    assert metrics == {"swap_attribute": 1.0, "replace_attribute": 0.0, "replace_object": 1.0, "swap_relation": 1.0,
                       "mean": 0.75, "evaluated": float(len(shapes_test_records)), "skipped": 0.0}
    some = _build("shapes", {**SHAPES_SPEC, "categories": ("replace_object",), "max_examples": 5},
                  ConstantImages(vectors))
    assert some == {"replace_object": 1.0, "mean": 1.0, "evaluated": 5.0, "skipped": 0.0}


@pytest.mark.slow
def test_shapes_compositional_on_the_tiny_clip(shapes_test_records):
    import dataclasses

    from flax import nnx

    from vlm_jax.data import shapes_world
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.models.clip import CLIP, tiny

    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"))
    config = tiny(text=dataclasses.replace(tiny().text, vocab_size=tokenizer.vocab_size,
                                           context_length=tokenizer.context_length, eos_token_id=tokenizer.eos_id,
                                           pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id))
    model = CLIP(config, rngs=nnx.Rngs(0))
    evaluator = suite.build_evaluator("shapes", SHAPES_SPEC, PreprocessSpec.clip(image_size=32), tokenizer)
    metrics = evaluator.run(model)
    kinds = ("swap_attribute", "replace_attribute", "replace_object", "swap_relation")
    assert all(0.0 <= metrics[f"shapes/{kind}"] <= 1.0 for kind in kinds)
    assert metrics["shapes/mean"] == pytest.approx(np.mean([metrics[f"shapes/{kind}"] for kind in kinds]))
    assert metrics["shapes/evaluated"] == len(shapes_test_records) and metrics["shapes/skipped"] == 0


def test_a_missing_benchmark_path_is_a_one_line_config_error_before_anything_runs(tmp_path):
    assert set(BENCHMARK_FILES) | {"shapes_compositional"} == set(compositional.TYPES)
    cases = [({"type": "sugarcrepe"}, "evals.bad.path is not set"),
             ({"type": "winoground", "path": str(tmp_path / "nowhere")}, "does not exist"),
             ({"type": "aro_relation", "path": str(tmp_path)}, "has no visual_genome_relation.json")]
    for spec, message in cases:
        for check in (lambda: require_eval_files({"bad": spec}),
                      lambda: suite.build_evaluator("bad", spec, PREPROCESS, None)):
            with pytest.raises(ConfigError, match=message) as error:
                check()
            assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="categories applies to sugarcrepe"):
        suite.build_evaluator("bad", {"type": "winoground", "path": str(tmp_path), "categories": ("x",)},
                              PREPROCESS, None)
    with pytest.raises(ConfigError, match="'shapes_compositional'"):
        suite.build_evaluator("bad", {"type": "sugar_crepe"}, PREPROCESS, None)
