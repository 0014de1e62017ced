"""The protocols every MLLM backend (see `vlm_jax.mllm`) and every detector backend (`vlm_jax.mllm.detector`)
offer."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Detections:
    """One image's boxes.

    Attributes:
      boxes: float32 [n, 4] (x0, y0, x1, y1) normalized to [0, 1] by the image's width and height.
      scores: float32 [n].
      queries: int32 [n]: index into that image's query list of the description that fired each box.
    """

    boxes: np.ndarray
    scores: np.ndarray
    queries: np.ndarray

    def __post_init__(self):
        boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, np.float32).reshape(-1)
        queries = np.asarray(self.queries, np.int32).reshape(-1)
        if not len(boxes) == len(scores) == len(queries):
            raise ValueError(f"Detections of {len(boxes)} boxes, {len(scores)} scores and {len(queries)} query "
                             "indices; give one score and one query index per box.")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "queries", queries)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        """No boxes."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))

    def keep(self, score_threshold: float, max_boxes: int) -> Detections:
        """The boxes scoring strictly above `score_threshold`, the `max_boxes` best (ties: the earlier box
        first), best first."""
        above = np.flatnonzero(self.scores > score_threshold)
        order = above[np.argsort(-self.scores[above], kind="stable")][:max(int(max_boxes), 0)]
        return Detections(self.boxes[order], self.scores[order], self.queries[order])


class Detector(Protocol):
    """What every detector backend offers."""

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]],
               ids: Sequence[str]) -> list[Detections]:
        """One Detections per image: the boxes its queries fire (every box; the caller thresholds).

        Args:
          images: B uint8 [H, W, 3] arrays.
          queries: one list of text queries per image.
          ids: one id per image.
        """
