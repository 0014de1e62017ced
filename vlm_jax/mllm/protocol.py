"""The protocol every MLLM backend offers (see `vlm_jax.mllm`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class MLLM(Protocol):
    """What every backend offers."""

    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str], max_tokens: int = 64, *,
                 schema: dict[str, Any] | None = None) -> list[str]:
        """One answer per (image, prompt). `schema`: a JSON schema the answer should follow, where the
        backend can force it (structured output); backends that cannot ignore it by design."""

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
              normalize: bool = False) -> np.ndarray:
        """float32 [B, C]: the log-likelihood of each candidate as the answer to (image, prompt)."""


def check_candidates(images: Sequence[Any], prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> int:
    """C, after checking that images, prompts and candidate rows agree in number and every row has C."""
    if not (len(images) == len(prompts) == len(candidates)):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(candidates)} candidate rows; "
                         "give one prompt and one row of candidates per image.")
    widths = {len(row) for row in candidates}
    if len(widths) > 1:
        raise ValueError(f"candidate rows differ in length ({sorted(widths)}); pad every row to the same C.")
    return widths.pop() if widths else 0
