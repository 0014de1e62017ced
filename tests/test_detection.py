"""LVIS box AP: a case worked by hand, the federated rules, the per-image cap, parity with COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from vlm_jax.config_lib import ConfigError
from vlm_jax.data import shapes_world
from vlm_jax.evaluate.detection import SHAPES_WORLD_FREQUENCY, average_precision, load_lvis, shapes_world_lvis

A, B = 1, 2


def image(image_id, neg=(), not_exhaustive=()):
    return {"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.jpg",
            "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(not_exhaustive)}


def annotations(*boxes):
    """[{id, image_id, bbox, category_id, area}] from (image_id, category_id, bbox) triples, ids from 1."""
    return [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": list(bbox), "area": bbox[2] * bbox[3]}
            for i, (img, cat, bbox) in enumerate(boxes)]


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


CATEGORIES = [{"id": A, "name": "apple", "frequency": "f", "synonyms": ["apple"]},
              {"id": B, "name": "bagel", "frequency": "r", "synonyms": ["bagel"]}]
# Image 1 holds an apple and a bagel, image 2 an apple (no bagel, checked), image 3 neither (both checked).
HAND_GT = {
    "images": [image(1), image(2, neg=[B]), image(3, neg=[A, B])],
    "annotations": annotations((1, A, (0, 0, 10, 10)), (1, B, (50, 50, 20, 20)), (2, A, (20, 20, 10, 10))),
    "categories": CATEGORIES,
}
HAND_DETECTIONS = [
    det(1, A, (0, 0, 10, 10), 0.9),    # IoU 1 with image 1's apple: TP at every threshold
    det(3, A, (0, 0, 10, 10), 0.8),    # image 3 is negative for apples: FP
    det(2, A, (22, 20, 10, 10), 0.7),  # IoU 80 / 120 = 2/3 with image 2's apple: TP up to 0.65, FP from 0.70
    det(1, A, (30, 30, 10, 10), 0.6),  # overlaps nothing: FP
    det(2, B, (0, 0, 5, 5), 0.95),     # image 2 is negative for bagels: FP
    det(1, B, (50, 50, 20, 20), 0.5),  # IoU 1 with the bagel: TP
]


def test_hand_computed_ap():
    # Apples, 2 boxes, detections by score: TP, FP, TP, FP at IoU thresholds 0.50-0.65 (4 thresholds):
    #   precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1; made monotone 1, 2/3, 2/3, 1/2.
    #   Of the 101 recall points 0.00-0.50 (51) read precision 1, 0.51-1.00 (50) read 2/3: AP = 253/303.
    # At 0.70-0.95 (6 thresholds): TP, FP, FP, FP reaches recall 1/2 only: 51 points read 1, AP = 51/101.
    apple_ap = (4 * 253 / 303 + 6 * 51 / 101) / 10  # = 193/303
    # Bagels, 1 box: FP then TP: precision 0, 1/2 at recall 0, 1, monotone 1/2, 1/2: AP 1/2 at every threshold.
    bagel_ap = 0.5
    metrics = average_precision(HAND_GT, HAND_DETECTIONS)
    assert metrics["AP"] == pytest.approx((apple_ap + bagel_ap) / 2, abs=1e-12)
    assert metrics["AP50"] == pytest.approx((253 / 303 + bagel_ap) / 2, abs=1e-12)
    assert metrics["AP75"] == pytest.approx((51 / 101 + bagel_ap) / 2, abs=1e-12)
    assert metrics["APf"] == pytest.approx(193 / 303, abs=1e-12)
    assert metrics["APr"] == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(metrics["APc"])
    assert metrics["categories_evaluated"] == 2


def test_detections_on_images_where_the_category_is_not_checked_are_ignored():
    gt = copy.deepcopy(HAND_GT)
    gt["images"].append(image(4))  # lists neither category: nothing on it is evaluated
    extra = [det(4, A, (0, 0, 10, 10), 0.99), det(4, B, (0, 0, 10, 10), 0.99),
             det(2, B, (60, 60, 5, 5), 0.1)]  # image 2 is negative for bagels: this one counts, at the end
    base = average_precision(HAND_GT, HAND_DETECTIONS)
    metrics = average_precision(gt, HAND_DETECTIONS + extra[:2])
    assert metrics == pytest.approx(base, nan_ok=True)
    # A trailing FP after the last TP changes nothing either; placed before it, it does.
    assert average_precision(gt, HAND_DETECTIONS + extra)["APr"] == pytest.approx(0.5)
    assert average_precision(gt, [*HAND_DETECTIONS, det(2, B, (60, 60, 5, 5), 0.9)])["APr"] == pytest.approx(1 / 3)


def test_unmatched_detections_of_a_not_exhaustive_category_are_neither_tp_nor_fp():
    gt = {"images": [image(1)], "annotations": annotations((1, A, (10, 10, 20, 20))), "categories": CATEGORIES}
    detections = [det(1, A, (60, 60, 20, 20), 0.9), det(1, A, (10, 10, 20, 20), 0.8), det(1, A, (10, 10, 20, 20), 0.7)]
    # Exhaustive: FP, TP, FP (the duplicate) -> precision 0, 1/2, 1/3 at recall 0, 1, 1 -> monotone 1/2 everywhere.
    assert average_precision(gt, detections)["AP"] == pytest.approx(0.5)
    gt["images"] = [image(1, not_exhaustive=[A])]
    # Not exhaustive: both unmatched ones are ignored, the match stays a TP: precision 1 at every recall.
    assert average_precision(gt, detections)["AP"] == pytest.approx(1.0)


def test_each_image_keeps_its_highest_scoring_detections_over_all_categories():
    gt = {"images": [image(1, neg=[B])], "annotations": annotations((1, A, (10, 10, 20, 20))), "categories": CATEGORIES}
    detections = [det(1, A, (50, 50, 20, 20), 0.9), det(1, A, (60, 60, 20, 20), 0.8), det(1, A, (10, 10, 20, 20), 0.7)]
    # FP, FP, TP: precision 1/3 at recall 1.
    assert average_precision(gt, detections, max_detections=3)["AP"] == pytest.approx(1 / 3)
    # The TP is the lowest-scoring: cut off by a cap of 2, or by a higher-scoring bagel under a cap of 3.
    assert average_precision(gt, detections, max_detections=2)["AP"] == 0.0
    assert average_precision(gt, [*detections, det(1, B, (0, 0, 5, 5), 0.95)], max_detections=3)["AP"] == 0.0
    assert average_precision(gt, [*detections, det(1, B, (0, 0, 5, 5), 0.95)])["AP"] == pytest.approx(1 / 3)


def test_categories_without_boxes_are_not_evaluated():
    gt = {"images": [image(1, neg=[B])], "annotations": annotations((1, A, (10, 10, 20, 20))), "categories": CATEGORIES}
    metrics = average_precision(gt, [det(1, A, (10, 10, 20, 20), 0.5), det(1, B, (0, 0, 9, 9), 0.9)])
    assert metrics["categories_evaluated"] == 1
    assert metrics["AP"] == pytest.approx(1.0) and math.isnan(metrics["APr"])
    assert average_precision(gt, [])["AP"] == 0.0


def test_detections_must_name_known_images_and_categories():
    with pytest.raises(ValueError, match="no such image or category"):
        average_precision(HAND_GT, [det(9, A, (0, 0, 1, 1), 0.5)])
    with pytest.raises(ValueError, match="lacks"):
        average_precision(HAND_GT, [{"image_id": 1, "category_id": A, "bbox": [0, 0, 1, 1]}])


def test_load_lvis_reads_the_file_and_names_what_is_missing(tmp_path):
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(HAND_GT))
    assert load_lvis(path) == HAND_GT
    broken = copy.deepcopy(HAND_GT)
    del broken["images"][1]["neg_category_ids"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=r"lvis\.json: images\[1\] lacks key 'neg_category_ids'"):
        load_lvis(path)
    broken = copy.deepcopy(HAND_GT)
    broken["categories"][0]["frequency"] = "common"
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="frequency 'common'"):
        load_lvis(path)
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ConfigError, match="missing the list 'annotations'"):
        load_lvis(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid json"):
        load_lvis(path)
    with pytest.raises(ConfigError, match="no such LVIS annotation file"):
        load_lvis(tmp_path / "absent.json")


def random_exhaustive_case(seed, num_images=6, num_categories=4):
    """An LVIS dict whose images list every category they do not hold as negative, and detections
    (jittered boxes of each category, duplicates, random boxes) with distinct random scores."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"c{c}", "frequency": "rfc"[c % 3]} for c in range(1, num_categories + 1)]
    boxes, detections = [], []
    for image_id in range(1, num_images + 1):
        for category in range(1, num_categories + 1):
            for _ in range(rng.integers(0, 3)):
                x, y = rng.uniform(0, 70, 2)
                w, h = rng.uniform(5, 30, 2)
                boxes.append((image_id, category, (x, y, w, h)))
                for _ in range(rng.integers(0, 3)):
                    jitter = rng.normal(0, 2.5, 4)
                    detections.append((image_id, category, (x + jitter[0], y + jitter[1], max(1, w + jitter[2]),
                                                            max(1, h + jitter[3]))))
            for _ in range(rng.integers(0, 3)):
                detections.append((image_id, category, (*rng.uniform(0, 70, 2), *rng.uniform(5, 30, 2))))
    scores = rng.permutation(len(detections)) / len(detections) + 0.01
    gt = {"images": [], "annotations": annotations(*boxes), "categories": categories}
    for image_id in range(1, num_images + 1):
        held = {cat for img, cat, _ in boxes if img == image_id}
        gt["images"].append(image(image_id, neg=[c for c in range(1, num_categories + 1) if c not in held]))
    return gt, [det(img, cat, [float(v) for v in bbox], float(score))
                for (img, cat, bbox), score in zip(detections, scores, strict=True)]


