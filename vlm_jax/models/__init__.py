"""Flax NNX models: CLIP/SigLIP towers and the method-specific heads built on them."""
