"""Import and export of pretrained checkpoints (Hugging Face safetensors CLIP/SigLIP)."""
