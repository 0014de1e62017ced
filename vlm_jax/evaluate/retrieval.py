"""Image <-> text retrieval recall@K with several captions per image, as clip_benchmark defines it.

Text -> image ("image_retrieval"): a caption hits at K if its own image is among the K images scored
highest for it. Image -> text ("text_retrieval"): an image hits at K if any of its captions is among the
K captions scored highest for it. Scores are cosine similarities of normalized embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from vlm_jax.evaluate.common import iterate_batches, real_rows, register_evaluator, skip_metrics
from vlm_jax.evaluate.views import View

# Queries scored per block, bounding the host memory of the score matrix.
_QUERY_BLOCK = 1024


def _ranks_of_best_positive(
    queries: np.ndarray, keys: np.ndarray, positive: Callable[[slice], np.ndarray]
) -> np.ndarray:
    """For each query, how many keys score strictly higher than its best-scoring positive key.

    A query hits at K exactly when this rank is below K (ties between a positive and a negative are
    resolved in the positive's favour; top-k ties are arbitrary in the reference too).
    """
    ranks = []
    for start in range(0, len(queries), _QUERY_BLOCK):
        block = slice(start, min(start + _QUERY_BLOCK, len(queries)))
        scores = queries[block] @ keys.T
        is_positive = positive(block)
        best_positive = np.where(is_positive, scores, -np.inf).max(axis=1, keepdims=True)
        ranks.append((scores > best_positive).sum(axis=1))
    return np.concatenate(ranks)


def retrieval_metrics(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways.

    Args:
      image_embeddings: float [N, D], L2-normalized.
      text_embeddings: float [T, D], L2-normalized.
      text_to_image: int [T], the image index of each caption.
      ks: the K values.
    Returns:
      {"image_retrieval_recall@K" (text -> image), "text_retrieval_recall@K" (image -> text)} in [0, 1].
    """
    text_to_image = np.asarray(text_to_image)
    num_images = len(image_embeddings)
    captionless = np.setdiff1d(np.arange(num_images), text_to_image)
    if captionless.size:
        raise ValueError(f"Images {captionless[:5].tolist()} have no caption; every image needs at least one.")
    text_ranks = _ranks_of_best_positive(
        text_embeddings, image_embeddings, lambda block: text_to_image[block, None] == np.arange(num_images)[None]
    )
    image_ranks = _ranks_of_best_positive(
        image_embeddings, text_embeddings, lambda block: np.arange(num_images)[block, None] == text_to_image[None]
    )
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((text_ranks < k).mean())
        metrics[f"text_retrieval_recall@{k}"] = float((image_ranks < k).mean())
    return metrics


@register_evaluator("retrieval")
class RetrievalEvaluator:
    """Image <-> text retrieval over a captioned image set.

    Args:
      data: callable returning a fresh iterable of batches with the view's inputs ("image" and
        "text_ids" int32 [B, C, L], or "image_embedding" [B, D] and "text_embedding" [B, C, D]) for
        C captions per image, optionally "text_mask": bool [B, C] marking real captions (padded ones
        are left out), "mask" bool [B] (False rows are not scored) and "bad_input" {kind: count}
        (the inputs skipped, reported as "skipped" and "skipped/<kind>" beside "evaluated" images).
      ks: the K values of recall@K.
      prefix: prepended to every metric name.
    """

    def __init__(self, data: Callable[[], Iterable[dict[str, np.ndarray]]], ks: Sequence[int] = (1, 5, 10),
                 prefix: str = ""):
        self.data, self.ks, self.prefix = data, tuple(ks), prefix

    def run(self, view: View) -> dict[str, float]:
        image_embeddings, text_embeddings, text_to_image, skipped = [], [], [], {}
        num_images = 0
        for batch in iterate_batches(self.data, skipped):
            captions = view.captions(batch)
            real = real_rows(batch, captions.shape[0])
            mask = np.asarray(batch.get("text_mask", np.ones(captions.shape[:2], bool)), bool)[real]
            captions = captions[real]
            batch_images = len(captions)
            image_embeddings.append(view.images(batch)[real])
            text_embeddings.append(captions[mask])
            owner = np.broadcast_to(np.arange(batch_images)[:, None], mask.shape)[mask]
            text_to_image.append(num_images + owner)
            num_images += batch_images
        if not num_images:
            raise ValueError(f"The retrieval data yielded no examples to score (skipped as bad input: {skipped}).")
        metrics = retrieval_metrics(
            np.concatenate(image_embeddings), np.concatenate(text_embeddings), np.concatenate(text_to_image), self.ks
        )
        metrics.update(skip_metrics(skipped, num_images))
        return {self.prefix + name: value for name, value in metrics.items()}
