"""Load and save CLIP / SigLIP models in the Hugging Face directory format.

``load_pretrained`` reads config.json + safetensors with numpy only (no torch), builds the
model abstractly with ``nnx.eval_shape`` and fills its params from the name table in
``hf_clip``; the tokenizer and preprocessing come from the same directory, as open_clip
users expect. ``save_pretrained`` writes a directory that transformers'
``CLIPModel.from_pretrained`` / ``SiglipModel.from_pretrained`` loads; a model transformers
cannot represent (a conv image stem) is written in vlm_jax's own format instead: config.json with
``model_type`` "vlm_jax_clip" and the ``CLIPConfig`` fields, model.safetensors under our own
dotted param names. ``load_pretrained`` reads both.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlm_jax.weights import hf_clip, safetensors_dir
from vlm_jax.weights import hf_config as hf_config_lib

# What each kind's reference processor does when a directory has no preprocessor_config.json:
# CLIP resizes the shortest side and centre-crops with OpenAI's statistics, SigLIP squashes
# to the square and scales to [-1, 1].
_DEFAULT_PREPROCESS = {
    "clip": dict(resize="shortest", crop=True, mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711), resample="bicubic"),
    "siglip": dict(resize="squash", crop=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   resample="bicubic"),
}


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: model, its tokenizer (None if the directory has none), its
    image preprocessing and its config."""

    model: CLIP
    tokenizer: Any
    preprocess: Any
    config: CLIPConfig


