"""Classification by description (Menon & Vondrick; GRAIN's zero-shot rule), optionally region-aware.

Per class c a list of descriptors (short visual phrases: "has a long neck", "is red"). Each
(template, descriptor) pair gives one text:

    template(c) without its trailing "."  +  ", which "  +  descriptor

where a descriptor starting with is/has/are/have/can/looks is used as written and any other gets
"has " in front ("a photo of a zorvid, which is red"; "a photo of a heron, which has a long neck").
Scores of an image x against the class's texts t (unit embeddings, cosine similarity):

    global(x, c) = mean over descriptors x templates of cos(x, t)        (the mean of similarities,
                                                                          not the similarity of the mean)
    region(x, c) = mean over region queries q of max over the class's texts of cos(region_q, t)
    score(x, c)  = (1 - region_weight) * global + region_weight * region

Without descriptors a class's texts are its filled templates alone (the same mean of similarities).
region_weight 0 scores the global embedding alone; region_weight > 0 needs a view with regions
(`View.regions`, a model with `encode_regions` such as GRAIN's). Metrics are `zero_shot`'s:
top1, top5, mean_per_class_recall and top1_<subset>; with region_weight > 0 also top1_global
(the same texts, global score alone).

Descriptor sources:
  - a JSON file {class name: [descriptors]} (`read_descriptors`), e.g. one written by
    `write_descriptors(class_names, mllm, path)`, which asks a text LM (an MLLM backend with image
    None, `vlm_jax.mllm.http`) per class and parses its list answer (`vlm_jax.mllm.answers`);
  - `shapes_world_descriptors(class_names)`: each Shapes World entity's ground-truth descriptors from
    its attributes ("is red", "is striped", "is shaped like a star").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from vlm_jax.evaluate.common import among_rows, iterate_batches, real_rows, register_evaluator, skip_metrics
from vlm_jax.evaluate.views import View
from vlm_jax.evaluate.zero_shot import Template, classification_metrics, closed_set, fill_template

# Descriptors starting with one of these words read as a clause after "which"; others get "has ".
VERBS = ("is", "has", "are", "have", "can", "looks")

DEFAULT_PROMPT = ("What are useful visual features for distinguishing a {} in a photo? Answer with a JSON list of "
                  "short phrases, each a visual feature, e.g. [\"has four legs\", \"is covered in brown fur\"].")
# Structured output where the backend can force it: an object holding the list (parse_list reads it).
DESCRIPTOR_SCHEMA = {"type": "object", "properties": {"descriptors": {"type": "array", "items": {"type": "string"}}},
                     "required": ["descriptors"]}

Descriptors = Mapping[str, Sequence[str]] | Sequence[Sequence[str]]

# Similarities held at once by the region score (B x Q x texts), in floats.
_REGION_CHUNK = 1 << 24


def descriptor_clause(descriptor: str) -> str:
    """The clause after "which": the descriptor as written when it starts with a verb of `VERBS`
    (any case), else "has " + descriptor."""
    descriptor = descriptor.strip()
    words = descriptor.split(maxsplit=1)
    if words and words[0].lower() in VERBS:
        return descriptor
    return f"has {descriptor}"


def description_text(template: Template, class_name: str, descriptor: str) -> str:
    """template(class_name) with its trailing "." dropped, + ", which " + the descriptor's clause."""
    prompt = fill_template(template, class_name).rstrip()
    if prompt.endswith("."):
        prompt = prompt[:-1].rstrip()
    return f"{prompt}, which {descriptor_clause(descriptor)}"


