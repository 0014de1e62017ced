"""Zero-shot classification: class names x prompt templates -> a text classifier; top-1/top-5 accuracy
and mean per-class recall, as clip_benchmark reports them.

The classifier follows open_clip: each prompt embedding is L2-normalized, the prompts of a class are
averaged, and the mean is normalized again. Instead of templates, a class may bring its own list of texts
(descriptions, as in classification by description or CuPL prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from vlm_jax.evaluate.common import among_rows, iterate_batches, real_rows, register_evaluator, skip_metrics
from vlm_jax.evaluate.views import View
from vlm_jax.memory.store import unit_rows

Template = str | Callable[[str], str]
Prompts = Sequence[Template] | Mapping[str, Sequence[str]] | Sequence[Sequence[str]]


def fill_template(template: Template, class_name: str) -> str:
    """Writes a class name into a template: a string with "{c}" or "{}", or a callable."""
    if callable(template):
        return template(class_name)
    if "{c}" in template:
        return template.replace("{c}", class_name)
    if "{}" in template:
        return template.replace("{}", class_name)
    raise ValueError(f"Template {template!r} has no '{{}}' or '{{c}}' for the class name.")


def class_prompts(class_names: Sequence[str], templates: Prompts) -> list[list[str]]:
    """Expands templates into per-class prompt lists.

    Args:
      class_names: C names.
      templates: templates applied to every class; or a mapping class name -> its own texts; or a list
        of C lists of texts, one per class.
    Returns:
      C lists of texts.
    """
    if isinstance(templates, Mapping):
        missing = [name for name in class_names if name not in templates]
        if missing:
            raise ValueError(f"No texts for classes {missing[:5]}; the mapping must cover every class name.")
        prompts = [list(templates[name]) for name in class_names]
    elif len(templates) and not isinstance(templates[0], str) and not callable(templates[0]):
        if len(templates) != len(class_names):
            raise ValueError(
                f"Expected {len(class_names)} per-class text lists, one per class, found {len(templates)}."
            )
        prompts = [list(texts) for texts in templates]
    else:
        prompts = [[fill_template(template, name) for template in templates] for name in class_names]
    empty = [name for name, texts in zip(class_names, prompts) if not texts]
    if empty:
        raise ValueError(f"Classes {empty[:5]} have no prompt texts.")
    return prompts


def zero_shot_classifier(
    prompt_embeddings: Callable[[Sequence[str]], np.ndarray], class_names: Sequence[str], templates: Prompts
) -> np.ndarray:
    """Builds the zero-shot text classifier.

    Args:
      prompt_embeddings: texts -> unit float32 [N, D] (a view's `prompts`).
      class_names: C names.
      templates: see `class_prompts`.
    Returns:
      float32 [C, D]: per class, the normalized mean of normalized prompt embeddings.
    """
    prompts = class_prompts(class_names, templates)
    flat_texts = [text for texts in prompts for text in texts]
    text_embeddings = prompt_embeddings(flat_texts)
    class_of_text = np.repeat(np.arange(len(prompts)), [len(texts) for texts in prompts])
    sums = np.zeros((len(prompts), text_embeddings.shape[1]), np.float64)
    np.add.at(sums, class_of_text, text_embeddings)
    means = sums / np.bincount(class_of_text, minlength=len(prompts))[:, None]
    return unit_rows(means.astype(np.float32))


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, subsets: Mapping[str, Sequence[int]] | None = None
) -> dict[str, float]:
    """Top-1, top-k (k = min(5, C)) accuracy and mean per-class recall.

    Args:
      logits: float [N, C] scores.
      labels: int [N] true classes.
      subsets: optional name -> class ids; adds `top1_<name>`, top-1 accuracy over the samples whose
        label is in the subset (still predicting among all C classes).
    Returns:
      {"top1", "top5", "mean_per_class_recall", "top1_<subset>"...} as floats in [0, 1].
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    num_classes = logits.shape[1]
    k = min(5, num_classes)
    # Stable sort: among equal scores the lower class id ranks first, so results are reproducible.
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    correct_top1 = top_k[:, 0] == labels
    metrics = {
        "top1": float(correct_top1.mean()),
        "top5": float((top_k == labels[:, None]).any(axis=1).mean()),
    }
    # Balanced accuracy (sklearn's balanced_accuracy_score, as clip_benchmark uses): recall averaged over
    # the classes present in the labels.
    present = np.unique(labels)
    metrics["mean_per_class_recall"] = float(np.mean([correct_top1[labels == c].mean() for c in present]))
    for name, class_ids in (subsets or {}).items():
        in_subset = np.isin(labels, np.asarray(list(class_ids)))
        metrics[f"top1_{name}"] = float(correct_top1[in_subset].mean()) if in_subset.any() else float("nan")
    return metrics


def closed_set(scores: Sequence[np.ndarray], labels: np.ndarray, among: Sequence[int],
               subsets: Mapping[str, Sequence[int]] | None = None):
    """Scores restricted to a closed set of classes: the rows whose label is in `among`, the columns of
    `among`, labels and subsets renumbered to positions in it. -> (scores, labels, subsets)."""
    among = np.asarray(sorted(int(c) for c in among), np.int64)
    if not len(among):
        raise ValueError("among names no classes.")
    keep = np.isin(labels, among)
    if not keep.any():
        raise ValueError("No evaluated image belongs to the classes of `among`.")
    position = {int(c): i for i, c in enumerate(among)}
    renumbered = np.asarray([position[int(label)] for label in labels[keep]])
    kept = tuple(np.asarray(part)[keep][:, among] for part in scores)
    subsets = {key: [position[int(c)] for c in ids if int(c) in position] for key, ids in (subsets or {}).items()}
    return kept, renumbered, {key: ids for key, ids in subsets.items() if ids}  # subsets outside it are left out


@register_evaluator("zero_shot")
class ZeroShotEvaluator:
    """Zero-shot classification over a labelled image set.

    Args:
      data: callable returning a fresh iterable of batches with the view's image inputs ("image"
        float32 [B, H, W, 3] preprocessed, or "image_embedding" [B, D]) and "label" int32 [B];
        optionally "mask" bool [B] (False rows are not scored) and "bad_input" {kind: count} (the
        inputs skipped, reported as "skipped" and "skipped/<kind>" beside "evaluated").
      class_names: C names, indexed by label.
      templates: see `class_prompts`.
      subsets: optional name -> class ids for per-subset top-1 (e.g. {"common": [...], "rare": [...]}).
      prefix: prepended to every metric name.
      among: optional class ids: score only their images, predicting among them alone (a closed set).
    """

    def __init__(
        self,
        data: Callable[[], Iterable[dict[str, np.ndarray]]],
        class_names: Sequence[str],
        templates: Prompts,
        subsets: Mapping[str, Sequence[int]] | None = None,
        prefix: str = "",
        among: Sequence[int] | None = None,
    ):
        self.data = data
        self.class_names, self.templates = list(class_names), templates
        self.subsets, self.prefix, self.among = subsets, prefix, among

    def run(self, view: View) -> dict[str, float]:
        classifier = zero_shot_classifier(view.prompts, self.class_names, self.templates)
        logits, labels, skipped = [], [], {}
        for batch in iterate_batches(self.data, skipped):
            batch_labels = np.asarray(batch["label"])
            batch, batch_labels, real = among_rows(batch, batch_labels, real_rows(batch, len(batch_labels)), self.among)
            if not len(batch_labels):
                continue
            logits.append((view.images(batch) @ classifier.T)[real])
            labels.append(batch_labels[real])
        evaluated = sum(len(part) for part in labels)
        if not evaluated:
            raise ValueError(f"The zero-shot data yielded no examples to score (skipped as bad input: {skipped}).")
        logits, labels, subsets = np.concatenate(logits), np.concatenate(labels), self.subsets
        if self.among is not None:
            (logits,), labels, subsets = closed_set((logits,), labels, self.among, subsets)
            evaluated = len(labels)
        metrics = classification_metrics(logits, labels, subsets)
        metrics.update(skip_metrics(skipped, evaluated))
        return {self.prefix + name: value for name, value in metrics.items()}
