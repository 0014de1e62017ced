"""Import and export of pretrained checkpoints (Hugging Face safetensors CLIP/SigLIP)."""

from vlm_jax.weights.hf_clip import CheckpointMismatchError
from vlm_jax.weights.positions import stretch_positions, stretched_length
from vlm_jax.weights.pretrained import Pretrained, load_model, load_pretrained, save_pretrained

__all__ = ["CheckpointMismatchError", "Pretrained", "load_model", "load_pretrained", "save_pretrained",
           "stretch_positions", "stretched_length"]