def descriptor_lists(class_names: Sequence[str], descriptors: Descriptors) -> list[list[str]]:
    """Per class (in `class_names` order) its non-empty list of descriptors.

    Args:
      class_names: C names.
      descriptors: a mapping class name -> descriptors (extra names are ignored), or C lists in
        class order.

    Raises:
      ValueError: a class is missing, has no descriptors, or a descriptor is not a non-empty string.
    """
    if isinstance(descriptors, Mapping):
        missing = [name for name in class_names if name not in descriptors]
        if missing:
            raise ValueError(f"No descriptors for classes {missing[:5]} ({len(missing)} of {len(class_names)} "
                             "missing); the descriptors must cover every class name.")
        lists = [descriptors[name] for name in class_names]
    else:
        if len(descriptors) != len(class_names):
            raise ValueError(f"Expected {len(class_names)} descriptor lists, one per class, found {len(descriptors)}.")
        lists = list(descriptors)
    out = []
    for name, items in zip(class_names, lists):
        if isinstance(items, str) or not all(isinstance(item, str) and item.strip() for item in items):
            raise ValueError(f"Descriptors of class {name!r} must be a list of non-empty strings, got {items!r}.")
        if not items:
            raise ValueError(f"Class {name!r} has no descriptors.")
        out.append([item.strip() for item in items])
    return out


def class_texts(class_names: Sequence[str], templates: Sequence[Template],
                descriptors: Descriptors | None) -> list[list[str]]:
    """Per class, its texts: for every descriptor, every template (`description_text`); with
    `descriptors` None, the filled templates alone (as written)."""
    if not len(templates):
        raise ValueError("No templates: classification by description needs at least one (e.g. '{}').")
    if descriptors is None:
        return [[fill_template(template, name) for template in templates] for name in class_names]
    return [[description_text(template, name, descriptor) for descriptor in items for template in templates]
            for name, items in zip(class_names, descriptor_lists(class_names, descriptors))]