def coco_ap(gt, detections, category_ids=None):
    """pycocotools' COCOeval box (AP, AP50, AP75) for the exhaustive LVIS dict `gt`."""
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval_module = pytest.importorskip("pycocotools.cocoeval")
    coco_gt = coco_module.COCO()
    coco_gt.dataset = {"images": [{key: im[key] for key in ("id", "width", "height")} for im in gt["images"]],
                       "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]],
                       "categories": [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = cocoeval_module.COCOeval(coco_gt, coco_dt, "bbox")
        if category_ids is not None:
            evaluator.params.catIds = category_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:3]


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_annotations_give_cocoeval_ap(seed):
    gt, detections = random_exhaustive_case(seed)
    assert len(detections) > 20
    metrics = average_precision(gt, detections)
    reference = coco_ap(gt, detections)
    np.testing.assert_allclose([metrics["AP"], metrics["AP50"], metrics["AP75"]], reference, atol=1e-6)
    assert 0.05 < metrics["AP"] < 0.95  # a case with both hits and misses
    for frequency in "rcf":
        ids = [c["id"] for c in gt["categories"] if c["frequency"] == frequency]
        ids = [c for c in ids if any(a["category_id"] == c for a in gt["annotations"])]
        if ids:
            assert metrics[f"AP{frequency}"] == pytest.approx(coco_ap(gt, detections, ids)[0], abs=1e-6)


def png(height, width):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shapes_world_lvis_builds_exhaustive_annotations(tmp_path):
    examples = [
        {"index": 7, "image": png(32, 64),
         "regions": {"bbox": np.asarray([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25]], np.float32),
                     "entity": np.asarray([3, 200])}},
        {"index": 2, "image": np.zeros((40, 40, 3), np.uint8),
         "regions": {"bbox": [np.asarray([0.5, 0.25, 1.0, 0.75], np.float32)], "entity": [3]}},
    ]
    gt = shapes_world_lvis(examples)
    names = shapes_world.class_names()
    frequency = {int(i): f for f, ids in shapes_world.frequency_ids().items() for i in ids}
    assert [c["id"] for c in gt["categories"]] == list(range(1, 257))
    assert [c["name"] for c in gt["categories"]] == list(names)
    assert [c["frequency"] for c in gt["categories"]] == [SHAPES_WORLD_FREQUENCY[frequency[i]] for i in range(256)]
    assert SHAPES_WORLD_FREQUENCY == {"common": "f", "rare": "c", "novel": "r"}
    assert [(im["id"], im["width"], im["height"]) for im in gt["images"]] == [(7, 64, 32), (2, 40, 40)]
    assert gt["images"][0]["neg_category_ids"] == [c for c in range(1, 257) if c not in (4, 201)]
    assert gt["images"][1]["neg_category_ids"] == [c for c in range(1, 257) if c != 4]
    assert all(im["not_exhaustive_category_ids"] == [] for im in gt["images"])
    assert [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in gt["annotations"]] == [
        (1, 7, 4, [32.0, 8.0, 32.0, 16.0], 512.0),
        (2, 7, 201, [0.0, 0.0, 16.0, 16.0], 256.0),
        (3, 2, 4, [10.0, 20.0, 20.0, 20.0], 400.0),
    ]
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(gt))
    assert load_lvis(path) == gt
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    metrics = average_precision(gt, perfect)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["categories_evaluated"] == 2
    # Image 2's box labelled entity 200 instead, scored highest: entity 3 finds one of its two boxes (precision 1
    # up to recall 1/2: 51 of 101 points), entity 200 gets an FP (image 2 is negative for it) before its TP (1/2).
    wrong = [*perfect[:2], det(2, 201, gt["annotations"][2]["bbox"], 2.0)]
    assert average_precision(gt, wrong)["AP"] == pytest.approx((51 / 101 + 0.5) / 2)


def test_shapes_world_lvis_rejects_repeated_indices_and_named_entities():
    example = {"index": 1, "image": np.zeros((8, 8, 3), np.uint8),
               "regions": {"bbox": [[0.0, 0.0, 1.0, 1.0]], "entity": [5]}}
    with pytest.raises(ValueError, match="index 1"):
        shapes_world_lvis([example, example])
    with pytest.raises(ValueError, match="int entity labels"):
        shapes_world_lvis([{**example, "regions": {"bbox": [[0.0, 0.0, 1.0, 1.0]], "entity": ["zorvid"]}}])
