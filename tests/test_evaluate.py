"""Evaluators on hand-set embeddings whose answers are worked out by hand, scored through views.

The metric definitions follow clip_benchmark's `zeroshot_classification.py` (acc1/acc5 by top-k,
mean per-class recall as sklearn's balanced accuracy) and `zeroshot_retrieval.py` (an image hits if any
of its captions is in its top K; a caption hits if its image is in its top K).
"""

import io
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.evaluate import (
    BatchedEncoder,
    RetrievalEvaluator,
    ZeroShotEvaluator,
    classification_metrics,
    get_evaluator,
    retrieval_metrics,
    zero_shot_classifier,
)
from vlm_jax.evaluate import suite, tasks
from vlm_jax.evaluate.common import skip_footnote
from vlm_jax.evaluate.views import StoredPrompts, View, pixel_view, stored_view
from vlm_jax.evaluate.zero_shot import class_prompts

TRACES = {"encode_image": 0, "encode_text": 0}


class LookupModel(nnx.Module):
    """Embeddings looked up from hand-set tables: an image's index is its pixel [0, 0, 0], a text's
    index is its first token id."""

    def __init__(self, image_table, text_table):
        self.image_table = nnx.Param(jnp.asarray(image_table, jnp.float32))
        self.text_table = nnx.Param(jnp.asarray(text_table, jnp.float32))

    def encode_image(self, pixels):
        TRACES["encode_image"] += 1
        return self.image_table[pixels[:, 0, 0, 0].astype(jnp.int32)]

    def encode_text(self, ids):
        TRACES["encode_text"] += 1
        return self.text_table[ids[:, 0]]


def _images(indices):
    """float32 [B, 2, 2, 3] images carrying their table index."""
    images = np.zeros((len(indices), 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = indices
    return images


class LookupTokenizer:
    """Maps each known text to a row of int32 [N, 4] whose first id indexes the text table."""

    def __init__(self, texts):
        self.index = {text: i for i, text in enumerate(texts)}

    def __call__(self, texts):
        ids = np.zeros((len(texts), 4), np.int32)
        ids[:, 0] = [self.index[text] for text in texts]
        return ids


def _angle(degrees, scale=1.0):
    radians = math.radians(degrees)
    return [scale * math.cos(radians), scale * math.sin(radians), 0.0]


def test_classifier_is_normalized_mean_of_normalized_template_embeddings():
    texts = ["a cat", "photo of cat", "a dog", "photo of dog"]
    # "a cat" is (2, 0, 0), "photo of cat" (3, 3, 0): normalized (1, 0, 0) and (1, 1, 0)/sqrt(2); their mean
    # renormalized is at 22.5 degrees. Both dog prompts point along y.
    text_table = [[2, 0, 0], [3, 3, 0], [0, 5, 0], [0, 0.5, 0]]
    model = LookupModel(np.zeros((1, 3)), text_table)
    prompts = pixel_view(model, LookupTokenizer(texts), batch_size=3).prompts
    classifier = zero_shot_classifier(prompts, ["cat", "dog"], ["a {}", "photo of {c}"])
    expected = [[math.cos(math.pi / 8), math.sin(math.pi / 8), 0], [0, 1, 0]]
    np.testing.assert_allclose(classifier, expected, atol=1e-6)


def test_templates_may_be_callables_or_per_class_descriptions():
    names = ["cat", "dog"]
    assert class_prompts(names, ["a {}", lambda c: f"{c}!"]) == [["a cat", "cat!"], ["a dog", "dog!"]]
    assert class_prompts(names, {"dog": ["barks"], "cat": ["meows", "purrs"]}) == [["meows", "purrs"], ["barks"]]
    assert class_prompts(names, [["meows"], ["barks", "wags"]]) == [["meows"], ["barks", "wags"]]
    with pytest.raises(ValueError, match="no"):
        class_prompts(names, ["a photo"])


def test_per_class_descriptions_average_uneven_lists():
    texts = ["meows", "purrs", "barks"]
    model = LookupModel(np.zeros((1, 2)), [[1, 0], [0, 1], [-1, 0]])
    prompts = pixel_view(model, LookupTokenizer(texts)).prompts
    classifier = zero_shot_classifier(prompts, ["cat", "dog"], [["meows", "purrs"], ["barks"]])
    np.testing.assert_allclose(classifier, [[math.sqrt(0.5), math.sqrt(0.5)], [-1, 0]], atol=1e-6)


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 2, 3])
    rankings = [  # classes from highest to lowest score, per sample
        [0, 1, 2, 3, 4, 5, 6],  # label 0 first: top-1 hit
        [1, 2, 0, 3, 4, 5, 6],  # label 0 third: top-5 hit only
        [1, 2, 3, 4, 5, 0, 6],  # label 0 sixth: miss
        [0, 2, 3, 4, 1, 5, 6],  # label 1 fifth: top-5 hit only
        [2, 0, 1, 3, 4, 5, 6],  # label 2 first
        [3, 0, 1, 2, 4, 5, 6],  # label 3 first
    ]
    logits = np.zeros((6, 7), np.float32)
    for row, ranking in enumerate(rankings):
        logits[row, ranking] = np.arange(7, 0, -1)
    metrics = classification_metrics(logits, labels, subsets={"common": [0, 1], "rare": [2, 3]})
    assert metrics["top1"] == pytest.approx(3 / 6)
    assert metrics["top5"] == pytest.approx(5 / 6)
    # Recall per class: 1/3, 0/1, 1/1, 1/1.
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 3 + 0 + 1 + 1) / 4)
    assert metrics["top1_common"] == pytest.approx(1 / 4)
    assert metrics["top1_rare"] == pytest.approx(1.0)


