"""Box operations for region queries: conversions, IoU, GIoU, DETR's matching cost and Hungarian matching.

Boxes are float arrays whose last axis holds 4 numbers, either (cx, cy, w, h) ("cxcywh", what a
box head predicts) or (x0, y0, x1, y1) ("xyxy", what IoU is computed on). Every function is a
pure jnp function, usable inside ``jax.jit`` and ``jax.grad``; leading axes broadcast.

Degenerate boxes are safe: a box of zero (or negative, treated as zero) width or height has zero
area; IoU of two boxes whose union is empty is 0, and GIoU's enclosing-box term is 0 when the
enclosing box is empty, so neither value (nor its gradient) is ever NaN.

Matching (DETR; GRAIN's region queries): per image, ``matching_cost`` gives the [N, Q] cost of
assigning each of N ground-truth boxes to each of Q predicted boxes,
``l1_weight * L1(cxcywh) + giou_weight * (-GIoU(xyxy))``, and ``hungarian_match`` picks a distinct
query for every valid ground-truth box minimizing the total cost (``optax.assignment``'s
Hungarian algorithm, vmapped over the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """(cx, cy, w, h) -> (x0, y0, x1, y1).

    Args:
      boxes: float [..., 4] (cx, cy, w, h).

    Returns:
      float [..., 4] (x0, y0, x1, y1), same dtype.
    """
    boxes = jnp.asarray(boxes)
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """(x0, y0, x1, y1) -> (cx, cy, w, h).

    Args:
      boxes: float [..., 4] (x0, y0, x1, y1).

    Returns:
      float [..., 4] (cx, cy, w, h), same dtype.
    """
    boxes = jnp.asarray(boxes)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: Array) -> Array:
    """Area of xyxy boxes; a negative width or height counts as zero.

    Args:
      boxes: float [..., 4] (x0, y0, x1, y1).

    Returns:
      float [...] areas (>= 0).
    """
    boxes = jnp.asarray(boxes)
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return width * height


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator where denominator > 0, else 0 (with finite gradients on both branches)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _pairwise_iou_and_union(a: Array, b: Array) -> tuple[Array, Array]:
    """IoU [..., N, M] and union area [..., N, M] of xyxy boxes a [..., N, 4] and b [..., M, 4]."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    area_a, area_b = box_area(a), box_area(b)
    top_left = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    size = jnp.maximum(bottom_right - top_left, 0.0)
    inter = size[..., 0] * size[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return _safe_divide(inter, union), union


def pairwise_iou(a: Array, b: Array) -> Array:
    """Intersection over union of every pair of xyxy boxes.

    Args:
      a: float [..., N, 4] (x0, y0, x1, y1).
      b: float [..., M, 4]; leading axes broadcast with a's.

    Returns:
      float [..., N, M] IoU in [0, 1]; 0 where the union is empty (two zero-area boxes).
    """
    return _pairwise_iou_and_union(a, b)[0]


def generalized_box_iou(a: Array, b: Array) -> Array:
    """Generalized IoU (Rezatofighi et al.; DETR's) of every pair of xyxy boxes.

    ``GIoU = IoU - (|C| - |A u B|) / |C|`` with C the smallest box enclosing both; the second term
    is 0 when C is empty (both boxes are the same point or lie on one line).

    Args:
      a: float [..., N, 4] (x0, y0, x1, y1).
      b: float [..., M, 4]; leading axes broadcast with a's.

    Returns:
      float [..., N, M] GIoU in [-1, 1], never NaN.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    iou, union = _pairwise_iou_and_union(a, b)
    top_left = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    size = jnp.maximum(bottom_right - top_left, 0.0)
    enclosing = size[..., 0] * size[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def matching_cost(pred_boxes: Array, gt_boxes: Array, l1_weight: float = 5.0,
                  giou_weight: float = 2.0) -> Array:
    """DETR's box matching cost of every (ground-truth box, predicted box) pair.

    Args:
      pred_boxes: float [B, Q, 4] predicted (cx, cy, w, h).
      gt_boxes: float [B, N, 4] ground-truth (cx, cy, w, h).
      l1_weight: weight of the L1 distance of the (cx, cy, w, h) vectors.
      giou_weight: weight of -GIoU of the xyxy boxes.

    Returns:
      float [B, N, Q] cost: ``l1_weight * L1 + giou_weight * (-GIoU)``.
    """
    pred_boxes, gt_boxes = jnp.asarray(pred_boxes), jnp.asarray(gt_boxes)
    l1 = jnp.abs(gt_boxes[..., :, None, :] - pred_boxes[..., None, :, :]).sum(-1)
    giou = generalized_box_iou(cxcywh_to_xyxy(gt_boxes), cxcywh_to_xyxy(pred_boxes))
    return l1_weight * l1 - giou_weight * giou


def _match_one(cost: Array) -> Array:
    """int32 [N]: the column assigned to each row of one [N, Q] cost matrix (N <= Q)."""
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    # With N <= Q every row is assigned; the rows come back in no fixed order, so scatter.
    return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


def hungarian_match(cost: Array, valid: Array) -> Array:
    """Per image, a distinct query for every valid ground-truth row minimizing the total cost.

    Padded rows (``valid`` False) get their costs set to 0 before solving. They still take
    columns (the solver assigns all N rows, N <= Q), but a row of constant cost adds the same
    amount to the total whatever column it takes, and since N <= Q any assignment of the valid
    rows to distinct columns leaves enough free columns to place the padded rows. So the total
    cost is (sum over valid rows) + 0, and its minimizers restricted to the valid rows are exactly
    the optimal assignments of the valid sub-problem. Setting the values (rather than leaving
    them) also keeps NaN or inf costs of padding boxes out of the solver.

    Args:
      cost: float [B, N, Q] cost of assigning ground-truth row n to query q.
      valid: bool [B, N] which rows are real ground-truth boxes.

    Returns:
      int32 [B, N] the query index of every row; distinct within an image; arbitrary (but
      distinct from the valid rows' queries) for padded rows, which callers mask.

    Raises:
      ValueError: (at trace time) if N > Q, or the shapes disagree.
    """
    cost = jnp.asarray(cost)
    valid = jnp.asarray(valid, bool)
    if cost.ndim != 3:
        raise ValueError(f"cost must be [B, N, Q], got shape {cost.shape}")
    batch, rows, cols = cost.shape
    if valid.shape != (batch, rows):
        raise ValueError(f"valid must be [B, N] = {(batch, rows)}, got {valid.shape}")
    if rows > cols:
        raise ValueError(f"cannot match {rows} ground-truth boxes to {cols} queries: need N <= Q")
    if rows == 0:
        return jnp.zeros((batch, 0), jnp.int32)
    cost = jnp.where(valid[..., None], cost, 0.0)
    return jax.vmap(_match_one)(cost)
