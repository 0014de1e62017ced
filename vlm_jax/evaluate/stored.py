"""Evaluation sets stored as frozen-model embeddings: written once, then read as a view's source.

A frozen model computes the same embeddings of an eval set at every evaluation of every run; for
methods on a frozen CLIP (RECO, RAR) the sets are embedded once by the memory builder into
`<dir>/<eval name>` and every evaluation reads them (`vlm_jax.evaluate.views.stored_view`):
  - zero-shot: the images with their labels (a memory directory) and the class prompts
    (prompt_embeddings.npy float32 [P, D], prompts.json: the P texts in class order);
  - retrieval: (image, caption) pairs (a memory directory, one caption per image).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from vlm_jax.config_lib import ConfigError
from vlm_jax.data import datasets, pipeline
from vlm_jax.evaluate.views import StoredPrompts
from vlm_jax.evaluate.zero_shot import class_prompts
from vlm_jax.memory import build as memory_build
from vlm_jax.memory import store
from vlm_jax.memory.store import load_memory

PROMPT_EMBEDDINGS = "prompt_embeddings.npy"
PROMPT_TEXTS = "prompts.json"


def _build_config(spec, embed: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The memory-builder section that stores one eval set's embeddings."""
    build = memory_build.memory_config()
    data = spec.data.to_dict()
    if spec.type == "zero_shot":
        entry = datasets.get(spec.classes or data.get("dataset"))
        data.update(text_keys=(), label_key=data.get("label_key") or entry.label_key)
    elif spec.type == "retrieval":
        if data.get("texts_per_example") not in (None, 1):
            raise ConfigError(f"stored-embedding retrieval pairs each image with one caption, but texts_per_example="
                              f"{data['texts_per_example']}; evaluate on pixels instead.")
        data.update(texts_per_example=None)
    else:
        raise ConfigError(f"evaluator type {spec.type!r} has no stored-embedding form; evaluate on pixels.")
    for key, value in data.items():
        build.data[key] = tuple(value) if isinstance(value, list) else value
    build.data.shuffle = False
    build.update(shard_size=int(embed["shard_size"]), batch_size=int(embed["batch_size"]),
                 progress=bool(embed.get("progress", True)))
    return build


def store_eval_embeddings(spec, pretrained, directory: epath.PathLike, embed: Mapping[str, Any],
                          class_names, templates) -> None:
    """Stores one eval set's embeddings by `pretrained` (a `vlm_jax.weights.Pretrained`) in
    `directory` (resumable: finished shards and matching prompts are kept)."""
    from vlm_jax.evaluate.views import pixel_view  # noqa: PLC0415

    directory = epath.Path(directory)
    source = pipeline.Head(pipeline.make_source(spec.data), spec.max_examples) if spec.max_examples else None
    memory_build.build_memory(_build_config(spec, embed), pretrained.model, pretrained.preprocess,
                              pretrained.tokenizer, directory, source=source)
    if spec.type != "zero_shot":
        return
    texts = [text for prompts in class_prompts(class_names, templates) for text in prompts]
    texts_path, embeddings_path = directory / PROMPT_TEXTS, directory / PROMPT_EMBEDDINGS
    if texts_path.exists() and embeddings_path.exists() and json.loads(texts_path.read_text()) == texts:
        return
    view = pixel_view(pretrained.model, pretrained.tokenizer, int(embed["batch_size"]))
    # The texts mark the embeddings as whole and theirs: removed first, written last.
    if texts_path.exists():
        texts_path.unlink()
    store.save_array(str(embeddings_path), view.prompts(texts).astype(np.float32))
    store.write_atomic(str(texts_path), lambda file: json.dump(texts, file), binary=False)


def stored_batches(directory: epath.PathLike, spec) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    """Batches of a stored eval set: "image_embedding" [B, D] with "label" [B] (zero-shot) or
    "text_embedding" [B, 1, D] (retrieval); bad rows were skipped and counted when it was stored,
    and the first batch carries those counts as "bad_input" (a set stored without rows: a batch of
    the counts alone)."""
    memory = load_memory(str(directory))
    batch_size = int(spec.batch_size)
    bad_input = {kind: int(count) for kind, count in memory.completion.get("bad_input", {}).items()}

    def batches():
        if not memory.num_rows:
            yield {"bad_input": dict(bad_input)}
        for start in range(0, memory.num_rows, batch_size):
            stop = min(start + batch_size, memory.num_rows)
            batch = {"image_embedding": memory.read("image_embeddings", start, stop)}
            if start == 0:
                batch["bad_input"] = dict(bad_input)
            if spec.type == "zero_shot":
                batch["label"] = memory.read("labels", start, stop)
            else:
                batch["text_embedding"] = memory.read("text_embeddings", start, stop)[:, None, :]
            yield batch

    return batches


def stored_prompts(directory: epath.PathLike) -> StoredPrompts:
    directory = epath.Path(directory)
    if not (directory / PROMPT_TEXTS).exists():
        return StoredPrompts([], np.zeros((0, 0), np.float32))
    return StoredPrompts(json.loads((directory / PROMPT_TEXTS).read_text()), np.load(directory / PROMPT_EMBEDDINGS))