def test_top5_uses_all_classes_when_there_are_fewer_than_five():
    logits = np.array([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]])
    metrics = classification_metrics(logits, np.array([0, 1]))
    assert metrics["top1"] == 0.0 and metrics["top5"] == 1.0


def _zero_shot_setup():
    class_names = ["cat", "dog", "bird"]
    templates = ["a {}", "photo of {c}"]
    texts = [t.replace("{}", c).replace("{c}", c) for c in class_names for t in templates]
    text_table = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 3]]
    # Classifier: cat at 22.5 degrees in the xy plane, dog along y, bird along z. Predictions: cat, dog,
    # bird, cat (cat scores 1.307 > dog 1 for (1, 1, 0)), cat, bird, cat (0.462 > bird 0.4).
    image_table = [[1, 0, 0], [0.3, 1, 0], [0, 0, 1], [1, 1, 0], [2, 0, 0.1], [0, 0.1, 1], [0.5, 0, 0.4]]
    labels = np.array([0, 1, 2, 1, 0, 2, 2], np.int32)
    model = LookupModel(image_table, text_table)

    def data():
        for chunk in (slice(0, 3), slice(3, 7)):
            yield {"image": _images(np.arange(7)[chunk]), "label": labels[chunk]}

    return model, LookupTokenizer(texts), class_names, templates, data


def test_zero_shot_evaluator_by_hand_with_ragged_batches():
    model, tokenizer, class_names, templates, data = _zero_shot_setup()
    evaluator = get_evaluator(
        "zero_shot", data=data, class_names=class_names, templates=templates, subsets={"common": [0, 1], "rare": [2]},
    )  # fmt: skip
    assert isinstance(evaluator, ZeroShotEvaluator)
    view = pixel_view(model, tokenizer, batch_size=4)
    metrics = evaluator.run(view)
    assert metrics["top1"] == pytest.approx(5 / 7)
    assert metrics["top5"] == 1.0
    assert metrics["mean_per_class_recall"] == pytest.approx((2 / 2 + 1 / 2 + 2 / 3) / 3)
    assert metrics["top1_common"] == pytest.approx(3 / 4)
    assert metrics["top1_rare"] == pytest.approx(2 / 3)
    assert evaluator.run(view) == metrics


def _retrieval_setup():
    # All embeddings lie in the xy plane, so cosine similarity falls with the angle between them.
    # Images at 0, 90, 180, 270 degrees; captions (angle, image): t0 (10, 0), t1 (60, 0), t2 (130, 1),
    # t3 (200, 1), t4 (170, 2), t5 (300, 3), and a padded caption of image 3 at 80 degrees that must not count.
    image_table = [_angle(a, scale=2.0) for a in (0, 90, 180, 270)]
    text_table = [_angle(a, scale=0.5 + i) for i, a in enumerate((10, 60, 130, 200, 170, 300, 80))]
    model = LookupModel(image_table, text_table)

    def caption_ids(indices):
        ids = np.zeros((*np.shape(indices), 4), np.int32)
        ids[..., 0] = indices
        return ids

    def data():
        yield {"image": _images([0, 1, 2]), "text_ids": caption_ids([[0, 1], [2, 3], [4, 0]]),
               "text_mask": np.array([[True, True], [True, True], [True, False]])}  # fmt: skip
        yield {"image": _images([3]), "text_ids": caption_ids([[5, 6]]), "text_mask": np.array([[True, False]])}

    return model, data


