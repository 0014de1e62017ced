"""Multimodal language models behind one protocol, chosen by config (`config.mllm.backend`).

    mllm = make_backend(config.mllm)
    texts = mllm.generate(images, prompts, max_tokens=32)          # list of B strings
    scores = mllm.score(images, prompts, candidates)                 # float32 [B, C] log-likelihoods

`images` are uint8 [H, W, 3] numpy arrays (any size; each backend resizes or re-encodes as it
needs), `prompts` one string per image. `candidates` is one list of C strings per image (every
row the same length C). `score` is the sum of the candidate's token log-probabilities given the
image and the prompt (`normalize=True`: divided by the candidate's token count); a backend that can
only read first-token probabilities over HTTP scores VQAScore-style (`vlm_jax.mllm.http`).

Backends:
  embedded: the small image-conditioned decoder of `vlm_jax.models.captioner` on our ViT tokens,
    trained by experiments/captioner.py (`vlm_jax.mllm.embedded`); offline, jitted, KV-cached.
  openai: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, Ollama, hosted
    APIs) (`vlm_jax.mllm.http`); `python -m vlm_jax.mllm.serve` puts the embedded model behind
    the same protocol.
"""

from __future__ import annotations

from typing import Any

from vlm_jax.config_lib import ConfigError
from vlm_jax.mllm.protocol import MLLM, check_candidates

BACKENDS = ("embedded", "openai")
__all__ = ["BACKENDS", "MLLM", "check_candidates", "make_backend"]


def make_backend(section: Any) -> MLLM:
    """The backend a `config.mllm` section names (`mllm_config()` has every field)."""
    from vlm_jax.mllm.config import parse_mllm  # noqa: PLC0415

    config = parse_mllm(section)
    backend = config.backend
    if backend == "embedded":
        from vlm_jax.mllm import embedded  # noqa: PLC0415

        return embedded.EmbeddedMLLM.from_config(config)
    if backend == "openai":
        from vlm_jax.mllm import http  # noqa: PLC0415

        return http.OpenAIClient(config)
    raise ConfigError(f"mllm.backend={backend!r} is not a backend; expected one of {list(BACKENDS)}.")
