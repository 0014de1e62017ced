"""Load and save CLIP / SigLIP models in the Hugging Face directory format.

``load_pretrained`` reads config.json + safetensors with numpy only (no torch), builds the
model abstractly with ``nnx.eval_shape`` and fills its params from the name table in
``hf_clip``; the tokenizer and preprocessing come from the same directory, as open_clip
users expect. ``save_pretrained`` writes a directory that transformers'
``CLIPModel.from_pretrained`` / ``SiglipModel.from_pretrained`` loads; a model transformers
cannot represent (a conv image stem) is written in vlm_jax's own format instead: config.json with
``model_type`` "vlm_jax_clip" and the ``CLIPConfig`` fields, model.safetensors under our own
dotted param names. ``load_pretrained`` reads both.

``text_context_length`` loads a CLIP text tower at a longer context than it was trained with by
Long-CLIP's stretch of its position embedding (`vlm_jax.weights.positions`): 77 positions load as
248, and any ``20 + k * (stored - 20)`` for an integer k. The model is built at the new length, its
tokenizer pads to it, and ``save_pretrained`` writes it as the model's ``max_position_embeddings``,
so the saved directory reloads at the new length with no stretch.
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

from vlm_jax.errors import UserError
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlm_jax.weights import atomic, hf_clip, positions, safetensors_dir
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


def read_config(path: epath.PathLike, *, dtype: str = "float32", param_dtype: str = "float32") -> CLIPConfig:
    """The `CLIPConfig` a model directory's config.json describes (no weights are read).

    Raises a UserError naming the file for a missing directory, a missing config.json or one this
    package cannot build (as `load_model` does).
    """
    return _read_directory_config(path, dtype=dtype, param_dtype=param_dtype)[1]


def _read_directory_config(path: epath.PathLike, *, dtype: str, param_dtype: str) -> tuple[epath.Path, CLIPConfig, bool]:
    """(directory, its config, whether it is in our own format)."""
    safetensors_dir.check_not_pickle(path)
    directory = epath.Path(path)
    config_file = directory / "config.json"
    if not directory.exists():
        raise UserError(f"the model directory {directory} does not exist.")
    if not config_file.exists():
        raise UserError(f"no config.json in {directory}; expected a Hugging Face model directory.")
    stored_config = safetensors_dir.read_json(config_file)
    if stored_config.get("model_type") == NATIVE_MODEL_TYPE:
        return directory, _native_config(directory, stored_config, dtype=dtype, param_dtype=param_dtype), True
    try:
        config = hf_config_lib.from_hf_config(stored_config, dtype=dtype, param_dtype=param_dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{config_file} does not describe a CLIP or SigLIP model this package builds: {error}.") from None
    return directory, config, False


def with_text_context(config: CLIPConfig, text_context_length: int | None, *, where: str = "the model") -> tuple[CLIPConfig, int]:
    """(`config` at `text_context_length` text positions, the stretch factor that gets it there).

    None or the stored length: (config, 1), nothing changes. A longer length must be a Long-CLIP
    stretch of the stored one (`positions.stretch_factor`: 77 -> 248 is the factor 4) and needs a
    causal text tower pooled at its EOT token (CLIP's), the one whose short-text embeddings the
    stretch keeps. Raises a one-line UserError naming `where`, both lengths and the rule otherwise.
    """
    stored = config.text.context_length
    if text_context_length is None or int(text_context_length) == stored:
        return config, 1
    target = int(text_context_length)
    try:
        factor = positions.stretch_factor(stored, target)
    except ValueError as error:
        raise UserError(f"text_context_length={target} for {where}: {error}.") from None
    if not config.text.causal or config.text.pooling != "eot":
        raise UserError(f"text_context_length={target} for {where}: stretching the {stored} text positions keeps "
                        "short texts' embeddings only for a causal text tower pooled at its EOT token (CLIP's); this "
                        f"{config.kind} tower has causal={config.text.causal}, pooling={config.text.pooling!r}.")
    return config.replace(text=dataclasses.replace(config.text, context_length=target)), factor


def _stretch_text_positions(tensors: dict[str, np.ndarray], name: str, stored: int, factor: int) -> None:
    """Stretches tensors[name] ([stored, width]) in place; a tensor that is absent or of another
    length is left for the shape check to report against the config."""
    if factor == 1 or name not in tensors or tensors[name].ndim != 2 or tensors[name].shape[0] != stored:
        return
    tensors[name] = positions.stretch_positions(tensors[name], factor=factor)


def load_model(path: epath.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
               text_context_length: int | None = None) -> CLIP:
    """Loads only the model of a transformers CLIPModel / SiglipModel directory.

    path: directory with config.json and model.safetensors (or shards with
    model.safetensors.index.json). dtype / param_dtype: compute and storage dtypes.
    text_context_length: None (or the stored max_position_embeddings) loads the model as stored;
    a longer length builds the text tower at that length with Long-CLIP's stretch of its position
    embedding (`with_text_context`; 77 -> 248); a shorter one is a UserError.
    Raises CheckpointMismatchError (a UserError) naming the weights file and the first differing
    tensor, and a UserError naming the file for a missing, unreadable or corrupt one.
    """
    directory, config, native = _read_directory_config(path, dtype=dtype, param_dtype=param_dtype)
    config_file = directory / "config.json"
    stored_length = config.text.context_length
    config, factor = with_text_context(config, text_context_length, where=str(config_file))
    tensors = safetensors_dir.read_tensors(directory)
    if native:
        _stretch_text_positions(tensors, _TEXT_POSITIONS, stored_length, factor)
        return _fill_native(directory, config, tensors, param_dtype=param_dtype)
    _stretch_text_positions(tensors, _HF_TEXT_POSITIONS, stored_length, factor)

    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    variables = _flat_params(model)
    params = hf_clip.convert_from_hf(
        tensors, hf_clip.hf_param_table(config),
        {name: tuple(variable.shape) for name, (_, variable) in variables.items()},
        source=str(safetensors_dir.weights_file(directory)), against=f"the model built from {config_file}")
    unfilled = sorted(set(variables) - set(params))
    if unfilled:
        raise RuntimeError(f"the name table leaves model params unfilled: {unfilled}")
    target = jnp.dtype(param_dtype)
    nnx.update(model, nnx.from_flat_state([
        (path, variable.replace(jnp.asarray(params[name], dtype=target)))
        for name, (path, variable) in variables.items()]))
    return model


def load_pretrained(path: epath.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32", text_context_length: int | None = None) -> Pretrained:
    """Loads a transformers CLIPModel / SiglipModel directory with its tokenizer and preprocessing.

    path: as for ``load_model``, optionally with tokenizer.json (else tokenizer=None) and
    preprocessor_config.json (else the reference processor defaults of the model's kind).
    text_context_length: as for ``load_model``; the tokenizer pads to the model's context length.
    """
    model = load_model(path, dtype=dtype, param_dtype=param_dtype, text_context_length=text_context_length)
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
    own format (module docstring) for ``load_pretrained`` only. The export is atomic
    (`vlm_jax.weights.atomic`): ``path`` holds either the whole export, ending with
    export_complete.json, or what it held before.
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
    with atomic.atomic_export(directory, format=stored_config["model_type"]) as staging:
        safetensors_dir.write_tensors(staging, tensors)
        (staging / "config.json").write_text(json.dumps(stored_config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save(staging)
        if preprocess is not None:
            preprocess.save(staging)


# config.json model_type of vlm_jax's own format.
NATIVE_MODEL_TYPE = "vlm_jax_clip"
# CLIPConfig fields chosen when loading (dtype, param_dtype arguments), not stored.
_LOAD_TIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers")
# The text position embedding, by its transformers name and by ours (`text_context_length`).
_HF_TEXT_POSITIONS = "text_model.embeddings.position_embedding.weight"
_TEXT_POSITIONS = "text_model.embeddings.position_embedding.embedding"


def _hf_unrepresentable(config: CLIPConfig) -> str:
    """What of `config` transformers' CLIPModel / SiglipModel has no field for ("" if nothing)."""
    if config.vision.stem != "patch":
        return f"vision.stem={config.vision.stem!r} (it has a patchify stem only)"
    return ""


def _native_config(directory: epath.Path, stored_config: dict[str, Any], *, dtype: str,
                   param_dtype: str) -> CLIPConfig:
    """The config of a directory in our own format."""
    try:
        fields = dict(stored_config[NATIVE_MODEL_TYPE])
        vision, text = VisionConfig(**fields.pop("vision")), TextConfig(**fields.pop("text"))
        return CLIPConfig(vision=vision, text=text, **fields, dtype=dtype, param_dtype=param_dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{directory / 'config.json'} is not a {NATIVE_MODEL_TYPE} config this version reads: "
                        f"{error}.") from None


def _fill_native(directory: epath.Path, config: CLIPConfig, tensors: dict[str, np.ndarray], *,
                 param_dtype: str) -> CLIP:
    """Builds the model of `config` and fills it from `tensors`, named by our own param paths."""
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    variables = _flat_params(model)
    missing = [name for name in variables if name not in tensors]
    unexpected = sorted(set(tensors) - set(variables))
    mismatched_by_name = {
        name: f"{name}: checkpoint {tuple(tensors[name].shape)}, model expects {tuple(variable.shape)}"
        for name, (_, variable) in variables.items()
        if name in tensors and tuple(tensors[name].shape) != tuple(variable.shape)}
    differences = []  # in model order, then what the model lacks
    for name in variables:
        if name not in tensors:
            differences.append(f"{name} (missing from the checkpoint)")
        elif name in mismatched_by_name:
            differences.append(mismatched_by_name[name])
    differences += [f"{name} (not in the model)" for name in unexpected]
    if differences:
        raise hf_clip.mismatch_error(
            str(safetensors_dir.weights_file(directory)), against=f"the model built from {directory / 'config.json'}",
            first=differences[0], missing=missing, unexpected=unexpected, mismatched=list(mismatched_by_name.values()),
            fix="fix config.json or the weights so they describe the same model.")
    target = jnp.dtype(param_dtype)
    nnx.update(model, nnx.from_flat_state([
        (path, variable.replace(jnp.asarray(tensors[name], dtype=target)))
        for name, (path, variable) in variables.items()]))
    return model
