"""Box conversions, IoU / GIoU against loop references, matching against scipy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from vlm_jax.models import boxes as box_ops


def _reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, GIoU) [N, M] with plain loops, zero-area conventions as documented in the module."""
    iou = np.zeros((len(a), len(b)))
    giou = np.zeros((len(a), len(b)))
    for i, (ax0, ay0, ax1, ay1) in enumerate(a):
        for j, (bx0, by0, bx1, by1) in enumerate(b):
            area_a = max(ax1 - ax0, 0) * max(ay1 - ay0, 0)
            area_b = max(bx1 - bx0, 0) * max(by1 - by0, 0)
            inter = max(min(ax1, bx1) - max(ax0, bx0), 0) * max(min(ay1, by1) - max(ay0, by0), 0)
            union = area_a + area_b - inter
            enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
            iou[i, j] = inter / union if union > 0 else 0.0
            giou[i, j] = iou[i, j] - ((enclosing - union) / enclosing if enclosing > 0 else 0.0)
    return iou, giou


def _special_boxes() -> np.ndarray:
    return np.array([
        [0.1, 0.1, 0.4, 0.4],    # 0
        [0.6, 0.6, 0.9, 0.9],    # 1 disjoint from 0
        [0.2, 0.2, 0.3, 0.3],    # 2 nested in 0
        [0.1, 0.1, 0.4, 0.4],    # 3 identical to 0
        [0.5, 0.5, 0.5, 0.5],    # 4 a point (zero area)
        [0.2, 0.3, 0.7, 0.3],    # 5 a horizontal segment (zero area)
        [0.5, 0.5, 0.5, 0.5],    # 6 the same point again
        [0.3, 0.0, 0.8, 0.2],    # 7 partial overlap with 0
    ], np.float64)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    corners = rng.uniform(0, 1, (n, 2, 2))
    return np.concatenate([corners.min(1), corners.max(1)], axis=-1)


def test_conversions_round_trip_and_values():
    cxcywh = jnp.array([[0.5, 0.4, 0.2, 0.6], [0.1, 0.9, 0.0, 0.0]])
    xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
    np.testing.assert_allclose(xyxy, [[0.4, 0.1, 0.6, 0.7], [0.1, 0.9, 0.1, 0.9]], atol=1e-6)
    np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-6)
    batched = jax.random.uniform(jax.random.PRNGKey(0), (3, 5, 4))
    np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(box_ops.cxcywh_to_xyxy(batched)), batched, atol=1e-6)
    np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(box_ops.xyxy_to_cxcywh(batched)), batched, atol=1e-6)


def test_box_area():
    np.testing.assert_allclose(box_ops.box_area(jnp.array([[0.0, 0.0, 0.5, 0.2], [0.3, 0.3, 0.3, 0.9],
                                                           [0.5, 0.5, 0.4, 0.9]])), [0.1, 0.0, 0.0], atol=1e-7)


def test_iou_and_giou_match_loop_reference():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([_special_boxes(), _random_boxes(rng, 12)])
    other = np.concatenate([_random_boxes(rng, 9), _special_boxes()])
    want_iou, want_giou = _reference(boxes, other)
    iou = box_ops.pairwise_iou(jnp.asarray(boxes, jnp.float32), jnp.asarray(other, jnp.float32))
    giou = jax.jit(box_ops.generalized_box_iou)(jnp.asarray(boxes, jnp.float32), jnp.asarray(other, jnp.float32))
    assert iou.shape == giou.shape == (len(boxes), len(other))
    np.testing.assert_allclose(iou, want_iou, atol=1e-5)
    np.testing.assert_allclose(giou, want_giou, atol=1e-5)
    assert np.isfinite(np.asarray(giou)).all()


def test_iou_special_cases_by_hand():
    special = jnp.asarray(_special_boxes(), jnp.float32)
    iou = np.asarray(box_ops.pairwise_iou(special, special))
    giou = np.asarray(box_ops.generalized_box_iou(special, special))
    assert iou[0, 3] == pytest.approx(1.0) and giou[0, 3] == pytest.approx(1.0)       # identical
    assert iou[0, 2] == pytest.approx(0.01 / 0.09, rel=1e-5)                          # nested
    assert giou[0, 2] == pytest.approx(iou[0, 2], rel=1e-5)                           # enclosing = outer box
    assert iou[0, 1] == 0.0
    assert giou[0, 1] == pytest.approx(0.0 - (0.64 - 0.18) / 0.64, rel=1e-5)          # disjoint: negative
    assert iou[4, 6] == 0.0 and giou[4, 6] == 0.0                                     # the same point twice
    assert iou[4, 5] == 0.0 and giou[4, 5] == pytest.approx(-1.0)                     # point off a segment: C = 0.1
    assert giou[5, 5] == 0.0                                                          # a segment with itself
    assert giou[4, 0] == pytest.approx(-(0.16 - 0.09) / 0.16, rel=1e-5)


