"""Region crops: the context scale rule, the box kept sharp in place, blur outside it, borders padded."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_jax.data.regions import boxes_from_normalized_yxyx, crop_region, crop_scale, xywh_to_xyxy


def noise_image(height=100, width=100, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def paint_box(image, x0, y0, x1, y1):
    """The image with a distinct pattern (a colour gradient) in the box's pixels."""
    painted = image.copy()
    rows, cols = np.mgrid[y0:y1, x0:x1]
    painted[y0:y1, x0:x1] = np.stack([rows * 7 % 256, cols * 11 % 256, np.full_like(rows, 200)], -1)
    return painted


@pytest.mark.parametrize(("longer_side", "expected"), [
    (10.0, 3.0),    # 1/64 of the shorter side: below 1/8, the largest context
    (80.0, 3.0),    # exactly 1/8
    (160.0, 3 - 2 * (1 / 4 - 1 / 8) / (1 / 2 - 1 / 8)),  # 1/4: a third of the way from 1/8 to 1/2
    (200.0, 2.0),   # 5/16, halfway between 1/8 and 1/2
    (320.0, 1.0),   # exactly 1/2
    (640.0, 1.0),   # the whole shorter side
])
def test_crop_scale_is_max_for_small_boxes_min_for_large_and_linear_between(longer_side, expected):
    # The image is 800 wide and 640 high: fractions are of the shorter side, 640.
    assert crop_scale(longer_side, longer_side / 2, 800, 640) == pytest.approx(expected)
    assert crop_scale(longer_side / 2, longer_side, 800, 640) == pytest.approx(expected)


def test_crop_scale_fractions_and_scales_are_keywords():
    assert crop_scale(25, 5, 100, 100, min_scale=1.5, max_scale=2.5, small_fraction=0.2, large_fraction=0.3) == (
        pytest.approx(2.0))
    assert crop_scale(10, 10, 100, 100, min_scale=1.5, max_scale=2.5, small_fraction=0.2, large_fraction=0.3) == 2.5
    with pytest.raises(ValueError, match="small_fraction < large_fraction"):
        crop_scale(10, 10, 100, 100, small_fraction=0.5, large_fraction=0.5)
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        crop_scale(10, 10, 100, 100, min_scale=3.0, max_scale=1.0)


def test_the_box_pixels_stay_unchanged_at_the_window_centre():
    # Box 10 wide, 12 high in a 100 x 100 image: 12/100 <= 1/8, so scale 3 and a 36-pixel window whose
    # top-left corner is at x = (40 + 50 - 36) / 2 = 27, y = (30 + 42 - 36) / 2 = 18.
    image = paint_box(noise_image(), 40, 30, 50, 42)
    crop = crop_region(image, (40.0, 30.0, 50.0, 42.0), size=36, blur_sigma=2.0)
    assert crop.shape == (36, 36, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[30 - 18:42 - 18, 40 - 27:50 - 27], image[30:42, 40:50])


def test_outside_the_box_is_blurred_and_without_blur_equals_the_input():
    image = paint_box(noise_image(), 40, 30, 50, 42)
    window = image[18:54, 27:63].astype(np.float64)
    outside = np.ones((36, 36), dtype=bool)
    outside[12:24, 13:23] = False
    # Away from the box edge, so that no box pixel is blurred into the measured ring.
    far = outside.copy()
    far[8:28, 9:27] = False
    blurred = crop_region(image, (40, 30, 50, 42), size=36, blur_sigma=2.0).astype(np.float64)
    assert blurred[far].var() < 0.2 * window[far].var()
    assert np.abs(blurred[outside] - window[outside]).mean() > 20
    sharp = crop_region(image, (40, 30, 50, 42), size=36, blur_sigma=0.0)
    np.testing.assert_array_equal(sharp, image[18:54, 27:63])


def test_a_large_box_gets_no_extra_context():
    image = noise_image()
    # 80 / 100 >= 1/2: scale 1, the window is the box itself.
    crop = crop_region(image, (10, 10, 90, 90), size=80, blur_sigma=0.0)
    np.testing.assert_array_equal(crop, image[10:90, 10:90])


def test_a_corner_box_is_padded_with_the_image_mean_colour():
    image = noise_image(seed=1)
    mean = np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    # Box (0, 0, 10, 10): scale 3, a 30-pixel window from (-10, -10), of which 10 rows and columns lie outside.
    crop = crop_region(image, (0, 0, 10, 10), size=30, blur_sigma=0.0)
    np.testing.assert_array_equal(crop[:10], np.broadcast_to(mean, (10, 30, 3)))
    np.testing.assert_array_equal(crop[:, :10], np.broadcast_to(mean, (30, 10, 3)))
    np.testing.assert_array_equal(crop[10:, 10:], image[:20, :20])
    blurred = crop_region(image, (0, 0, 10, 10), size=30, blur_sigma=2.0)
    np.testing.assert_array_equal(blurred[10:20, 10:20], image[:10, :10])


def test_a_box_past_the_bottom_right_edge_is_clipped_and_padded():
    image = noise_image(height=60, width=80, seed=2)
    mean = np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    # Box (74, 54, 82, 60) is 8 x 6: 8/60 > 1/8 gives scale 3 - 2 (8/60 - 1/8) / (3/8) = 2.9556, side 24;
    # the window starts at x = (74 + 82 - 24) / 2 = 66, y = (54 + 60 - 24) / 2 = 45.
    crop = crop_region(image, (74, 54, 82, 60), size=24, blur_sigma=0.0)
    np.testing.assert_array_equal(crop[:15, :14], image[45:60, 66:80])
    np.testing.assert_array_equal(crop[15:], np.broadcast_to(mean, (9, 24, 3)))
    np.testing.assert_array_equal(crop[:, 14:], np.broadcast_to(mean, (24, 10, 3)))


def test_the_window_is_resized_to_size():
    image = np.full((50, 70, 3), (12, 200, 99), dtype=np.uint8)
    crop = crop_region(image, (20.5, 10.25, 31.0, 17.75), size=224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, np.broadcast_to(np.asarray([12, 200, 99], np.uint8), (224, 224, 3)))
    assert crop_region(noise_image(), (40, 40, 40, 40), size=7).shape == (7, 7, 3)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        crop_region(noise_image().astype(np.float32), (0, 0, 5, 5), size=8)
    with pytest.raises(ValueError, match="x1 < x0"):
        crop_region(noise_image(), (10, 0, 5, 5), size=8)


def test_box_format_helpers():
    np.testing.assert_allclose(boxes_from_normalized_yxyx([[0.1, 0.2, 0.5, 0.6]], height=100, width=200),
                               [[40.0, 10.0, 120.0, 50.0]])
    assert boxes_from_normalized_yxyx(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    np.testing.assert_allclose(xywh_to_xyxy([[10, 20, 30, 40], [0, 0, 1, 2]]), [[10, 20, 40, 60], [0, 0, 1, 2]])
    np.testing.assert_allclose(xywh_to_xyxy([1.5, 2.5, 3.0, 4.0]), [1.5, 2.5, 4.5, 6.5])
