"""Train-time image augmentation on uint8 arrays, driven by a per-example numpy Generator.

The generator comes from grain's `random_map`, seeded from the pipeline seed and the example's
position, so an augmented example is reproducible and survives an iterator restore.
Horizontal flips are deliberately absent: they break captions that say "left of" / "right of".
"""

from __future__ import annotations

import math

import numpy as np


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Samples an Inception-style crop box (top, left, crop_height, crop_width).

    The area fraction is uniform in `scale` and the aspect ratio log-uniform in `ratio`
    (torchvision's RandomResizedCrop); after `attempts` misses it falls back to the largest
    centred crop whose ratio lies in `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_height, crop_width = height, int(round(height * ratio[1]))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crops a random box from `image` (uint8 [H, W, C]); the caller resizes it to the model size.

    Returns:
      uint8 [h, w, C], a view into `image`.
    """
    top, left, crop_height, crop_width = random_resized_crop_box(
        image.shape[0], image.shape[1], rng, scale=tuple(scale), ratio=tuple(ratio)
    )
    return image[top : top + crop_height, left : left + crop_width]
