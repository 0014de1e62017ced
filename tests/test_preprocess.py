"""Preprocessing parity with transformers' image processors.

Reference backend: transformers 5.x PIL classes `CLIPImageProcessorPil` / `SiglipImageProcessorPil`, which
`AutoImageProcessor` falls back to when torchvision is not installed (the test asserts which one it got).
"""

import json

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from vlm_jax.data.preprocess import PreprocessSpec, preprocess_image, preprocess_images, to_rgb

transformers = pytest.importorskip("transformers")

TOLERANCE = 1 / 255


def _photo(width, height, seed):
    """An RGB picture with a smooth gradient, filled shapes, a line and pixel noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [255 * xs / max(width - 1, 1), 255 * ys / max(height - 1, 1), 127 + 120 * np.sin((xs + ys) / 7.0)], axis=-1
    )
    image = PIL.Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(3, max(4, width // 2)), y0 + rng.integers(3, max(4, height // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    draw.line([0, 0, width, height], fill=(255, 255, 0), width=2)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _test_images():
    """Photos of many shapes (portrait, landscape, square; smaller and larger than the 32 px target, odd
    sizes) and modes (RGB, RGBA with varying alpha, L, LA, P, P with a transparent index, numpy arrays)."""
    images = {}
    for i, (w, h) in enumerate([(64, 48), (48, 64), (32, 32), (20, 12), (12, 30), (300, 97), (97, 300), (33, 35), (40, 40)]):
        images[f"rgb_{w}x{h}"] = _photo(w, h, seed=i)
    rgba = _photo(70, 50, seed=11).convert("RGBA")
    rgba.putalpha(PIL.Image.fromarray(np.tile(np.linspace(0, 255, 70).astype(np.uint8), (50, 1))))
    images["rgba_70x50"] = rgba
    images["gray_L_45x60"] = _photo(45, 60, seed=12).convert("L")
    images["gray_LA_50x41"] = _photo(50, 41, seed=13).convert("LA")
    images["palette_P_60x44"] = _photo(60, 44, seed=14).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=32)
    transparent = _photo(44, 60, seed=15).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 3
    images["palette_transparent_44x60"] = transparent
    images["numpy_rgb_51x80"] = np.asarray(_photo(51, 80, seed=16))
    return images


def _reference_pixels(processor, image):
    pixels = processor(images=image, return_tensors="np")["pixel_values"]
    return np.transpose(pixels[0], (1, 2, 0))


def _assert_matches_reference(spec, processor, expected_class):
    assert type(processor).__name__ == expected_class
    for name, image in _test_images().items():
        ours = preprocess_image(image, spec)
        expected = _reference_pixels(processor, image)
        assert ours.dtype == np.float32 and ours.shape == (spec.image_size, spec.image_size, 3), name
        # Compared in [0, 1] pixel units, so the tolerance reads as "within one uint8 level".
        error = np.abs(ours - expected) * np.asarray(spec.std, np.float32)
        assert error.max() <= TOLERANCE, f"{name}: max error {error.max() * 255:.3f}/255"


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_clip_spec_matches_clip_image_processor(tmp_path, resample):
    spec = PreprocessSpec(image_size=32, resample=resample)
    spec.save(tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    _assert_matches_reference(spec, processor, "CLIPImageProcessorPil")


def test_clip_spec_with_resize_larger_than_crop_matches(tmp_path):
    spec = PreprocessSpec(image_size=28, resize_size=36)
    spec.save(tmp_path)
    _assert_matches_reference(spec, transformers.AutoImageProcessor.from_pretrained(tmp_path), "CLIPImageProcessorPil")


def test_crop_larger_than_resize_pads_like_transformers(tmp_path):
    spec = PreprocessSpec(image_size=40, resize_size=30)
    spec.save(tmp_path)
    _assert_matches_reference(spec, transformers.AutoImageProcessor.from_pretrained(tmp_path), "CLIPImageProcessorPil")


def test_siglip_spec_matches_siglip_image_processor(tmp_path):
    spec = PreprocessSpec.siglip(image_size=32)
    spec.save(tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    _assert_matches_reference(spec, processor, "SiglipImageProcessorPil")


def test_from_dir_reads_processor_configs_that_transformers_writes(tmp_path):
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}, resample=2
    ).save_pretrained(tmp_path / "clip")
    assert PreprocessSpec.from_dir(tmp_path / "clip") == PreprocessSpec(
        image_size=36, resize="shortest", crop=True, resample="bilinear", resize_size=40
    )
    transformers.SiglipImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tmp_path / "siglip")
    assert PreprocessSpec.from_dir(tmp_path / "siglip") == PreprocessSpec.siglip(48)


def test_from_dir_reads_legacy_int_sizes_and_class_defaults(tmp_path):
    config = {"image_processor_type": "CLIPImageProcessor", "size": 224, "crop_size": 224}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert PreprocessSpec.from_dir(tmp_path) == PreprocessSpec.clip(224)


@pytest.mark.parametrize(
    "spec",
    [PreprocessSpec.clip(32), PreprocessSpec.siglip(48), PreprocessSpec(image_size=28, resize_size=36, resample="bilinear"),
     PreprocessSpec(image_size=30, resize="squash", crop=True, resize_size=34)],
)  # fmt: skip
def test_save_then_from_dir_round_trips(tmp_path, spec):
    spec.save(tmp_path)
    assert PreprocessSpec.from_dir(tmp_path) == spec


def test_squash_ignores_aspect_ratio_and_normalizes_constant_image_exactly():
    spec = PreprocessSpec.siglip(16)
    red = np.zeros((10, 50, 3), np.uint8)
    red[..., 0] = 255
    out = preprocess_image(red, spec)
    np.testing.assert_allclose(out[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 1:], -1.0, atol=1e-6)


def test_transparent_pixels_become_white_and_grayscale_repeats():
    clear = np.zeros((8, 8, 4), np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(clear)), 255)
    gray = np.full((5, 7), 80, np.uint8)
    rgb = np.asarray(to_rgb(gray))
    assert rgb.shape == (5, 7, 3) and (rgb == 80).all()


def test_preprocess_images_stacks_a_batch():
    batch = preprocess_images([_photo(40, 30, 0), _photo(30, 40, 1)], PreprocessSpec.clip(24))
    assert batch.shape == (2, 24, 24, 3) and batch.dtype == np.float32


def test_invalid_specs_and_configs_raise():
    with pytest.raises(ValueError, match="needs crop=True"):
        PreprocessSpec(image_size=32, crop=False)
    with pytest.raises(ValueError, match="resample"):
        PreprocessSpec(image_size=32, resample="cubic")
    with pytest.raises(ValueError, match="square"):
        PreprocessSpec.from_config({"image_processor_type": "SiglipImageProcessor", "size": {"height": 3, "width": 4}})
