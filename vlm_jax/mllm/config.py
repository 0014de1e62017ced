"""`config.mllm`: which multimodal LM a method talks to, and how (one flat section for every backend)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from vlm_jax.config_lib import defaults_of, typed

SERVER_KINDS = ("openai", "vllm", "sglang", "llamacpp", "ollama")


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """backend: "embedded" | "openai".

    embedded (`vlm_jax.mllm.embedded`): model_dir, the export of experiments/captioner.py ("" with
    a method that trains one: the method fills it in); batch_size images per jitted call;
    beam_size (1: greedy decoding).

    openai (`vlm_jax.mllm.http`): base_url (e.g. http://localhost:8000/v1), model, api_key_env
    (the name of the environment variable holding the key; "" sends none; the key itself is never
    in a config, a log or a file), server_kind (how structured output is asked for: openai/vllm/
    sglang: response_format json_schema; llamacpp: response_format with the schema at the top level;
    ollama: JSON mode), structured_output (False: plain text, parsed), max_side (images downscaled
    so their longer side is at most this, then re-encoded as image_format at jpeg_quality),
    concurrency (requests in flight; one image per request), timeout_s, max_retries and backoff_s
    (retries on 429, 5xx, timeouts and connection errors, exponential backoff), temperature, cache_dir (an
    on-disk response cache keyed by model, image hash, prompt and parameters; "" none),
    score_question (the VQAScore question `score` asks per candidate, first-token log p("Yes")
    through `logprobs`)."""

    backend: str = "embedded"
    model_dir: str = ""
    batch_size: int = 64
    beam_size: int = 1
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    server_kind: str = "openai"
    structured_output: bool = True
    max_side: int = 512
    image_format: str = "jpeg"
    jpeg_quality: int = 90
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    temperature: float = 0.0
    cache_dir: str = ""
    score_question: str = 'Does this figure show "{}"? Please answer Yes or No.'

    def __post_init__(self):
        if self.backend not in ("embedded", "openai"):
            raise ValueError(f"mllm.backend must be 'embedded' or 'openai', got {self.backend!r}")
        if self.server_kind not in SERVER_KINDS:
            raise ValueError(f"mllm.server_kind must be one of {SERVER_KINDS}, got {self.server_kind!r}")
        if self.image_format not in ("jpeg", "png"):
            raise ValueError(f"mllm.image_format must be 'jpeg' or 'png', got {self.image_format!r}")
        for name in ("batch_size", "beam_size", "max_side", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"mllm.{name} must be >= 1, got {getattr(self, name)}")


def mllm_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.mllm` section with every field and its default."""
    section = defaults_of(MLLMConfig)
    section.update(overrides)
    return section


def parse_mllm(section: Any) -> MLLMConfig:
    """`config.mllm` -> MLLMConfig; an unknown field is a one-line ConfigError."""
    return typed(MLLMConfig, section, "mllm")
