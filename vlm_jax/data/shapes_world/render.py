"""Shapes World's look: the shapes, colours and patterns, and rendering a scene to PNG pixels.

Pure numpy and PIL; `vlm_jax.data.shapes_world.world` composes scenes and captions from these.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
PATTERNS = ("solid", "striped", "dotted", "checkered")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape, stretched to touch all four sides of the unit square."""
    if shape == "square":
        points = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":
        points = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "diamond":
        points = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        points = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    elif shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        points = list(zip(np.cos(angles), np.sin(angles)))
    elif shape == "cross":
        a, b = 0.32, 0.68
        points = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"No polygon for shape {shape!r}.")
    xs, ys = np.asarray(points, dtype=np.float64).T
    xs = (xs - xs.min()) / (xs.max() - xs.min())
    ys = (ys - ys.min()) / (ys.max() - ys.min())
    return list(zip(xs.tolist(), ys.tolist()))


@functools.lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """bool [height, width]: the pixels a shape covers inside its box."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    right, bottom = width - 1, height - 1
    if shape in ("circle", "ring"):
        draw.ellipse((0, 0, right, bottom), fill=255)
        if shape == "ring":
            inset_x, inset_y = 0.27 * width, 0.27 * height
            draw.ellipse((inset_x, inset_y, right - inset_x, bottom - inset_y), fill=0)
    else:
        draw.polygon([(x * right, y * bottom) for x, y in _polygon(shape)], fill=255)
    mask = np.asarray(canvas) > 0
    mask.flags.writeable = False
    return mask


def pattern_mask(pattern: str, width: int, height: int, period: int) -> np.ndarray:
    """bool [height, width]: where the pattern shows its second shade."""
    ys, xs = np.mgrid[0:height, 0:width]
    half = max(period // 2, 2)
    if pattern == "solid":
        return np.zeros((height, width), dtype=bool)
    if pattern == "striped":
        return ((xs + ys) // half) % 2 == 1
    if pattern == "checkered":
        return ((xs // half) + (ys // half)) % 2 == 1
    if pattern == "dotted":
        centre = (period - 1) / 2
        return ((xs % period) - centre) ** 2 + ((ys % period) - centre) ** 2 <= (0.32 * period) ** 2
    raise ValueError(f"Unknown pattern {pattern!r}; expected one of {PATTERNS}.")


def pattern_period(image_size: int) -> int:
    return max(4, round(image_size / 10))


def second_shade(colour: str) -> np.ndarray:
    """The pattern's second shade: darker for every colour, grey for black."""
    rgb = np.asarray(COLOUR_RGB[colour], dtype=np.float32)
    return np.full(3, 120.0, dtype=np.float32) if colour == "black" else rgb * 0.45


def render(scene, image_size: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """A `world.Scene` -> uint8 [image_size, image_size, 3]. Objects are opaque over a noisy background."""
    # Noise in blocks of `image_size // 16` pixels: as visible as per-pixel noise, ~7x smaller as PNG.
    block = max(2, image_size // 16)
    cells = -(-image_size // block)
    noise = rng.normal(0.0, noise_std, size=(cells, cells, 3)).astype(np.float32)
    noise = np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:image_size, :image_size]
    canvas = np.asarray(scene.background, dtype=np.float32) + noise
    period = pattern_period(image_size)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        width, height = x1 - x0, y1 - y0
        jitter = rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
        base = np.asarray(COLOUR_RGB[obj.colour], dtype=np.float32) + jitter
        shade = second_shade(obj.colour) + jitter
        fill = np.where(pattern_mask(obj.pattern, width, height, period)[..., None], shade, base)
        mask = shape_mask(obj.shape, width, height)
        region = canvas[y0:y1, x0:x1]
        region[mask] = fill[mask]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, 3]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------- the world
