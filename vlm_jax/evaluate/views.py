"""Evaluator views: the predict functions one evaluator scores (big_vision's `pred`).

A view turns an evaluation batch into unit float32 embeddings: `images(batch)` [B, D],
`captions(batch)` [B, C, D] and `prompts(texts)` [N, D]. Every evaluator is written against a
view, never against a model, so one evaluator scores a plain CLIP, CLIP+RECO or any later method,
and a side-by-side table needs no wrapper.

Two kinds of inputs start a view:
  - `pixel_view(model, tokenizer)`: the model's towers on "image" [B, H, W, 3] and "text_ids"
    [B, C, L]; prompts are tokenized.
  - `stored_view(prompts)`: embeddings the memory builder stored, read from the batch's
    "image_embedding" [B, D] and "text_embedding" [B, C, D]; prompts looked up by text
    (`StoredPrompts`). Exact for a frozen model, whose towers would compute the same again.
A view may also offer `regions(batch)`: (boxes float32 [B, Q, 4] (cx, cy, w, h) normalized to [0, 1]
of the model's input image, unit float32 region embeddings [B, Q, D]), read by the region-aware
evaluators (`evaluate.descriptions`); `pixel_view` sets it when the model has `encode_regions`.
`View.refined(image_fn, text_fn)` composes a per-modality map of embeddings [N, D] -> [N, D] on top
(RECO's fusion), run in fixed-size jitted batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.memory.store import unit_rows
from vlm_jax.models.layers import l2_normalize

Batch = Mapping[str, np.ndarray]
EmbeddingMap = Callable[[jax.Array], jax.Array]  # a jitted map of embeddings [b, D] -> [b, D]
Regions = Callable[[Batch], tuple[np.ndarray, np.ndarray]]  # batch -> (boxes [B, Q, 4], unit embeddings [B, Q, D])


@dataclasses.dataclass(frozen=True)
class View:
    """Unit float32 embeddings of an evaluation batch's images and captions, and of prompt texts;
    optionally the region queries' boxes and unit embeddings (`regions`, None when the model has none)."""

    images: Callable[[Batch], np.ndarray]
    captions: Callable[[Batch], np.ndarray]
    prompts: Callable[[Sequence[str]], np.ndarray]
    regions: Regions | None = None

    def refined(self, image_fn: EmbeddingMap | None, text_fn: EmbeddingMap | None, batch_size: int = 256) -> "View":
        """This view followed by `image_fn` on image embeddings and `text_fn` on caption and prompt
        embeddings (None: unchanged); outputs are L2-normalized again. `regions` is kept unchanged."""
        image_map = _batched(image_fn, batch_size)
        text_map = _batched(text_fn, batch_size)

        def captions(batch: Batch) -> np.ndarray:
            embeddings = self.captions(batch)
            return text_map(embeddings.reshape(-1, embeddings.shape[-1])).reshape(embeddings.shape)

        return View(images=lambda batch: image_map(self.images(batch)), captions=captions,
                    prompts=lambda texts: text_map(self.prompts(texts)), regions=self.regions)


def _batched(function: EmbeddingMap | None, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """numpy [N, D] -> unit float32 [N, D] through the jitted `function` in fixed-size batches (the
    last one padded with zeros, so ragged inputs compile once)."""
    if function is None:
        return lambda embeddings: embeddings

    def run(embeddings: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(embeddings), batch_size):
            chunk = np.asarray(embeddings[start : start + batch_size], np.float32)
            rows = len(chunk)
            if rows < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - rows, chunk.shape[1]), np.float32)])
            outputs.append(np.asarray(function(jnp.asarray(chunk)), np.float32)[:rows])
        if not outputs:
            return np.zeros((0, embeddings.shape[-1]), np.float32)
        return unit_rows(np.concatenate(outputs))

    return run


