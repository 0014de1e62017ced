"""vlm_jax: CLIP-based vision-language methods on one sharded JAX/Flax CLIP."""

__version__ = "0.1.0"