def test_retrieval_recall_by_hand_with_several_captions_and_padding():
    model, data = _retrieval_setup()
    metrics = get_evaluator("retrieval", data=data, ks=(1, 2, 5)).run(pixel_view(model, None, batch_size=4))
    # Caption -> image: images closer than the caption's own image: t0 0, t1 1 (image 1), t2 0, t3 2
    # (images 2 and 3), t4 0, t5 0.
    assert metrics["image_retrieval_recall@1"] == pytest.approx(4 / 6)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert metrics["image_retrieval_recall@5"] == 1.0
    # Image -> caption: captions closer than the image's best own caption: image 0 none (t0 at 10), image 1
    # one (t1 at 30 beats t2 at 40), image 2 none (t4), image 3 none (t5).
    assert metrics["text_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert metrics["text_retrieval_recall@2"] == 1.0


def test_retrieval_metrics_reject_images_without_captions():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


def test_encoder_pads_last_batch_without_recompiling():
    table = np.arange(33, dtype=np.float32).reshape(11, 3) + 1
    model = LookupModel(table, np.zeros((1, 3)))
    encoder = BatchedEncoder(model, "encode_image", batch_size=5)
    before = TRACES["encode_image"]
    embeddings = encoder(_images(np.arange(11)))
    assert TRACES["encode_image"] - before == 1
    np.testing.assert_allclose(embeddings, table / np.linalg.norm(table, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(encoder(_images([4, 2])), embeddings[[4, 2]], rtol=1e-6)
    assert TRACES["encode_image"] - before == 1


@pytest.mark.slow
def test_evaluators_run_on_the_tiny_clip_model():
    from vlm_jax.models.clip import CLIP, tiny

    config = tiny()
    model = CLIP(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    length = config.text.context_length

    def tokenizer(texts):
        ids = np.zeros((len(texts), length), np.int32)
        for row, text in zip(ids, texts):
            row[: len(text) + 2] = [config.text.bos_token_id, *(ord(ch) % 900 + 1 for ch in text), config.text.eos_token_id]
        return ids

    direct = np.asarray(model.encode_image(jnp.asarray(images)))
    np.testing.assert_allclose(
        BatchedEncoder(model, "encode_image", 4)(images), direct / np.linalg.norm(direct, axis=1, keepdims=True),
        atol=1e-5,
    )
    view = pixel_view(model, tokenizer, batch_size=4)
    metrics = ZeroShotEvaluator(
        data=lambda: [{"image": images, "label": np.array([0, 1, 2, 0, 1, 2], np.int32)}],
        class_names=["red", "green", "blue"], templates=["a {} shape"],
    ).run(view)  # fmt: skip
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall", "evaluated", "skipped"}
    assert metrics["evaluated"] == 6 and metrics["skipped"] == 0
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("top1", "top5", "mean_per_class_recall")) and metrics["top5"] == 1.0
    captions = tokenizer([f"caption {i}" for i in range(12)]).reshape(6, 2, length)
    evaluator = RetrievalEvaluator(data=lambda: [{"image": images, "text_ids": captions}], ks=(1, 6, 11))
    metrics = evaluator.run(view)
    # With 6 images every caption's image is in its top 6; with 12 captions, 2 per image, at most 10
    # captions can outrank an image's best own caption.
    assert metrics["image_retrieval_recall@6"] == 1.0 and metrics["text_retrieval_recall@11"] == 1.0
    assert 0.0 <= metrics["image_retrieval_recall@1"] <= 1.0


def test_unknown_evaluator_names_the_registered_ones():
    with pytest.raises(KeyError, match="retrieval"):
        get_evaluator("zero-shot")


def test_encoder_runs_under_jit_cache_for_same_structure():
    """Two models of the same structure share the compiled encoder: state is an argument, not a constant."""
    first = LookupModel(np.eye(3), np.zeros((1, 3)))
    second = LookupModel(np.eye(3)[::-1], np.zeros((1, 3)))
    before = TRACES["encode_image"]
    a = BatchedEncoder(first, "encode_image", batch_size=7)(_images([0, 1, 2]))
    b = BatchedEncoder(second, "encode_image", batch_size=7)(_images([0, 1, 2]))
    assert TRACES["encode_image"] - before == 1
    np.testing.assert_allclose(a, np.eye(3))
    np.testing.assert_allclose(b, np.eye(3)[::-1])
    assert jax.tree.leaves(nnx.state(first))  # the models are untouched by splitting


def test_stored_view_scores_as_the_pixel_view_of_the_model_that_stored_the_embeddings():
    model, tokenizer, class_names, templates, data = _zero_shot_setup()
    pixels = pixel_view(model, tokenizer, batch_size=4)
    texts = [text for prompts in class_prompts(class_names, templates) for text in prompts]
    prompts = StoredPrompts(texts, 3.0 * pixels.prompts(texts))  # stored rows need not be unit

    def stored_data():
        for batch in data():
            yield {"image_embedding": 2.0 * pixels.images(batch), "label": batch["label"]}

    evaluator = ZeroShotEvaluator(stored_data, class_names, templates)
    on_pixels = ZeroShotEvaluator(data, class_names, templates).run(pixels)
    assert evaluator.run(stored_view(prompts)) == pytest.approx(on_pixels)
    with pytest.raises(ValueError, match="no stored embedding"):
        prompts(["a fish"])

    retrieval_model, retrieval_data = _retrieval_setup()
    view = pixel_view(retrieval_model, None, batch_size=4)
    stored = [{"image_embedding": view.images(batch), "text_embedding": view.captions(batch),
               "text_mask": batch["text_mask"]} for batch in retrieval_data()]
    assert RetrievalEvaluator(lambda: stored, ks=(1, 2)).run(stored_view(prompts)) == pytest.approx(
        RetrievalEvaluator(retrieval_data, ks=(1, 2)).run(view))


def test_a_refined_view_maps_each_modality_in_fixed_batches_and_renormalizes():
    calls = []

    def rotate(embeddings):  # [b, D] -> [b, D]: swaps x and y, doubles the length
        calls.append(embeddings.shape)
        return 2.0 * embeddings[:, jnp.array([1, 0, 2])]

    base = View(images=lambda batch: np.asarray(batch["image_embedding"], np.float32),
                captions=lambda batch: np.asarray(batch["text_embedding"], np.float32),
                prompts=lambda texts: np.eye(3, dtype=np.float32)[: len(texts)])
    refined = base.refined(rotate, None, batch_size=4)
    images = np.asarray([_angle(a) for a in (0, 30, 60, 90, 120)], np.float32)
    np.testing.assert_allclose(refined.images({"image_embedding": images}), images[:, [1, 0, 2]], atol=1e-6)
    assert calls == [(4, 3), (4, 3)]  # 5 rows: two batches of 4, the last padded
    captions = images[:4].reshape(2, 2, 3)
    np.testing.assert_array_equal(refined.captions({"text_embedding": captions}), captions)  # text map None
    np.testing.assert_array_equal(refined.prompts(["a", "b"]), np.eye(3)[:2])


def _png(seed):
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 6, 3), seed, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_zero_shot_over_9_records_with_5_bad_reports_them_skipped_by_reason_in_metrics_footnote_and_results(
        tmp_path, caplog):
    from etils import epath

    from vlm_jax.data import datasets
    from vlm_jax.data.preprocess import PreprocessSpec

    # Rows 1, 3, 6, 8 hold broken images and line 5 (row 4) is not UTF-8; the last bad row follows the
    # last example, so its skip is counted only if the end of the pass is.
    lines = []
    for row in range(9):
        name = f"{row}.png"
        (tmp_path / name).write_bytes(b"not a png" if row in (1, 3, 6, 8) else _png(row))
        line = json.dumps({"id": f"r{row}", "image_path": name, "label": row % 3, "note": "ok"}).encode()
        lines.append(line.replace(b'"ok"', b'"\xff"') if row == 4 else line)
    (tmp_path / "cars.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    class_names = datasets.get("cifar10").class_names()
    prompts = class_prompts(class_names, datasets.get("cifar10").templates)
    class_of_text = {text: c for c, texts in enumerate(prompts) for text in texts}
    eye = np.eye(len(class_names), dtype=np.float32)
    # A view that embeds each image as its own label and each prompt as its class: every scored row is right.
    view = View(images=lambda batch: eye[np.asarray(batch["label"])], captions=None,
                prompts=lambda texts: eye[[class_of_text[t] for t in texts]])
    spec = {"type": "zero_shot", "classes": "cifar10", "batch_size": 4,
            "data": {"source": "manifest", "paths": str(tmp_path / "cars.jsonl"), "label_key": "label"}}
    evaluator = suite.build_evaluator("cars", spec, PreprocessSpec(image_size=8), None,
                                      views=lambda model, inputs: {"clip": view})

    with caplog.at_level(logging.WARNING):
        metrics = evaluator.run(None)

    assert metrics["cars/top1"] == 1.0
    assert metrics["cars/evaluated"] == 4 and metrics["cars/skipped"] == 5
    assert metrics["cars/skipped/corrupt_image"] == 4 and metrics["cars/skipped/undecodable_text"] == 1
    assert metrics["cars/skipped/missing_field"] == 0
    footnote = skip_footnote(metrics)
    assert footnote == "* cars: 5 of 9 inputs skipped (corrupt_image 4, undecodable_text 1)"
    assert footnote in caplog.text
    tasks.write_results(epath.Path(tmp_path), metrics)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cars/skipped"] == 5 and results["cars/skipped/undecodable_text"] == 1
    assert results["cars/evaluated"] == 4


def test_skip_footnote_names_each_evaluator_that_skipped_and_nothing_else():
    metrics = {"zero_shot/cars/top1": 0.5, "zero_shot/cars/evaluated": 4.0, "zero_shot/cars/skipped": 5.0,
               "zero_shot/cars/skipped/undecodable_image": 5.0, "zero_shot/cars/skipped/empty_text": 0.0,
               "zero_shot/cars/skipped/std": 1.0, "pets/evaluated": 9.0, "pets/skipped": 0.0,
               "data/skipped_corrupt_image": 3.0}
    assert skip_footnote(metrics) == "* zero_shot/cars: 5 of 9 inputs skipped (undecodable_image 5)"
    assert skip_footnote({"pets/evaluated": 9.0, "pets/skipped": 0.0}) == ""


def test_retrieval_reports_skips_and_leaves_out_rows_the_mask_marks_as_padding():
    model, data = _retrieval_setup()
    view = pixel_view(model, None, batch_size=4)

    def padded_data():
        first, second = data()
        yield {**first, "bad_input": {"corrupt_image": np.int32(2), "empty_text": np.int32(0)}}
        # The last row repeats image 0 as padding (mask False): it must not count as an image.
        yield {"image": _images([3, 0]), "text_ids": np.concatenate([second["text_ids"], first["text_ids"][:1]]),
               "text_mask": np.concatenate([second["text_mask"], first["text_mask"][:1]]),
               "mask": np.array([True, False]), "bad_input": {"corrupt_image": np.int32(1), "empty_text": np.int32(1)}}

    expected = RetrievalEvaluator(data, ks=(1, 2)).run(view)
    metrics = RetrievalEvaluator(padded_data, ks=(1, 2)).run(view)
    assert expected["evaluated"] == 4 and expected["skipped"] == 0
    assert metrics == {**expected, "skipped": 4.0, "skipped/corrupt_image": 3.0, "skipped/empty_text": 1.0}


def test_evaluators_count_a_batch_of_skip_counts_alone_and_do_not_change_the_batches():
    model, tokenizer, class_names, templates, data = _zero_shot_setup()
    batches = [*data(), {"bad_input": {"corrupt_image": np.int32(3)}}]
    metrics = ZeroShotEvaluator(lambda: batches, class_names, templates).run(pixel_view(model, tokenizer, 4))
    assert metrics["skipped/corrupt_image"] == 3 and metrics["evaluated"] == 7
    assert batches[-1] == {"bad_input": {"corrupt_image": 3}}
    with pytest.raises(ValueError, match=r"no examples to score \(skipped as bad input: \{'corrupt_image': 3\}"):
        ZeroShotEvaluator(lambda: batches[-1:], class_names, templates).run(pixel_view(model, tokenizer, 4))
