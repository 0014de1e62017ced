"""Host-side image preprocessing that matches a checkpoint's transformers image processor.

CLIP resizes the shortest side (the long side scaled and truncated to an int, as transformers does),
centre-crops and normalizes with the OpenAI statistics; SigLIP squashes to a square and normalizes with
mean = std = 0.5. Both resample with PIL on uint8 pixels, so the result equals transformers' PIL backend
up to float rounding. Images with transparency are composited onto white before anything else, again
as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# PIL's integer resampling codes, as stored in preprocessor_config.json.
_RESAMPLE_CODES = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}
_RESAMPLE_NAMES = {int(code): name for name, code in _RESAMPLE_CODES.items()}

# Defaults of the transformers processor classes, for keys a preprocessor_config.json leaves out.
_PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": {"resize": "shortest", "crop": True, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "SiglipImageProcessor": {"resize": "squash", "crop": False, "mean": SIGLIP_MEAN, "std": SIGLIP_STD},
}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How a checkpoint wants its images.

    Attributes:
      image_size: side S of the square model input.
      resize: "shortest" scales the shorter side to `resize_size` keeping the aspect ratio; "squash"
        scales both sides to `resize_size`.
      crop: centre-crop to S x S after resizing (zero-padded where the resized image is smaller).
      mean, std: per-channel statistics applied to pixels scaled to [0, 1].
      resample: PIL filter name ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming").
      resize_size: target of the resize step; None means `image_size`.
    """

    image_size: int
    resize: str = "shortest"
    crop: bool = True
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    resize_size: int | None = None

    def __post_init__(self):
        if self.resize not in ("shortest", "squash"):
            raise ValueError(f"resize must be 'shortest' or 'squash', found {self.resize!r}.")
        if self.resample not in _RESAMPLE_CODES:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE_CODES)}, found {self.resample!r}.")
        if self.resize == "shortest" and not self.crop:
            raise ValueError("resize='shortest' keeps the aspect ratio, so it needs crop=True to give a square image.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), found {self.mean} and {self.std}.")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def target_resize(self) -> int:
        return self.image_size if self.resize_size is None else self.resize_size

    @classmethod
    def clip(cls, image_size: int = 224) -> PreprocessSpec:
        return cls(image_size=image_size)

    @classmethod
    def siglip(cls, image_size: int = 224) -> PreprocessSpec:
        return cls(image_size=image_size, resize="squash", crop=False, mean=SIGLIP_MEAN, std=SIGLIP_STD)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PreprocessSpec:
        """Reads a transformers `preprocessor_config.json` (CLIPImageProcessor or SiglipImageProcessor)."""
        config_path = os.path.join(os.fspath(path), "preprocessor_config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"Expected {config_path}; save one with PreprocessSpec.save or transformers.")
        with open(config_path, encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PreprocessSpec:
        """Builds a spec from the dict of a transformers `preprocessor_config.json`."""
        processor = (config.get("image_processor_type") or "CLIPImageProcessor").removesuffix("Fast")
        processor = processor.removesuffix("Pil")
        if processor not in _PROCESSOR_DEFAULTS:
            raise ValueError(
                f"Expected a CLIPImageProcessor or SiglipImageProcessor config, found {processor!r}; "
                "describe the preprocessing with a PreprocessSpec instead."
            )
        defaults = _PROCESSOR_DEFAULTS[processor]
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if not config.get(flag, True):
                raise ValueError(
                    f"{flag}=false in the preprocessor config is not supported; model inputs are always resized, "
                    "rescaled and normalized."
                )
        if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-6):
            raise ValueError(f"Expected rescale_factor 1/255, found {config['rescale_factor']}.")

        size = config.get("size", 224)
        if isinstance(size, int):
            resize, resize_size = defaults["resize"], size
        elif "shortest_edge" in size:
            resize, resize_size = "shortest", size["shortest_edge"]
        elif "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"Expected a square resize, found size {size}.")
            resize, resize_size = "squash", size["height"]
        else:
            raise ValueError(f"Expected size as an int, {{shortest_edge}} or {{height, width}}, found {size}.")

        crop = config.get("do_center_crop", defaults["crop"])
        image_size = resize_size
        if crop:
            crop_size = config.get("crop_size", resize_size)
            if isinstance(crop_size, dict):
                if crop_size["height"] != crop_size["width"]:
                    raise ValueError(f"Expected a square crop, found crop_size {crop_size}.")
                crop_size = crop_size["height"]
            image_size = crop_size
        resample_code = config.get("resample", int(PIL.Image.Resampling.BICUBIC))
        if resample_code not in _RESAMPLE_NAMES:
            raise ValueError(f"Expected a PIL resampling code 0-5, found resample={resample_code!r}.")
        return cls(
            image_size=int(image_size),
            resize=resize,
            crop=bool(crop),
            mean=tuple(config.get("image_mean", defaults["mean"])),
            std=tuple(config.get("image_std", defaults["std"])),
            resample=_RESAMPLE_NAMES[resample_code],
            resize_size=None if resize_size == image_size else int(resize_size),
        )

    def to_config(self) -> dict[str, Any]:
        """The transformers `preprocessor_config.json` dict for this spec."""
        siglip_like = self.resize == "squash" and not self.crop
        size = (
            {"shortest_edge": self.target_resize}
            if self.resize == "shortest"
            else {"height": self.target_resize, "width": self.target_resize}
        )
        config = {
            "image_processor_type": "SiglipImageProcessor" if siglip_like else "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": size,
            "resample": int(_RESAMPLE_CODES[self.resample]),
            "do_center_crop": self.crop,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.crop:
            config["crop_size"] = {"height": self.image_size, "width": self.image_size}
        return config

    def save(self, path: str | os.PathLike) -> None:
        """Writes preprocessor_config.json, loadable by transformers' AutoImageProcessor and `from_dir`."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(os.fspath(path), "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_config(), f, indent=2)


def to_rgb(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    """Converts a PIL image of any mode, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4],
    to an RGB PIL image; transparency is composited onto white."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"Expected a uint8 image array, found dtype {image.dtype}; convert with np.uint8 first.")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"Expected an image array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], found {image.shape}.")
        if image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255.0
            image = np.round(alpha * image[..., :3] + (1 - alpha) * 255.0).astype(np.uint8)
        return PIL.Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _resized_shape(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    target = spec.target_resize
    if spec.resize == "squash":
        return target, target
    # The long side is truncated, not rounded, as in transformers' get_resize_output_image_size.
    if width <= height:
        return int(target * height / width), target
    return target, int(target * width / height)


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + size, left : left + size]
    # Smaller than the crop: pad with zeros around the image, centred as transformers' center_crop does.
    padded = np.zeros((max(size, height), max(size, width), pixels.shape[2]), pixels.dtype)
    pad_top, pad_left = math.ceil((padded.shape[0] - height) / 2), math.ceil((padded.shape[1] - width) / 2)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : top + size, max(0, left) : left + size]


