"""Region crops for recognizing given boxes (RAR's detection setting): context that grows as the box
shrinks, the box sharp and its surroundings blurred.

    boxes = boxes_from_normalized_yxyx(example["regions"]["bbox"], height, width)   # Shapes World
    boxes = xywh_to_xyxy(np.asarray([a["bbox"] for a in annotations]))             # LVIS
    crops = [crop_region(image, box, size=224) for box in boxes]                    # uint8 [224, 224, 3] each

Boxes are float (x0, y0, x1, y1) in pixel-edge coordinates: pixel column c spans [c, c + 1), so a box
(0, 0, 2, 2) covers the four top-left pixels.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageFilter


def crop_scale(box_w: float, box_h: float, image_w: float, image_h: float, *, min_scale: float = 1.0,
               max_scale: float = 3.0, small_fraction: float = 1 / 8, large_fraction: float = 1 / 2) -> float:
    """How many times the box's longer side the crop window's side is.

    With r = max(box_w, box_h) / min(image_w, image_h): max_scale for r <= small_fraction, min_scale for
    r >= large_fraction, linear in r in between, so small objects get the most context.
    """
    if not 0 < small_fraction < large_fraction:
        raise ValueError(f"need 0 < small_fraction < large_fraction, got {small_fraction} and {large_fraction}.")
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}.")
    if min(image_w, image_h) <= 0:
        raise ValueError(f"image size must be positive, got {image_w} x {image_h}.")
    ratio = max(box_w, box_h) / min(image_w, image_h)
    t = float(np.clip((ratio - small_fraction) / (large_fraction - small_fraction), 0.0, 1.0))
    return max_scale + t * (min_scale - max_scale)


def crop_region(image: np.ndarray, box_xyxy: ArrayLike, *, size: int, min_scale: float = 1.0, max_scale: float = 3.0,
                blur_sigma: float = 2.0) -> np.ndarray:
    """uint8 [size, size, 3]: a square window around a box, the box sharp and the rest blurred.

    The window is centred on the box, its side `crop_scale(...)` times the box's longer side (at least one
    pixel), rounded to whole pixels; parts outside the image are filled with the image's mean colour.
    Pixels outside the box get a Gaussian blur (PIL's GaussianBlur) of standard deviation `blur_sigma` image
    pixels (0: none); pixels whose centre lies inside the box keep their values. The window is then resized
    bicubically to size x size.

    Args:
      image: uint8 [H, W, 3].
      box_xyxy: (x0, y0, x1, y1) in pixels, x1 >= x0 and y1 >= y0; it may extend past the image.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}.")
    if size < 1 or blur_sigma < 0:
        raise ValueError(f"need size >= 1 and blur_sigma >= 0, got size={size}, blur_sigma={blur_sigma}.")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {[x0, y0, x1, y1]} has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1).")
    height, width = image.shape[:2]
    box_w, box_h = x1 - x0, y1 - y0
    side = max(1, round(crop_scale(box_w, box_h, width, height, min_scale=min_scale, max_scale=max_scale)
                        * max(box_w, box_h)))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)

    mean_colour = np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    window = np.broadcast_to(mean_colour, (side, side, 3)).copy()
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + side, width), min(top + side, height)
    if src_x1 > src_x0 and src_y1 > src_y0:
        window[src_y0 - top:src_y1 - top, src_x0 - left:src_x1 - left] = image[src_y0:src_y1, src_x0:src_x1]

    if blur_sigma > 0:
        blurred = np.asarray(Image.fromarray(window).filter(ImageFilter.GaussianBlur(blur_sigma)))
        centres = np.arange(side) + 0.5
        in_x = (centres + left >= x0) & (centres + left <= x1)
        in_y = (centres + top >= y0) & (centres + top <= y1)
        window = np.where((in_y[:, None] & in_x[None, :])[..., None], window, blurred)
    return np.asarray(Image.fromarray(window).resize((size, size), Image.Resampling.BICUBIC))


def boxes_from_normalized_yxyx(boxes: ArrayLike, height: int, width: int) -> np.ndarray:
    """float64 [R, 4] pixel (x0, y0, x1, y1) from [R, 4] normalized (ymin, xmin, ymax, xmax) (TFDS BBoxFeature)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ymin, xmin, ymax, xmax = boxes.T
    return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """float64 [..., 4] (x0, y0, x1, y1) from [..., 4] (x, y, w, h) (COCO / LVIS)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def crop_annotations(images, annotations, *, size: int, min_scale: float = 1.0, max_scale: float = 3.0,
                     blur_sigma: float = 2.0) -> np.ndarray:
    """uint8 [A, size, size, 3]: each LVIS-format annotation's box ({"image_id", "bbox" [x, y, w, h]})
    cropped from `images[image_id]` by `crop_region`."""
    return np.stack([crop_region(images[annotation["image_id"]], xywh_to_xyxy(np.asarray(annotation["bbox"], float)),
                                 size=size, min_scale=min_scale, max_scale=max_scale, blur_sigma=blur_sigma)
                     for annotation in annotations]) if annotations else np.zeros((0, size, size, 3), np.uint8)
