"""Flax NNX models: CLIP/SigLIP towers and the method-specific heads built on them."""

from vlm_jax.models.clip import (
    CLIP,
    CLIPConfig,
    TextConfig,
    VisionConfig,
    siglip_b16,
    tiny,
    vit_b16,
    vit_b32,
    vit_l14,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "siglip_b16",
    "tiny",
    "vit_b16",
    "vit_b32",
    "vit_l14",
]
