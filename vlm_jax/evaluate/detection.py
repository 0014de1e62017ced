"""Box AP under LVIS's federated rules, for recognizing given boxes (RAR's detection setting).

    gt = load_lvis("lvis_v1_val.json")                    # or shapes_world_lvis(examples)
    metrics = average_precision(gt, detections)           # {"AP", "AP50", "AP75", "APr", "APc", "APf", ...}

Annotations are LVIS json: "images" [{id, width, height, neg_category_ids, not_exhaustive_category_ids,
file_name | coco_url (for reading pixels, not needed here)}], "annotations" [{id, image_id, bbox [x, y, w, h]
pixels, category_id, area}], "categories" [{id, name, frequency "r" | "c" | "f", synonyms}]. A detection is
{image_id, bbox [x, y, w, h], category_id, score}.

The rules, as lvis-api's LVISEval applies them (area range "all"):
  - each image keeps its `max_detections` highest-scoring detections over all categories (ties: input order);
  - a category is evaluated on the images where it is annotated (positive) or listed in neg_category_ids;
    its detections on any other image are ignored;
  - a detection of a category listed in its image's not_exhaustive_category_ids counts as neither true nor
    false positive when it matches no box;
  - per image and category, detections in score order take the unmatched box of highest IoU >= threshold;
    IoU thresholds 0.50:0.05:0.95; precision made monotone and read at the 101 recalls 0:0.01:1 (COCO);
  - a category without annotated boxes is not evaluated; AP averages over the evaluated ones, APr/APc/APf
    over those of frequency r/c/f (nan when a group has none).
With every image listing every category it does not hold as negative, this is COCO's box AP (pycocotools).
"""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath
from PIL import Image

from vlm_jax.config_lib import ConfigError

if TYPE_CHECKING:
    from vlm_jax.data.shapes_world.world import WorldConfig

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
FREQUENCIES = ("r", "c", "f")
# Shapes World's frequency classes by LVIS's training-frequency groups: common entities are frequent in
# pre-training, rare ones are named a handful of times, novel ones never.
SHAPES_WORLD_FREQUENCY = {"common": "f", "rare": "c", "novel": "r"}

_REQUIRED = {
    "images": ("id", "width", "height", "neg_category_ids", "not_exhaustive_category_ids"),
    "annotations": ("id", "image_id", "bbox", "category_id"),
    "categories": ("id", "name", "frequency"),
}


def _check_lvis(data: Any, source: str) -> dict:
    """`data` if it is an LVIS-format dict, else a one-line ConfigError naming `source` and what is missing."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a json object with {sorted(_REQUIRED)}, found {type(data).__name__}.")
    for section, keys in _REQUIRED.items():
        if not isinstance(data.get(section), list):
            raise ConfigError(f"{source}: missing the list {section!r} (LVIS format: {sorted(_REQUIRED)}).")
        for position, record in enumerate(data[section]):
            missing = [key for key in keys if key not in record]
            if missing:
                raise ConfigError(f"{source}: {section}[{position}] lacks key {missing[0]!r}; every entry of "
                                  f"{section!r} needs {list(keys)}.")
    images = {image["id"] for image in data["images"]}
    categories = {category["id"] for category in data["categories"]}
    for category in data["categories"]:
        if category["frequency"] not in FREQUENCIES:
            raise ConfigError(f"{source}: category {category['id']} has frequency {category['frequency']!r}; "
                              f"expected one of {list(FREQUENCIES)}.")
    for annotation in data["annotations"]:
        if annotation["image_id"] not in images or annotation["category_id"] not in categories:
            raise ConfigError(f"{source}: annotation {annotation['id']} refers to image {annotation['image_id']} "
                              f"or category {annotation['category_id']}, which the file does not list.")
    return data


def load_lvis(path: str | os.PathLike) -> dict:
    """The LVIS-format json at `path` (see the module docstring), checked for the keys AP needs."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such LVIS annotation file; check the path.") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid json ({error}).") from None
    return _check_lvis(data, path)


