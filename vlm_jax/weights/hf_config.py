"""The transformers config.json <-> `CLIPConfig` mapping (CLIPModel and SiglipModel).

Fields transformers does not store (dtype, param_dtype, remat, remat_policy, scan_layers) come from the caller; fields a
config.json omits take the transformers config classes' defaults.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from vlm_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

_HF_ACT_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                 "gelu_new": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# Defaults of transformers 5.x config classes, used where a config.json omits a field.
_HF_DEFAULTS = {
    "clip": {
        "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, num_channels=3),
    },
    "siglip": {
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
                       vision_use_head=True),
    },
}


def _single_int(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{field}={value}: only square images/patches are supported")
        value = value[0]
    return int(value)


def _hf_act(name: str, field: str) -> str:
    if name not in _HF_ACT_NAMES:
        raise ValueError(f"{field}={name!r} is not supported; expected one of {sorted(_HF_ACT_NAMES)}")
    return _HF_ACT_NAMES[name]


def from_hf_config(hf_config: dict[str, Any], **overrides: Any) -> CLIPConfig:
    """Reads a transformers CLIPModel / SiglipModel config.json dict; overrides set
    fields transformers does not store (dtype, param_dtype, remat)."""
    model_type = hf_config.get("model_type")
    if model_type not in ("clip", "siglip"):
        raise ValueError(f"config.json model_type is {model_type!r}; expected 'clip' or 'siglip' "
                         "(a CLIPModel or SiglipModel checkpoint)")
    defaults = _HF_DEFAULTS[model_type]
    # Old CLIP configs carry the real values in text_config_dict / vision_config_dict.
    text = {**defaults["text"], **(hf_config.get("text_config") or {}),
            **(hf_config.get("text_config_dict") or {})}
    vision = {**defaults["vision"], **(hf_config.get("vision_config") or {}),
              **(hf_config.get("vision_config_dict") or {})}
    if int(vision.get("num_channels", 3)) != 3:
        raise ValueError(f"vision_config.num_channels={vision['num_channels']}; only RGB (3) is supported")
    eos = text["eos_token_id"]
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    siglip = model_type == "siglip"
    if siglip and not vision.get("vision_use_head", True):
        raise ValueError("SigLIP vision_config.vision_use_head=False has no pooled image embedding; "
                         "only checkpoints with the attention pooling head are supported")
    vision_config = VisionConfig(
        image_size=_single_int(vision["image_size"], "vision_config.image_size"),
        patch_size=_single_int(vision["patch_size"], "vision_config.patch_size"),
        width=vision["hidden_size"], depth=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
        act=_hf_act(vision["hidden_act"], "vision_config.hidden_act"),
        pooling="map" if siglip else "cls", pre_norm=not siglip, patch_bias=siglip,
        layer_norm_eps=float(vision["layer_norm_eps"]))
    text_config = TextConfig(
        vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
        width=text["hidden_size"], depth=text["num_hidden_layers"], heads=text["num_attention_heads"],
        mlp_dim=text["intermediate_size"], act=_hf_act(text["hidden_act"], "text_config.hidden_act"),
        causal=not siglip, pooling="last" if siglip else "eot", eos_token_id=int(eos),
        pad_token_id=text["pad_token_id"], bos_token_id=text["bos_token_id"],
        layer_norm_eps=float(text["layer_norm_eps"]))
    if siglip:
        projection = text.get("projection_size") or text_config.width
        fields = dict(embed_dim=projection, kind="siglip", logit_scale_init=math.log(10.0),
                      logit_bias_init=-10.0)
    else:
        fields = dict(embed_dim=hf_config.get("projection_dim", 512), kind="clip",
                      logit_scale_init=hf_config.get("logit_scale_init_value", 2.6592),
                      logit_bias_init=None)
    return CLIPConfig(vision=vision_config, text=text_config, **{**fields, **overrides})


def to_hf_config(config: CLIPConfig) -> dict[str, Any]:
    """The transformers config.json dict (CLIPModel or SiglipModel) for `config`; raises
    ValueError for a config transformers cannot express."""
    siglip = config.kind == "siglip"
    vision, text = config.vision, config.text
    expected = {
        "vision.pooling": (vision.pooling, "map" if siglip else "cls"),
        "vision.pre_norm": (vision.pre_norm, not siglip),
        "vision.patch_bias": (vision.patch_bias, siglip),
        "vision.stem": (vision.stem, "patch"),
        "text.causal": (text.causal, not siglip),
        "text.pooling": (text.pooling, "last" if siglip else "eot"),
    }
    mismatched = [f"{name}={found!r} (needs {want!r})" for name, (found, want) in expected.items()
                  if found != want]
    if mismatched:
        model = "SiglipModel" if siglip else "CLIPModel"
        raise ValueError(f"this config has no transformers {model} equivalent: " + ", ".join(mismatched))
    text_hf = {
        "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": text.mlp_dim,
        "num_hidden_layers": text.depth, "num_attention_heads": text.heads,
        "max_position_embeddings": text.context_length, "hidden_act": _ACT_TO_HF[text.act],
        "layer_norm_eps": text.layer_norm_eps, "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
    }
    vision_hf = {
        "hidden_size": vision.width, "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads, "num_channels": 3,
        "image_size": vision.image_size, "patch_size": vision.patch_size,
        "hidden_act": _ACT_TO_HF[vision.act], "layer_norm_eps": vision.layer_norm_eps,
    }
    dtype = str(jnp.dtype(config.param_dtype))
    if siglip:
        return {
            "architectures": ["SiglipModel"], "model_type": "siglip", "dtype": dtype,
            "text_config": {"model_type": "siglip_text_model", **text_hf,
                            "projection_size": config.embed_dim},
            "vision_config": {"model_type": "siglip_vision_model", **vision_hf,
                              "vision_use_head": True},
        }
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "dtype": dtype,
        "projection_dim": config.embed_dim, "logit_scale_init_value": config.logit_scale_init,
        "text_config": {"model_type": "clip_text_model", **text_hf, "projection_dim": config.embed_dim},
        "vision_config": {"model_type": "clip_vision_model", **vision_hf,
                          "projection_dim": config.embed_dim},
    }