def test_batched_broadcast_and_finite_gradients():
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.stack([_random_boxes(rng, 4) for _ in range(3)]), jnp.float32)
    b = jnp.asarray(np.stack([_random_boxes(rng, 6) for _ in range(3)]), jnp.float32)
    giou = box_ops.generalized_box_iou(a, b)
    assert giou.shape == (3, 4, 6)
    for i in range(3):
        np.testing.assert_allclose(giou[i], _reference(np.asarray(a[i]), np.asarray(b[i]))[1], atol=1e-5)
    points = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    grad = jax.grad(lambda x: box_ops.generalized_box_iou(x, x).sum() + box_ops.pairwise_iou(x, x).sum())(points)
    assert np.isfinite(np.asarray(grad)).all()


def test_matching_cost_by_hand():
    pred = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    gt = jnp.array([[[0.5, 0.5, 0.2, 0.2]]])
    cost = box_ops.matching_cost(pred, gt, l1_weight=5.0, giou_weight=2.0)
    assert cost.shape == (1, 1, 2)
    l1 = 0.3 + 0.3 + 0.1 + 0.1
    iou, giou = _reference(np.asarray(box_ops.cxcywh_to_xyxy(gt[0])), np.asarray(box_ops.cxcywh_to_xyxy(pred[0])))
    assert giou[0, 1] < 0 and iou[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(cost[0, 0], [-2.0, 5 * l1 - 2 * giou[0, 1]], rtol=1e-5)


def _valid_mask(rng: np.random.Generator, batch: int, rows: int) -> np.ndarray:
    counts = rng.integers(0, rows + 1, batch)
    counts[0] = 0                      # an all-padded image
    if batch > 1:
        counts[1] = min(rows, 1)       # one valid row
    if batch > 2:
        counts[2] = rows               # every row valid
    valid = np.arange(rows)[None, :] < counts[:, None]
    return np.stack([rng.permutation(v) for v in valid])   # padding not only at the end


@pytest.mark.parametrize("batch,rows,cols", [(4, 3, 5), (4, 5, 5), (3, 1, 1), (5, 6, 9), (3, 4, 4)])
def test_hungarian_matches_scipy(batch: int, rows: int, cols: int):
    rng = np.random.default_rng(rows * 100 + cols)
    cost = rng.normal(size=(batch, rows, cols)).astype(np.float32)
    valid = _valid_mask(rng, batch, rows)
    cost_with_garbage = np.where(valid[..., None], cost, np.nan).astype(np.float32)   # padding may hold NaN
    index = np.asarray(jax.jit(box_ops.hungarian_match)(jnp.asarray(cost_with_garbage), jnp.asarray(valid)))
    assert index.shape == (batch, rows) and index.dtype == np.int32
    for b in range(batch):
        assert len(set(index[b].tolist())) == rows and index[b].min() >= 0 and index[b].max() < cols
        valid_rows = np.flatnonzero(valid[b])
        if not len(valid_rows):
            continue
        want_rows, want_cols = linear_sum_assignment(cost[b][valid_rows])
        np.testing.assert_allclose(cost[b][valid_rows, index[b][valid_rows]].sum(),
                                   cost[b][valid_rows][want_rows, want_cols].sum(), rtol=1e-5)
        np.testing.assert_array_equal(index[b][valid_rows[want_rows]], want_cols)   # continuous costs: unique


def test_hungarian_on_matching_cost_recovers_permutation():
    rng = np.random.default_rng(3)
    gt = np.concatenate([rng.uniform(0.2, 0.8, (2, 4, 2)), rng.uniform(0.05, 0.3, (2, 4, 2))], -1)
    perm = np.stack([rng.permutation(6) for _ in range(2)])
    pred = rng.uniform(0.2, 0.8, (2, 6, 4)) * np.array([1, 1, 0.2, 0.2])
    for b in range(2):
        pred[b, perm[b, :4]] = gt[b] + rng.normal(0, 1e-3, (4, 4))
    cost = box_ops.matching_cost(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32))
    index = np.asarray(box_ops.hungarian_match(cost, jnp.ones((2, 4), bool)))
    np.testing.assert_array_equal(index, perm[:, :4])


def test_hungarian_shape_errors():
    with pytest.raises(ValueError, match="N <= Q"):
        box_ops.hungarian_match(jnp.zeros((2, 4, 3)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="valid"):
        box_ops.hungarian_match(jnp.zeros((2, 3, 3)), jnp.ones((2, 2), bool))
    assert box_ops.hungarian_match(jnp.zeros((2, 0, 3)), jnp.ones((2, 0), bool)).shape == (2, 0)
