"""Loads a transformers ``Owlv2ForObjectDetection`` directory into `vlm_jax.models.owlv2.Owlv2`.

config.json (model_type "owlv2") is read through the CLIP mapping of `hf_config` with OWLv2's own
defaults for omitted fields; model.safetensors through the CLIP name table of `hf_clip` under the
``owlv2.`` prefix (OWLv2 spells the vision pre-norm ``pre_layernorm`` where CLIP has
``pre_layrnorm``) plus the detection heads. Weights are read with safetensors into numpy.

`Owlv2Preprocess` reproduces ``Owlv2ImageProcessor``: scale to [0, 1], pad to a square at the
bottom and right, resize to the model's input with scikit-image's anti-aliased bilinear resize as
the original implementation does (Gaussian blur of sigma (factor - 1) / 2, then linear
interpolation, both with mirrored borders, clipped to the input's range), then CLIP mean/std.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from scipy import ndimage

from vlm_jax.data.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.models.clip import CLIPConfig
from vlm_jax.models.owlv2 import Owlv2, check_config
from vlm_jax.weights import hf_clip, safetensors_dir
from vlm_jax.weights import hf_config as hf_config_lib

MODEL_TYPE = "owlv2"
HF_PREFIX = "owlv2."

# Defaults of transformers' Owlv2TextConfig / Owlv2VisionConfig / Owlv2Config, for fields a config.json omits.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=16, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, pad_token_id=0, bos_token_id=49406, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=768, patch_size=16, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5)
_MODEL_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

# The original OWLv2 pads with grey; transformers 4.x does too (transformers 5 pads with black).
GREY = 0.5


def from_hf_config(stored: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32") -> CLIPConfig:
    """The towers' `CLIPConfig` of a transformers Owlv2Config dict; ValueError when it is not one we build."""
    if stored.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type is {stored.get('model_type')!r}; expected {MODEL_TYPE!r} "
                         "(an Owlv2ForObjectDetection checkpoint)")
    as_clip = {
        **_MODEL_DEFAULTS,
        **{key: stored[key] for key in _MODEL_DEFAULTS if key in stored},
        "model_type": "clip",
        "text_config": {**_TEXT_DEFAULTS, **(stored.get("text_config") or {})},
        "vision_config": {**_VISION_DEFAULTS, **(stored.get("vision_config") or {})},
    }
    for legacy in ("text_config_dict", "vision_config_dict"):
        if stored.get(legacy):
            as_clip[legacy] = stored[legacy]
    config = hf_config_lib.from_hf_config(as_clip, dtype=dtype, param_dtype=param_dtype)
    check_config(config)
    return config


def _dense(prefix: str) -> list[hf_clip.Entry]:
    return [hf_clip.Entry(f"{prefix}.weight", (f"{prefix}.kernel",), "kernel"),
            hf_clip.Entry(f"{prefix}.bias", (f"{prefix}.bias",), "bias")]


def hf_param_table(config: CLIPConfig) -> list[hf_clip.Entry]:
    """Every tensor of the transformers Owlv2ForObjectDetection checkpoint for `config` and where it goes."""
    entries = []
    for entry in hf_clip.hf_param_table(config):
        hf_name = entry.hf.replace("vision_model.pre_layrnorm.", "vision_model.pre_layernorm.")
        entries.append(dataclasses.replace(entry, hf=HF_PREFIX + hf_name,
                                           ours=tuple(HF_PREFIX + path for path in entry.ours)))
    entries += _dense("class_head.dense0") + _dense("class_head.logit_shift") + _dense("class_head.logit_scale")
    for head in ("box_head", "objectness_head"):
        entries += _dense(f"{head}.dense0") + _dense(f"{head}.dense1") + _dense(f"{head}.dense2")
    entries += [hf_clip.Entry("layer_norm.weight", ("layer_norm.scale",)),
                hf_clip.Entry("layer_norm.bias", ("layer_norm.bias",))]
    return entries