def _iou(detections: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 [D, G] IoU of [D, 4] and [G, 4] (x, y, w, h) boxes."""
    d_lo, d_hi = detections[:, None, :2], detections[:, None, :2] + detections[:, None, 2:]
    g_lo, g_hi = boxes[None, :, :2], boxes[None, :, :2] + boxes[None, :, 2:]
    sides = np.clip(np.minimum(d_hi, g_hi) - np.maximum(d_lo, g_lo), 0, None)
    intersection = sides[..., 0] * sides[..., 1]
    union = detections[:, None, 2] * detections[:, None, 3] + boxes[None, :, 2] * boxes[None, :, 3] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _match(detections: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """bool [T, D]: whether each detection (rows in score order) matches a box at each IoU threshold."""
    matched = np.zeros((len(IOU_THRESHOLDS), len(detections)), dtype=bool)
    if len(boxes) == 0 or len(detections) == 0:
        return matched
    ious = _iou(detections, boxes)
    taken = np.zeros((len(IOU_THRESHOLDS), len(boxes)), dtype=bool)
    # As COCOeval: a threshold of 1 would need IoU > 1 - 1e-10; among equal IoUs the last box wins.
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    last_first = slice(None, None, -1)
    for d, row in enumerate(ious):
        eligible = ~taken & (row[None, :] >= thresholds)
        scores = np.where(eligible, row[None, :], -1.0)
        best = len(boxes) - 1 - np.argmax(scores[:, last_first], axis=1)
        hit = eligible.any(axis=1)
        taken[hit, best[hit]] = True
        matched[hit, d] = True
    return matched


def _precision_at_recalls(true_positive: np.ndarray, false_positive: np.ndarray, num_boxes: int) -> np.ndarray:
    """float64 [T, R]: interpolated precision at RECALL_THRESHOLDS from [T, D] flags in score order."""
    tp, fp = np.cumsum(true_positive, axis=1), np.cumsum(false_positive, axis=1)
    recall = tp / num_boxes
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
    for t in range(len(IOU_THRESHOLDS)):
        at = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
        reached = at < recall.shape[1]
        out[t, reached] = precision[t, at[reached]]
    return out


def _capped(detections: Sequence[dict], max_detections: int) -> list[dict]:
    """The detections with only the `max_detections` highest-scoring ones of each image kept, input order."""
    by_image: dict[Any, list[int]] = defaultdict(list)
    for position, detection in enumerate(detections):
        by_image[detection["image_id"]].append(position)
    kept = []
    for positions in by_image.values():
        scores = np.asarray([detections[p]["score"] for p in positions], dtype=np.float64)
        top = np.argsort(-scores, kind="stable")[:max_detections]
        kept.extend(positions[i] for i in top)
    return [detections[p] for p in sorted(kept)]


def average_precision(gt: dict, detections: Sequence[dict], *, max_detections: int = 300) -> dict[str, float]:
    """LVIS box AP of `detections` against `gt` (an LVIS-format dict; rules in the module docstring).

    Returns:
      {"AP", "AP50", "AP75", "APr", "APc", "APf": float in [0, 1] or nan, "categories_evaluated": int}.
    """
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}.")
    images = {image["id"]: image for image in gt["images"]}
    categories = {category["id"]: category for category in gt["categories"]}
    boxes: dict[tuple[Any, Any], list[list[float]]] = defaultdict(list)
    positive_images: dict[Any, set] = defaultdict(set)
    for annotation in gt["annotations"]:
        boxes[annotation["image_id"], annotation["category_id"]].append(annotation["bbox"])
        positive_images[annotation["category_id"]].add(annotation["image_id"])
    negative_images: dict[Any, set] = defaultdict(set)
    for image in gt["images"]:
        for category in image["neg_category_ids"]:
            negative_images[category].add(image["id"])

    for detection in detections:
        missing = [key for key in ("image_id", "bbox", "category_id", "score") if key not in detection]
        if missing:
            raise ValueError(f"detection {detection} lacks {missing}; each needs image_id, bbox, category_id, score.")
        if detection["image_id"] not in images or detection["category_id"] not in categories:
            raise ValueError(f"detection on image {detection['image_id']!r} of category {detection['category_id']!r}: "
                             "the annotations list no such image or category.")
    # category -> image -> its evaluated detections, in input order.
    found: dict[Any, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for detection in _capped(detections, max_detections):
        image_id, category_id = detection["image_id"], detection["category_id"]
        if image_id in positive_images.get(category_id, ()) or image_id in negative_images.get(category_id, ()):
            found[category_id][image_id].append(detection)

    per_category: dict[Any, np.ndarray] = {}
    for category_id in sorted(positive_images):
        num_boxes = sum(len(boxes[image_id, category_id]) for image_id in positive_images[category_id])
        scores, true_positive, false_positive = [], [], []
        for image_id in sorted(found[category_id]):
            dets = found[category_id][image_id]
            dets = [dets[i] for i in np.argsort([-d["score"] for d in dets], kind="stable")]
            matched = _match(np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4),
                             np.asarray(boxes.get((image_id, category_id), []), dtype=np.float64).reshape(-1, 4))
            ignored = category_id in images[image_id]["not_exhaustive_category_ids"]
            scores.append(np.asarray([d["score"] for d in dets], dtype=np.float64))
            true_positive.append(matched)
            false_positive.append(~matched & (not ignored))
        if not scores:
            per_category[category_id] = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
            continue
        order = np.argsort(-np.concatenate(scores), kind="stable")
        per_category[category_id] = _precision_at_recalls(
            np.concatenate(true_positive, axis=1)[:, order], np.concatenate(false_positive, axis=1)[:, order],
            num_boxes)

    def mean_over(category_ids: list, threshold: int | None = None) -> float:
        if not category_ids:
            return float("nan")
        curves = np.stack([per_category[c] for c in category_ids])
        return float(curves.mean() if threshold is None else curves[:, threshold].mean())

    evaluated = list(per_category)
    metrics = {"AP": mean_over(evaluated), "AP50": mean_over(evaluated, 0), "AP75": mean_over(evaluated, 5)}
    for frequency in FREQUENCIES:
        metrics[f"AP{frequency}"] = mean_over([c for c in evaluated if categories[c]["frequency"] == frequency])
    metrics["categories_evaluated"] = len(evaluated)
    return metrics


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of PNG bytes or a [H, W, ...] array."""
    if isinstance(image, (bytes, np.bytes_)):
        width, height = Image.open(io.BytesIO(image)).size
        return height, width
    shape = np.shape(image)
    return int(shape[0]), int(shape[1])


def shapes_world_lvis(examples: Sequence[dict], config: str | WorldConfig = "default") -> dict:
    """An LVIS-format dict of Shapes World examples' regions, every image exhaustively annotated.

    Each example holds "index" (the image id), "image" (PNG bytes or uint8 [H, W, 3]) and "regions" with
    "bbox" [R, 4] normalized (ymin, xmin, ymax, xmax) and "entity" [R] int labels (the TFDS ClassLabel).
    Category id = entity label + 1 (LVIS ids start at 1), name = entity name, frequency by
    SHAPES_WORLD_FREQUENCY of the entity's class under `config` (a Shapes World config name or WorldConfig).
    Every category an image does not hold is in its neg_category_ids; not_exhaustive_category_ids is empty.
    """
    from vlm_jax.data import shapes_world  # noqa: PLC0415  (TFDS loads only when Shapes World is used)

    entities = shapes_world.entities(config)
    categories = [{"id": e.id + 1, "name": e.name, "frequency": SHAPES_WORLD_FREQUENCY[e.frequency],
                   "synonyms": [e.name]} for e in entities]
    all_ids = [category["id"] for category in categories]
    images, annotations, seen = [], [], set()
    for example in examples:
        image_id = int(example["index"])
        if image_id in seen:
            raise ValueError(f"two examples have index {image_id}; give the examples of one split.")
        seen.add(image_id)
        height, width = _image_size(example["image"])
        bbox = np.asarray(example["regions"]["bbox"], dtype=np.float64).reshape(-1, 4)
        entity = np.asarray(example["regions"]["entity"]).reshape(-1)
        if not np.issubdtype(entity.dtype, np.integer):
            raise ValueError(f"example {image_id}: regions['entity'] is {entity.dtype}; expected int entity labels.")
        held = set()
        for (ymin, xmin, ymax, xmax), label in zip(bbox, entity, strict=True):
            x, y = float(xmin * width), float(ymin * height)
            w, h = float((xmax - xmin) * width), float((ymax - ymin) * height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "category_id": int(label) + 1, "area": w * h})
            held.add(int(label) + 1)
        images.append({"id": image_id, "width": width, "height": height,
                       "neg_category_ids": [c for c in all_ids if c not in held], "not_exhaustive_category_ids": []})
    return _check_lvis({"images": images, "annotations": annotations, "categories": categories}, "Shapes World")