def pixel_view(model: nnx.Module, tokenizer: Callable[[Sequence[str]], np.ndarray], batch_size: int = 256) -> View:
    """The model's own towers: `model.encode_image` on "image", `model.encode_text` on "text_ids"
    [B, C, L] and on tokenized prompts; `model.encode_regions` on "image" where the model has it."""
    from vlm_jax.evaluate.common import BatchedEncoder  # noqa: PLC0415 - common imports the evaluators' registry

    encode_images = BatchedEncoder(model, "encode_image", batch_size)
    encode_texts = BatchedEncoder(model, "encode_text", batch_size)

    def captions(batch: Batch) -> np.ndarray:
        text_ids = np.asarray(batch["text_ids"])
        if text_ids.ndim != 3:
            raise ValueError(f"expected text_ids int32 [B, C, L], found shape {text_ids.shape}.")
        embeddings = encode_texts(text_ids.reshape(-1, text_ids.shape[-1]))
        return embeddings.reshape(*text_ids.shape[:2], -1)

    regions = None
    if hasattr(model, "encode_regions"):
        encode_regions = RegionEncoder(model, batch_size)
        regions = lambda batch: encode_regions(batch["image"])  # noqa: E731
    return View(images=lambda batch: encode_images(batch["image"]), captions=captions,
                prompts=lambda texts: encode_texts(tokenizer(list(texts))), regions=regions)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_regions(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    boxes, embeddings = nnx.merge(graphdef, state).encode_regions(pixels)
    # Zero padding rows must not produce NaNs on the way (they are dropped).
    return boxes.astype(jnp.float32), l2_normalize(embeddings.astype(jnp.float32), eps=1e-12)


class RegionEncoder:
    """`model.encode_regions` on images [N, H, W, 3] in fixed-size jitted batches (the last one padded
    with zeros and its padding dropped): (boxes float32 [N, Q, 4], unit float32 embeddings [N, Q, D])."""

    def __init__(self, model: nnx.Module, batch_size: int):
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if not len(images):
            raise ValueError("Nothing to encode: the input is empty.")
        boxes, embeddings = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            rows = len(chunk)
            if rows < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
            chunk_boxes, chunk_embeddings = _encode_regions(self.graphdef, self.state, jnp.asarray(chunk))
            boxes.append(np.asarray(chunk_boxes)[:rows])
            embeddings.append(np.asarray(chunk_embeddings)[:rows])
        return np.concatenate(boxes), np.concatenate(embeddings)


class StoredPrompts:
    """Prompt texts -> their stored embeddings float32 [N, D] (`vlm_jax.evaluate.stored`)."""

    def __init__(self, texts: Sequence[str], embeddings: np.ndarray):
        if len(texts) != len(embeddings):
            raise ValueError(f"{len(texts)} prompt texts but {len(embeddings)} stored prompt embeddings.")
        self.row = {text: row for row, text in enumerate(texts)}
        self.embeddings = embeddings

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = [text for text in texts if text not in self.row]
        if missing:
            raise ValueError(f"prompts {missing[:3]} have no stored embedding; delete the stored eval directory "
                             "to embed the current prompts.")
        return unit_rows(np.asarray(self.embeddings[[self.row[text] for text in texts]], np.float32))


def stored_view(prompts: Callable[[Sequence[str]], np.ndarray]) -> View:
    """Stored embeddings: "image_embedding" [B, D], "text_embedding" [B, C, D], prompts by text."""

    def captions(batch: Batch) -> np.ndarray:
        embeddings = np.asarray(batch["text_embedding"], np.float32)
        if embeddings.ndim != 3:
            raise ValueError(f"expected text_embedding float [B, C, D], found shape {embeddings.shape}.")
        return unit_rows(embeddings.reshape(-1, embeddings.shape[-1])).reshape(embeddings.shape)

    return View(images=lambda batch: unit_rows(np.asarray(batch["image_embedding"], np.float32)),
                captions=captions, prompts=prompts)