@dataclasses.dataclass(frozen=True)
class Owlv2Preprocess:
    """OWLv2's image preprocessing (module docstring).

    Attributes:
      image_size: side S of the square model input.
      mean, std: per-channel statistics of pixels in [0, 1].
      pad_value: the [0, 1] value the square padding is filled with (grey, as OWLv2 was trained).
    """

    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_value: float = GREY

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [S, S, 3]; the image fills the top-left max(H, W)-square's
        H x W corner (`padded_side` gives that side)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
        scaled = image.astype(np.float32) * np.float32(1 / 255)
        height, width = image.shape[:2]
        side = padded_side(height, width)
        padded = np.pad(scaled, ((0, side - height), (0, side - width), (0, 0)),
                        constant_values=np.float32(self.pad_value))
        resized = _resize(padded, self.image_size)
        return ((resized - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def batch(self, images) -> np.ndarray:
        """A sequence of B uint8 [H, W, 3] images -> float32 [B, S, S, 3]."""
        return np.stack([self(image) for image in images])


def padded_side(height: int, width: int) -> int:
    """The side of the square an H x W image is padded to."""
    return max(height, width)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [N, N, 3] -> [size, size, 3] as skimage.transform.resize(order=1, anti_aliasing=True)."""
    factors = np.divide(image.shape, (size, size, image.shape[2]))
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(image, sigma, cval=0, mode="mirror")
    zoomed = ndimage.zoom(filtered, [1 / f for f in factors], order=1, mode="mirror", cval=0, grid_mode=True)
    return np.clip(zoomed, image.min(), image.max())


def _read_preprocess(directory: epath.Path, config: CLIPConfig) -> Owlv2Preprocess:
    """From preprocessor_config.json when there is one, else Owlv2ImageProcessor's defaults."""
    path = directory / "preprocessor_config.json"
    image_size = config.vision.image_size
    if not path.exists():
        return Owlv2Preprocess(image_size=image_size)
    stored = safetensors_dir.read_json(path)
    size = stored.get("size", {"height": image_size, "width": image_size})
    sides = {size["height"], size["width"]} if isinstance(size, dict) else {size}
    if sides != {image_size}:
        raise UserError(f"{path} resizes to {size} but the model's vision_config.image_size is {image_size}; "
                        "make them agree.")
    return Owlv2Preprocess(image_size=image_size, mean=tuple(stored.get("image_mean", OPENAI_CLIP_MEAN)),
                           std=tuple(stored.get("image_std", OPENAI_CLIP_STD)))


def load_model(directory: epath.PathLike, *, dtype: str = "float32", param_dtype: str = "float32") -> Owlv2:
    """The `Owlv2` of a transformers Owlv2ForObjectDetection directory (config.json + safetensors).

    Raises a one-line UserError (CheckpointMismatchError) naming the first missing, unexpected or
    misshaped tensor, and one naming the file for a missing or unreadable config or weights file.
    """
    safetensors_dir.check_not_pickle(directory)
    directory = epath.Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise UserError(f"no config.json in {directory}; expected a Hugging Face Owlv2ForObjectDetection directory.")
    try:
        config = from_hf_config(safetensors_dir.read_json(config_file), dtype=dtype, param_dtype=param_dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{config_file} does not describe an OWLv2 model this package builds: {error}.") from None
    tensors = safetensors_dir.read_tensors(directory)
    model = nnx.eval_shape(lambda: Owlv2(config, rngs=nnx.Rngs(0)))
    variables = {".".join(map(str, path)): (path, variable)
                 for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    params = hf_clip.convert_from_hf(
        tensors, hf_param_table(config), {name: tuple(variable.shape) for name, (_, variable) in variables.items()},
        source=str(safetensors_dir.weights_file(directory)), against=f"the model built from {config_file}")
    unfilled = sorted(set(variables) - set(params))
    if unfilled:
        raise RuntimeError(f"the OWLv2 name table leaves model params unfilled: {unfilled}")
    target = jnp.dtype(param_dtype)
    nnx.update(model, nnx.from_flat_state([
        (path, variable.replace(jnp.asarray(params[name], dtype=target))) for name, (path, variable) in variables.items()]))
    return model


def load_owlv2(directory: epath.PathLike, *, dtype: str = "float32",
               param_dtype: str = "float32") -> tuple[Owlv2, Tokenizer | None, Owlv2Preprocess]:
    """(model, tokenizer, preprocess) of a transformers Owlv2ForObjectDetection directory.

    The tokenizer (None without tokenizer.json) pads to the text tower's context length; the
    preprocessing takes mean/std from preprocessor_config.json when present.
    """
    model = load_model(directory, dtype=dtype, param_dtype=param_dtype)
    directory = epath.Path(directory)
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_dir(directory, context_length=model.config.text.context_length)
    return model, tokenizer, _read_preprocess(directory, model.config)