def preprocess_image(image: PIL.Image.Image | np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resizes, crops and normalizes one image.

    Args:
      image: a PIL image of any mode, or a uint8 array [H, W, 3] (also [H, W], [H, W, 1], [H, W, 4]).
      spec: the checkpoint's preprocessing.
    Returns:
      float32 [S, S, 3], S = spec.image_size.
    """
    scaled = resize_and_crop(image, spec).astype(np.float32) * np.float32(1 / 255)
    return (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def resize_and_crop(image: PIL.Image.Image | np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """`preprocess_image` before normalization: uint8 RGB, resized and cropped as the spec says
    (for pixels stored once and normalized per batch)."""
    rgb = to_rgb(image)
    height, width = _resized_shape(rgb.height, rgb.width, spec)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), resample=_RESAMPLE_CODES[spec.resample])
    pixels = np.asarray(rgb)
    return _center_crop(pixels, spec.image_size) if spec.crop else pixels


def preprocess_images(images, spec: PreprocessSpec) -> np.ndarray:
    """Stacks `preprocess_image` over a sequence of B images: float32 [B, S, S, 3]."""
    return np.stack([preprocess_image(image, spec) for image in images])


def transform_boxes(boxes: np.ndarray, height: int, width: int, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of an H x W image, through `resize_and_crop`: where they land in the model's input.

    Args:
      boxes: float [N, 4] (x0, y0, x1, y1) normalized to [0, 1] by the original width and height.
      height, width: the original image's size in pixels.
      spec: the preprocessing the image goes through.
    Returns:
      (float32 [N, 4] (x0, y0, x1, y1) normalized to [0, 1] of the S x S input, clipped to it;
      bool [N]: the box keeps a positive width and height inside the input after the crop).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    resized_h, resized_w = _resized_shape(height, width, spec)
    size = spec.image_size

    def axis(length: int) -> tuple[float, float]:
        # Pixel offset of the resized image inside the crop window (see `_center_crop`): negative
        # when the crop cuts into the image, positive when it pads around a smaller one.
        if not spec.crop:
            return length, 0.0
        pad = math.ceil((max(size, length) - length) / 2)
        return length, float(pad - max(0, (length - size) // 2 + pad))

    out_size = size if spec.crop else None
    (scale_y, offset_y), (scale_x, offset_x) = axis(resized_h), axis(resized_w)
    extent_y, extent_x = (out_size or resized_h), (out_size or resized_w)
    x = (boxes[:, [0, 2]] * scale_x + offset_x) / extent_x
    y = (boxes[:, [1, 3]] * scale_y + offset_y) / extent_y
    out = np.clip(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1), 0.0, 1.0).astype(np.float32)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, keep
