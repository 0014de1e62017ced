"""Region grounding: a region model's boxes and region embeddings against annotated boxes and descriptions.

Per image the view's predicted boxes (`View.regions`: boxes [B, Q, 4] cx, cy, w, h in [0, 1], unit
region embeddings [B, Q, D]) are Hungarian-matched to the annotated boxes with DETR's cost
(`models.boxes.matching_cost`: l1_weight * L1 + giou_weight * (-GIoU), GRAIN's 5 and 2), and

    mean_iou              mean IoU of the matched (ground truth, query) pairs, over all annotated boxes
    recall@0.5            fraction of annotated boxes whose matched query has IoU >= 0.5
    description_accuracy  fraction of annotated boxes whose matched region embedding is closest (cosine)
                          to its own description among every distinct description of the eval set
                          (embedded with the view's `prompts`)
    regions               the number of annotated boxes scored

besides `evaluated` (images) and the skip counts every evaluator reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.evaluate.common import iterate_batches, real_rows, register_evaluator, skip_metrics
from vlm_jax.evaluate.views import View
from vlm_jax.models import boxes as box_ops


@jax.jit
def _match(pred_boxes: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array, l1_weight: float,
           giou_weight: float) -> tuple[jax.Array, jax.Array]:
    """(query index int32 [B, R], IoU of each gt box with its matched query float32 [B, R])."""
    cost = box_ops.matching_cost(pred_boxes, gt_boxes, l1_weight=l1_weight, giou_weight=giou_weight)
    index = box_ops.hungarian_match(cost, gt_mask)
    matched = jnp.take_along_axis(pred_boxes, index[..., None], axis=1)
    iou = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(gt_boxes)[..., :, None, :],
                               box_ops.cxcywh_to_xyxy(matched)[..., :, None, :])[..., 0, 0]
    return index, iou


def match_regions(pred_boxes: np.ndarray, gt_boxes: np.ndarray, gt_mask: np.ndarray, l1_weight: float = 5.0,
                  giou_weight: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of annotated boxes to predicted ones, per image.

    Args:
      pred_boxes: float [B, Q, 4] predicted (cx, cy, w, h).
      gt_boxes: float [B, R, 4] annotated (cx, cy, w, h), R <= Q.
      gt_mask: bool [B, R] which annotated boxes are real.
      l1_weight, giou_weight: the matching cost's weights.

    Returns:
      (query index int32 [B, R], IoU float32 [B, R] of each annotated box with its query); padded
      rows hold arbitrary values.
    """
    pred_boxes, gt_boxes = np.asarray(pred_boxes, np.float32), np.asarray(gt_boxes, np.float32)
    if gt_boxes.shape[1] > pred_boxes.shape[1]:
        raise ValueError(f"The batch has {gt_boxes.shape[1]} annotated boxes per image but the model predicts "
                         f"{pred_boxes.shape[1]}; keep at most as many boxes as region queries.")
    index, iou = _match(jnp.asarray(pred_boxes), jnp.asarray(gt_boxes), jnp.asarray(gt_mask, bool),
                        float(l1_weight), float(giou_weight))
    return np.asarray(index), np.asarray(iou)


def _texts(values: np.ndarray) -> np.ndarray:
    """str object array of the same shape (bytes decoded as UTF-8)."""
    values = np.asarray(values, object)
    return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v), otypes=[object])(values)


@register_evaluator("regions")
class RegionsEvaluator:
    """Box and region-description grounding of a region model (see the module docstring).

    Args:
      data: callable returning a fresh iterable of batches with the view's image inputs, "boxes"
        float32 [B, R, 4] (cx, cy, w, h normalized to [0, 1]), "box_mask" bool [B, R] and
        "region_texts" str [B, R] (each box's description); optionally "mask" bool [B] and
        "bad_input" (as every evaluator).
      iou_threshold: the IoU a matched box needs to count for recall (0.5).
      l1_weight, giou_weight: the matching cost's weights.
      prefix: prepended to every metric name.
    """

    def __init__(self, data: Callable[[], Iterable[dict[str, np.ndarray]]], iou_threshold: float = 0.5,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, prefix: str = ""):
        self.data = data
        self.iou_threshold, self.l1_weight, self.giou_weight = float(iou_threshold), l1_weight, giou_weight
        self.prefix = prefix

    def run(self, view: View) -> dict[str, float]:
        if view.regions is None:
            raise ValueError("The regions evaluator needs a view with region boxes and embeddings (a model with "
                             "encode_regions, e.g. GRAIN's); this view has none.")
        ious, embeddings, texts, skipped, evaluated = [], [], [], {}, 0
        for batch in iterate_batches(self.data, skipped):
            missing = [key for key in ("boxes", "box_mask", "region_texts") if key not in batch]
            if missing:
                raise ValueError(f"The regions evaluator's batches need {missing} (found {sorted(batch)}).")
            gt_boxes = np.asarray(batch["boxes"], np.float32)
            gt_mask = np.asarray(batch["box_mask"], bool) & real_rows(batch, len(gt_boxes))[:, None]
            pred_boxes, region_embeddings = view.regions(batch)
            index, iou = match_regions(pred_boxes, gt_boxes, gt_mask, self.l1_weight, self.giou_weight)
            matched = np.take_along_axis(np.asarray(region_embeddings, np.float32), index[..., None], axis=1)
            batch_texts = _texts(batch["region_texts"])
            empty = [str(t) for t in batch_texts[gt_mask] if not str(t).strip()]
            if empty:
                raise ValueError(f"{len(empty)} annotated boxes have an empty description; every box in box_mask "
                                 "needs its region text.")
            ious.append(iou[gt_mask])
            embeddings.append(matched[gt_mask])
            texts.extend(batch_texts[gt_mask].tolist())
            evaluated += int(real_rows(batch, len(gt_boxes)).sum())
        if not texts:
            raise ValueError(f"The regions data yielded no annotated boxes to score (skipped as bad input: {skipped}).")
        ious = np.concatenate(ious)
        distinct = sorted(set(texts))
        row = {text: i for i, text in enumerate(distinct)}
        description_embeddings = np.asarray(view.prompts(distinct), np.float32)
        predicted = np.argmax(np.concatenate(embeddings) @ description_embeddings.T, axis=1)
        targets = np.asarray([row[text] for text in texts])
        metrics = {
            "mean_iou": float(ious.mean()),
            f"recall@{self.iou_threshold:g}": float((ious >= self.iou_threshold).mean()),
            "description_accuracy": float((predicted == targets).mean()),
            "regions": float(len(texts)),
        }
        metrics.update(skip_metrics(skipped, evaluated))
        return {self.prefix + name: value for name, value in metrics.items()}