def boxes_config() -> Any:
    """The config section `load_boxes` reads: annotations (an LVIS-format file; "": Shapes World
    regions of `data`), image_dir, limit (images read, 0: all), data (a pipeline data section)."""
    import ml_collections  # noqa: PLC0415

    from vlm_jax.data.pipeline import default_config  # noqa: PLC0415

    return ml_collections.ConfigDict({"annotations": "", "image_dir": "", "limit": 0, "data": default_config()})


def check_boxes(section: Any, where: str) -> None:
    """One-line ConfigErrors for a `boxes_config` section, before any work: the annotation file and
    image folder exist, or, without a file, the data section names a split to read regions from."""
    from vlm_jax.config_lib import require_path  # noqa: PLC0415

    if section.annotations:
        require_path(section.annotations, f"{where}.annotations", field=f"{where}.annotations")
        require_path(section.image_dir, f"{where}.image_dir", field=f"{where}.image_dir")
    elif not section.data.get("tfds_name"):
        raise ConfigError(f"{where}.annotations is not set; pass --config.{where}.annotations=<LVIS-format json> and "
                          f"--config.{where}.image_dir=DIR (or {where}.data naming a Shapes World split).")


def load_boxes(annotations: str, image_dir: str, data: Any, limit: int = 0) -> tuple[dict, dict[int, np.ndarray]]:
    """Given boxes and their images: an LVIS-format file (`annotations`, images under `image_dir` by
    file_name, else coco_url's last part) or, with annotations "", the Shapes World regions of the split `data` names (a
    pipeline data section). limit: images read (0: all). -> (gt restricted to them, {image id:
    uint8 image [H, W, 3]})."""
    from vlm_jax.data.decoding import decode_image  # noqa: PLC0415
    from vlm_jax.data.pipeline import make_source  # noqa: PLC0415

    if annotations:
        gt = load_lvis(annotations)
        # LVIS v1 names images by coco_url only; its file name is the URL's last part.
        images = {image["id"]: decode_image((epath.Path(image_dir) / (
            image.get("file_name") or image["coco_url"].rsplit("/", 1)[-1])).read_bytes())
            for image in gt["images"][: limit or None]}
    else:
        source = make_source(data)
        examples = [source[index] for index in range(min(len(source), limit or len(source)))]
        gt = shapes_world_lvis(examples)
        images = {int(example["index"]): decode_image(example["image"]) for example in examples}
    kept = [annotation for annotation in gt["annotations"] if annotation["image_id"] in images]
    return {**gt, "images": [image for image in gt["images"] if image["id"] in images], "annotations": kept}, images


def ranked_detections(annotations: Sequence[dict], ranked: np.ndarray, scores: np.ndarray,
                      category_ids: np.ndarray) -> list[dict[str, Any]]:
    """Recognition of given boxes as detections: box i gets one detection per ranked class (indices
    [A, k] into `category_ids`, -1 none), scored by the box's scores [A, k] sorted high to low, so a
    re-ranking changes which class holds each score, not the box's confidence."""
    detections = []
    for annotation, labels, row in zip(annotations, ranked, -np.sort(-np.asarray(scores), axis=1)):
        for label, score in zip(labels, row):
            if label >= 0:
                detections.append({"image_id": annotation["image_id"], "bbox": list(annotation["bbox"]),
                                   "category_id": int(category_ids[label]), "score": float(score)})
    return detections
