"""The OWLv2 open-vocabulary detector backend: a transformers Owlv2ForObjectDetection directory, in JAX.

    detector = Owlv2Detector("/models/owlv2-base-patch16-ensemble")
    detections = detector.detect(images, queries=[["a dog", "a ball"], ["a cat"]], ids=["img0", "img1"])

Images are padded to a square at the bottom and right before the model sees them
(`vlm_jax.weights.hf_owlv2.Owlv2Preprocess`), so boxes come back normalized by that square; they are
rescaled here to the original image (box * side / width, box * side / height) and clipped to it.
Each patch's box scores the maximum over its image's queries of sigmoid(logit) and is labelled with
the query that attains it, as transformers' ``post_process_object_detection``; every box is returned,
best first, for the caller to threshold.

Images run in batches of ``batch_size`` (the last one filled with blank images), each image's queries
padded to the longest query list of its batch with all-padding queries, which the model masks; the
jitted forward compiles once per number of queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.errors import UserError
from vlm_jax.mllm.protocol import Detections
from vlm_jax.weights.hf_owlv2 import load_owlv2, padded_side


def corners_in_image(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model boxes float [P, 4] (cx, cy, w, h) in [0, 1] of the padded square -> float32 [P, 4]
    (x0, y0, x1, y1) in [0, 1] of the original H x W image, clipped to it."""
    side = padded_side(height, width)
    centre, size = boxes[:, :2], boxes[:, 2:]
    corners = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    corners = corners * np.array([side / width, side / height, side / width, side / height])
    return np.clip(corners, 0.0, 1.0).astype(np.float32)


class Owlv2Detector:
    """Open-vocabulary detection with a loaded OWLv2 (module docstring)."""

    def __init__(self, model_dir: str, batch_size: int = 8):
        """model_dir: a transformers Owlv2ForObjectDetection directory with tokenizer.json;
        batch_size: images per forward pass."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        model, tokenizer, preprocess = load_owlv2(model_dir)
        if tokenizer is None:
            raise UserError(f"no tokenizer.json in {model_dir}; the detector tokenizes its text queries, so save the "
                            "checkpoint's tokenizer into it: AutoTokenizer.from_pretrained(ID).save_pretrained(DIR).")
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self._pad_id = model.config.text.pad_token_id
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, pixel_values: jax.Array, query_ids: jax.Array):
            boxes, logits, _ = nnx.merge(graphdef, state).detect(pixel_values, query_ids)
            return boxes, jax.nn.sigmoid(jnp.max(logits, axis=-1)), jnp.argmax(logits, axis=-1)

        self._state = state
        self._forward = forward

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]],
               ids: Sequence[str]) -> list[Detections]:
        """Every box of each image, best first.

        Args:
          images: B uint8 [H, W, 3] arrays, any sizes.
          queries: one list of text queries per image (an empty list gives no detections).
          ids: one id per image, named in errors about it.
        Returns:
          B Detections: boxes float32 [P, 4] (x0, y0, x1, y1) in [0, 1] of the original image, scores
          float32 [P] descending, queries int32 [P] (index into that image's query list).
        """
        if not len(images) == len(queries) == len(ids):
            raise ValueError(f"{len(images)} images, {len(queries)} query lists and {len(ids)} ids; give one query "
                             "list and one id per image.")
        for image, texts, image_id in zip(images, queries, ids):
            if isinstance(texts, str):
                raise ValueError(f"the queries of image {image_id!r} are one string {texts!r}; give a list of strings.")
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
                raise ValueError(f"image {image_id!r} is {image.dtype} {image.shape}; expected a uint8 RGB array "
                                 "[H, W, 3].")
        results = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            results += self._detect_batch(images[start:stop], queries[start:stop])
        return results

    def _detect_batch(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]]) -> list[Detections]:
        size, length = self.preprocess.image_size, self.tokenizer.context_length
        num_queries = max(1, max(len(row) for row in queries))
        pixel_values = np.zeros((self.batch_size, size, size, 3), np.float32)
        query_ids = np.full((self.batch_size, num_queries, length), self._pad_id, np.int32)
        for row, (image, texts) in enumerate(zip(images, queries)):
            pixel_values[row] = self.preprocess(np.asarray(image))
            if texts:
                query_ids[row, : len(texts)] = self.tokenizer(list(texts))
        boxes, scores, labels = (np.asarray(a) for a in self._forward(self._state, pixel_values, query_ids))
        results = []
        for row, (image, texts) in enumerate(zip(images, queries)):
            if not texts:
                results.append(Detections.empty())
                continue
            order = np.argsort(-scores[row], kind="stable")
            height, width = np.asarray(image).shape[:2]
            results.append(Detections(boxes=corners_in_image(boxes[row][order], height, width),
                                      scores=scores[row][order].astype(np.float32),
                                      queries=labels[row][order].astype(np.int32)))
        return results