def _flat_params(model: CLIP) -> dict[str, tuple[tuple, nnx.Param]]:
    """{dotted name: (state path, Param)}; dotted names are the name table's."""
    return {".".join(map(str, path)): (path, variable)
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_model(path: epath.PathLike, *, dtype: str = "float32", param_dtype: str = "float32") -> CLIP:
    """Loads only the model of a transformers CLIPModel / SiglipModel directory.

    path: directory with config.json and model.safetensors (or shards with
    model.safetensors.index.json). dtype / param_dtype: compute and storage dtypes.
    Raises CheckpointMismatchError listing every missing, unexpected or mis-shaped tensor.
    """
    safetensors_dir.check_not_pickle(path)
    directory = epath.Path(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {directory}; expected a Hugging Face model directory")
    stored_config = json.loads(config_file.read_text())
    if stored_config.get("model_type") == NATIVE_MODEL_TYPE:
        return _load_native(directory, stored_config, dtype=dtype, param_dtype=param_dtype)
    config = hf_config_lib.from_hf_config(stored_config, dtype=dtype, param_dtype=param_dtype)
    tensors = safetensors_dir.read_tensors(directory)

    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    variables = _flat_params(model)
    params = hf_clip.convert_from_hf(
        tensors, hf_clip.hf_param_table(config),
        {name: tuple(variable.shape) for name, (_, variable) in variables.items()},
        source=str(directory))
    unfilled = sorted(set(variables) - set(params))
    if unfilled:
        raise RuntimeError(f"the name table leaves model params unfilled: {unfilled}")
    target = jnp.dtype(param_dtype)
    nnx.update(model, nnx.from_flat_state([
        (path, variable.replace(jnp.asarray(params[name], dtype=target)))
        for name, (path, variable) in variables.items()]))
    return model


def load_pretrained(path: epath.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32") -> Pretrained:
    """Loads a transformers CLIPModel / SiglipModel directory with its tokenizer and preprocessing.

    path: as for ``load_model``, optionally with tokenizer.json (else tokenizer=None) and
    preprocessor_config.json (else the reference processor defaults of the model's kind).
    """
    model = load_model(path, dtype=dtype, param_dtype=param_dtype)
    directory = epath.Path(path)
    return Pretrained(model=model, tokenizer=_load_tokenizer(directory, model.config),
                      preprocess=_load_preprocess(directory, model.config), config=model.config)


def _load_tokenizer(directory: epath.Path, config: CLIPConfig):
    if not (directory / "tokenizer.json").exists():
        return None
    from vlm_jax.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(directory, context_length=config.text.context_length)


def _load_preprocess(directory: epath.Path, config: CLIPConfig):
    from vlm_jax.data.preprocess import PreprocessSpec

    if (directory / "preprocessor_config.json").exists():
        return PreprocessSpec.from_dir(directory)
    return PreprocessSpec(image_size=config.vision.image_size, **_DEFAULT_PREPROCESS[config.kind])


def save_pretrained(model: CLIP, path: epath.PathLike, *, tokenizer: Any = None,
                    preprocess: Any = None) -> None:
    """Writes config.json + model.safetensors (+ tokenizer / preprocessor files) to ``path``.

    Params are written in their stored dtype; transformers loads the directory with
    ``CLIPModel.from_pretrained`` or ``SiglipModel.from_pretrained``, except for a model whose
    config transformers cannot represent (``_hf_unrepresentable``), which is written in our
    own format (module docstring) for ``load_pretrained`` only.
    """
    directory = epath.Path(path)
    config = model.config
    params = {name: np.asarray(variable[...]) for name, (_, variable) in _flat_params(model).items()}
    reason = _hf_unrepresentable(config)
    if reason:
        logging.info("%s: transformers' CLIPModel cannot represent %s; saving in vlm_jax's own format "
                     "(load_pretrained reads it, transformers does not).", directory, reason)
        fields = dataclasses.asdict(config)
        for name in _LOAD_TIME_FIELDS:
            fields.pop(name)
        stored_config = {"model_type": NATIVE_MODEL_TYPE, "dtype": str(jnp.dtype(config.param_dtype)),
                         NATIVE_MODEL_TYPE: fields}
        tensors = params
    else:
        stored_config = hf_config_lib.to_hf_config(config)
        tensors = hf_clip.convert_to_hf(params, hf_clip.hf_param_table(config))
    safetensors_dir.write_tensors(directory, tensors)
    (directory / "config.json").write_text(json.dumps(stored_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    if preprocess is not None:
        preprocess.save(directory)


# config.json model_type of vlm_jax's own format.
NATIVE_MODEL_TYPE = "vlm_jax_clip"
# CLIPConfig fields chosen when loading (dtype, param_dtype arguments), not stored.
_LOAD_TIME_FIELDS = ("dtype", "param_dtype", "remat")


def _hf_unrepresentable(config: CLIPConfig) -> str:
    """What of `config` transformers' CLIPModel / SiglipModel has no field for ("" if nothing)."""
    if config.vision.stem != "patch":
        return f"vision.stem={config.vision.stem!r} (it has a patchify stem only)"
    return ""


def _load_native(directory: epath.Path, stored_config: dict[str, Any], *, dtype: str,
                 param_dtype: str) -> CLIP:
    """Builds the model of a directory in our own format and fills it; tensor names are ours."""
    fields = dict(stored_config[NATIVE_MODEL_TYPE])
    vision, text = VisionConfig(**fields.pop("vision")), TextConfig(**fields.pop("text"))
    config = CLIPConfig(vision=vision, text=text, **fields, dtype=dtype, param_dtype=param_dtype)
    tensors = safetensors_dir.read_tensors(directory)
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    variables = _flat_params(model)
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    mismatched = [f"{name}: checkpoint {tuple(tensors[name].shape)}, model expects {tuple(variable.shape)}"
                  for name, (_, variable) in variables.items()
                  if name in tensors and tuple(tensors[name].shape) != tuple(variable.shape)]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {directory} does not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        lines.append("  Fix config.json or the weights so they describe the same model.")
        raise hf_clip.CheckpointMismatchError("\n".join(lines))
    target = jnp.dtype(param_dtype)
    nnx.update(model, nnx.from_flat_state([
        (path, variable.replace(jnp.asarray(tensors[name], dtype=target)))
        for name, (path, variable) in variables.items()]))
    return model