def global_scores(images: np.ndarray, text_embeddings: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """float32 [B, C]: per class, the mean cosine similarity of each image to the class's texts.

    Args:
      images: unit float32 [B, D].
      text_embeddings: unit float32 [N, D], the texts of class 0, then class 1, ... (`counts` each).
      counts: C text counts (>= 1), summing to N.
    """
    counts = np.asarray(counts)
    class_of_text = np.repeat(np.arange(len(counts)), counts)
    # The mean of similarities is the similarity to the (unnormalized) mean embedding.
    means = np.zeros((len(counts), text_embeddings.shape[1]), np.float64)
    np.add.at(means, class_of_text, text_embeddings)
    means /= counts[:, None]
    return (np.asarray(images, np.float64) @ means.T).astype(np.float32)


def region_scores(regions: np.ndarray, text_embeddings: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """float32 [B, C]: per class, the mean over region queries of the max over the class's texts of
    the region embedding's cosine similarity.

    Args:
      regions: unit float32 [B, Q, D] region embeddings.
      text_embeddings: unit float32 [N, D] grouped by class as in `global_scores`.
      counts: C text counts (>= 1), summing to N.
    """
    regions = np.asarray(regions, np.float32)
    batch, queries, _ = regions.shape
    counts = np.asarray(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = np.zeros((batch, len(counts)), np.float32)
    # Whole classes per chunk, so a chunk's similarities stay within _REGION_CHUNK floats.
    per_chunk = max(1, _REGION_CHUNK // max(1, batch * queries))
    first = 0
    while first < len(counts):
        last = first + 1
        while last < len(counts) and starts[last + 1] - starts[first] <= per_chunk:
            last += 1
        similarities = regions @ text_embeddings[starts[first] : starts[last]].T     # [B, Q, n]
        maxima = np.maximum.reduceat(similarities, starts[first:last] - starts[first], axis=-1)
        out[:, first:last] = maxima.mean(axis=1)
        first = last
    return out


@register_evaluator("descriptions")
class DescriptionsEvaluator:
    """Classification by description over a labelled image set (see the module docstring).

    Args:
      data: callable returning a fresh iterable of batches with the view's image inputs and "label"
        int32 [B]; optionally "mask" bool [B] and "bad_input" (as `zero_shot`).
      class_names: C names, indexed by label.
      templates: prompt templates ("{}" or "{c}" = class name, or callables).
      descriptors: per class its descriptors (`descriptor_lists`); None: the templates alone.
      subsets: optional name -> class ids for per-subset top-1 (top1_<name>).
      region_weight: weight of the region score in [0, 1] (0: global only).
      prefix: prepended to every metric name.
    """

    def __init__(self, data: Callable[[], Iterable[dict[str, np.ndarray]]], class_names: Sequence[str],
                 templates: Sequence[Template], descriptors: Descriptors | None,
                 subsets: Mapping[str, Sequence[int]] | None = None, region_weight: float = 0.0, prefix: str = "",
                 among: Sequence[int] | None = None):
        if not 0.0 <= float(region_weight) <= 1.0:
            raise ValueError(f"region_weight must be in [0, 1], got {region_weight}.")
        self.data = data
        self.class_names = list(class_names)
        self.texts = class_texts(self.class_names, list(templates), descriptors)
        self.subsets, self.region_weight, self.prefix = subsets, float(region_weight), prefix
        self.among = None if among is None else np.asarray(sorted(int(c) for c in among), np.int64)

    def run(self, view: View) -> dict[str, float]:
        if self.region_weight > 0 and view.regions is None:
            raise ValueError(f"region_weight={self.region_weight} needs region embeddings, and this view has none "
                             "(its model has no encode_regions); use a region model's view or region_weight=0.")
        counts = [len(texts) for texts in self.texts]
        text_embeddings = np.asarray(view.prompts([text for texts in self.texts for text in texts]), np.float32)
        scores, global_only, labels, skipped = [], [], [], {}
        for batch in iterate_batches(self.data, skipped):
            batch_labels = np.asarray(batch["label"])
            batch, batch_labels, real = among_rows(batch, batch_labels, real_rows(batch, len(batch_labels)), self.among)
            if not len(batch_labels):
                continue
            batch_global = global_scores(view.images(batch), text_embeddings, counts)
            batch_scores = batch_global
            if self.region_weight > 0:
                _, regions = view.regions(batch)
                batch_regions = region_scores(regions, text_embeddings, counts)
                batch_scores = (1.0 - self.region_weight) * batch_global + self.region_weight * batch_regions
            scores.append(batch_scores[real])
            global_only.append(batch_global[real])
            labels.append(batch_labels[real])
        evaluated = sum(len(part) for part in labels)
        if not evaluated:
            raise ValueError(f"The descriptions data yielded no examples to score (skipped as bad input: {skipped}).")
        labels, scores, global_only = np.concatenate(labels), np.concatenate(scores), np.concatenate(global_only)
        subsets = self.subsets
        if self.among is not None:
            (scores, global_only), labels, subsets = closed_set((scores, global_only), labels, self.among, subsets)
            evaluated = len(labels)
        metrics = classification_metrics(scores, labels, subsets)
        if self.region_weight > 0:
            metrics["top1_global"] = classification_metrics(global_only, labels)["top1"]
        metrics.update(skip_metrics(skipped, evaluated))
        return {self.prefix + name: value for name, value in metrics.items()}


# -- descriptor sources -----------------------------------------------------------------------------

def read_descriptors(path: str | epath.PathLike, class_names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """A descriptor file {class name: [descriptors]}; with `class_names`, checked to cover them.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: the file is not a JSON object of lists of non-empty strings, or misses classes.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No descriptor file at {path}; write one with "
                                "descriptions.write_descriptors(class_names, mllm, path) or give a JSON "
                                "{class name: [descriptors]}.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Descriptor file {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"Descriptor file {path} must hold a JSON object {{class name: [descriptors]}}, "
                         f"found {type(content).__name__}.")
    names = list(content) if class_names is None else list(class_names)
    try:
        lists = descriptor_lists(names, content)
    except ValueError as error:
        raise ValueError(f"Descriptor file {path}: {error}") from None
    return dict(zip(names, lists))


def parse_descriptors(answer: str, max_descriptors: int = 0) -> list[str]:
    """The distinct non-empty items of an answer's list (`mllm.answers.parse_list`), in order; [] when
    the answer holds no list. `max_descriptors` > 0 keeps the first that many."""
    from vlm_jax.mllm.answers import parse_list  # noqa: PLC0415

    items = parse_list(answer or "") or []
    out: list[str] = []
    for item in items:
        item = " ".join(item.split())
        if item and item.lower() not in {seen.lower() for seen in out}:
            out.append(item)
    return out[:max_descriptors] if max_descriptors > 0 else out


def write_descriptors(class_names: Sequence[str], mllm: Any, path: str | epath.PathLike, prompt: str = DEFAULT_PROMPT,
                      *, max_tokens: int = 256, max_descriptors: int = 10,
                      batch_size: int = 64) -> dict[str, list[str]]:
    """Asks `mllm` (the MLLM protocol; text-only requests, image None) for each class's descriptors and
    writes the JSON file {class name: [descriptors]} that `read_descriptors` reads.

    Args:
      class_names: the classes, in the order the file lists them.
      mllm: a backend whose `generate(images, prompts, max_tokens, schema=...)` accepts None images
        (the OpenAI-compatible HTTP backend; its response cache makes a rerun cheap).
      path: the JSON file to write (its folder is created; written whole, then renamed into place).
      prompt: the question, "{}" or "{c}" standing for the class name.
      max_tokens: answer length per class.
      max_descriptors: keep at most this many per class (0: all).
      batch_size: prompts per `generate` call.

    Returns:
      {class name: [descriptors]} as written.

    Raises:
      ValueError: some answers held no list (the classes and answers are named; nothing is written).
    """
    names = list(dict.fromkeys(class_names))
    prompts = [fill_template(prompt, name) for name in names]
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        answers.extend(mllm.generate([None] * len(chunk), chunk, max_tokens=max_tokens, schema=DESCRIPTOR_SCHEMA))
    descriptors = {name: parse_descriptors(answer, max_descriptors) for name, answer in zip(names, answers)}
    failed = [(name, answer) for name, answer in zip(names, answers) if not descriptors[name]]
    if failed:
        shown = "; ".join(f"{name!r}: {answer[:80]!r}" for name, answer in failed[:3])
        raise ValueError(f"{len(failed)} of {len(names)} descriptor answers held no list ({shown}); "
                         "nothing was written. Check the prompt or the endpoint and run again.")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp"
    staging.write_text(json.dumps(descriptors, indent=1, ensure_ascii=False) + "\n")
    staging.rename(path)
    return descriptors


def shapes_world_descriptors(class_names: Sequence[str], kind: str = "description") -> dict[str, list[str]]:
    """Each Shapes World entity's ground-truth descriptors, keyed by its class name (label order).

    kind "description": the entity's description, ["is a striped red star"] ("a zorvid is a
    striped red star", the dataset's definition of the name); "attributes": one per attribute,
    ["is red", "is striped", "is shaped like a star"]. On the Shapes World CLIPs every model
    scores novel entities higher with the description (a one-attribute text matches every object
    of that colour or pattern alike).
    """
    from vlm_jax.data.shapes_world import world  # noqa: PLC0415

    if len(class_names) != world.NUM_ENTITIES:
        raise ValueError(f"Shapes World has {world.NUM_ENTITIES} entities, got {len(class_names)} class names.")
    if kind not in ("description", "attributes"):
        raise ValueError(f"Shapes World descriptors are 'description' or 'attributes', not {kind!r}.")
    out = {}
    for index, name in enumerate(class_names):
        shape, colour, pattern = world.entity_attributes(index)
        out[name] = ([f"is a {pattern} {colour} {shape}"] if kind == "description"
                     else [f"is {colour}", f"is {pattern}", f"is shaped like a {shape}"])
    return out
