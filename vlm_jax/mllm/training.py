"""Training the embedded MLLM: (image, prompt, answer) examples, teacher forcing, a captioning eval.

`CaptionerMethod` is the trainer's method "captioner" (experiments/captioner.py). Its data is
`config.captions`, named sources mixed by weight, each either
  - a TFDS split: `prompt` with the answer read from a text field (`answer`, e.g.
    "dense_caption"), or "entity_name": the label's class name (Shapes World; entities that the
    split never names, its novel ones, are left out), or
  - "conversations": a JSONL file of chat conversations in the LLaVA format
    ({"image": path relative to the file, "conversations": [{"from": "human", "value":
    "<image>\\nprompt"}, {"from": "gpt", "value": answer}]}), e.g. RAR's ranking data.
Every source is read once into host arrays (distinct images uint8 [M, S, S, 3], sequences
[N, L] pointing at them) and served by the shared grain mixture; batches carry "image" float32
(normalized), "ids" int32 [B, L] and "mask" float32 [B, L] (`captioner.sequence_ids`).

The image tower starts from `clip_dir`'s (a Hugging Face CLIP directory: its vision config,
tokenizer and preprocessing are the captioner's); `init_vision=False` starts it from scratch.
Evaluator "captions" (`CaptionEvaluator`): greedy captions of held-out Shapes World images
against their dense captions: exact match and per-attribute accuracy over the objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from vlm_jax.config_lib import ConfigError, MapOf, check_fields, require_path
from vlm_jax.models import captioner as captioner_lib

ANSWER_ENTITY_NAME = "entity_name"
ATTRIBUTES = ("size", "pattern", "colour", "shape")


def caption_source_config() -> ml_collections.ConfigDict:
    """One `config.captions.<name>` source with every field."""
    return ml_collections.ConfigDict({
        "source": "tfds",  # "tfds" | "conversations"
        "tfds_name": "", "split": "", "data_dir": "",
        "prompt": "Describe the image.", "answer": "dense_caption",  # tfds: the prompt and the answer's field
        "path": "",  # conversations: a JSONL file (LLaVA format)
        "weight": 1.0, "limit": 0,  # mixture weight; most examples read (0: all)
    })


def captioner_model_config() -> ml_collections.ConfigDict:
    """`config.model`: the decoder (the image tower is clip_dir's)."""
    defaults = captioner_lib.CaptionerConfig()
    return ml_collections.ConfigDict({name: getattr(defaults, name) for name in (
        "context_length", "width", "depth", "heads", "mlp_dim", "act", "dropout", "dtype", "param_dtype")})


def caption_eval_config() -> ml_collections.ConfigDict:
    """`config.caption_eval`: the captioning evaluator ("" split: none)."""
    return ml_collections.ConfigDict({"tfds_name": "", "split": "", "data_dir": "", "limit": 256,
                                      "prompt": "Describe the image.", "max_tokens": 64})


def read_tfds_examples(section, limit: int = 0) -> list[dict[str, Any]]:
    """The examples of a TFDS split (an embedded Shapes World build is made on first use)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    from vlm_jax.data.pipeline import prepare_embedded  # noqa: PLC0415

    prepare_embedded({"source": "tfds", "tfds_name": section.tfds_name, "data_dir": section.data_dir or None})
    source = tfds.data_source(section.tfds_name, split=section.split, data_dir=section.data_dir or None)
    count = len(source) if not limit else min(int(limit), len(source))
    return [source[index] for index in range(count)]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_pairs(section) -> tuple[list[np.ndarray], list[tuple[int, str, str]]]:
    from vlm_jax.data.decoding import decode_image  # noqa: PLC0415

    examples = read_tfds_examples(section, section.limit)
    images, pairs = [], []
    named = None
    if section.answer == ANSWER_ENTITY_NAME:
        from vlm_jax.data import shapes_world  # noqa: PLC0415

        names = shapes_world.class_names()
        named = {entity.id for entity in shapes_world.entities() if entity.frequency != "novel"}
    for example in examples:
        if named is not None:
            if int(example["label"]) not in named:
                continue
            answer = names[int(example["label"])]
        else:
            if section.answer not in example:
                raise ConfigError(f"captions source {section.tfds_name}/{section.split} has no field "
                                  f"{section.answer!r}; answer must be a text field or {ANSWER_ENTITY_NAME!r}.")
            answer = _text(example[section.answer])
        pairs.append((len(images), section.prompt, answer))
        images.append(decode_image(example["image"]))
    return images, pairs


def read_conversations(path: str, limit: int = 0) -> tuple[list[np.ndarray], list[tuple[int, str, str]]]:
    """A LLaVA-format JSONL file -> (distinct images, (image row, prompt, answer) per example)."""
    from vlm_jax.data.decoding import decode_image  # noqa: PLC0415

    path = epath.Path(path)
    images, rows, pairs = [], {}, []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                human, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
                image_path = path.parent / record["image"]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                raise ConfigError(f"{path}:{number} is not a LLaVA-format conversation ({error!r}).") from None
            if str(image_path) not in rows:
                rows[str(image_path)] = len(images)
                images.append(decode_image(image_path.read_bytes()))
            pairs.append((rows[str(image_path)], human.replace("<image>", "").strip(), answer))
            if limit and len(pairs) >= limit:
                break
    return images, pairs


class CaptionData:
    """Every source's examples as host arrays: images uint8 [M, S, S, 3] (resized and cropped by the
    preprocessing spec, normalized per batch by `GatherImages`); per source "image_row"
    int32 [N], "ids" int32 [N, L], "mask" float32 [N, L]."""

    def __init__(self, sources: Mapping[str, Any], coder, preprocess):
        from vlm_jax.data.preprocess import resize_and_crop  # noqa: PLC0415

        images, self.parts, self.weights = [], {}, {}
        for name, section in sources.items():
            if section.source == "conversations":
                part_images, pairs = read_conversations(section.path, section.limit)
            elif section.source == "tfds":
                part_images, pairs = _tfds_pairs(section)
            else:
                raise ConfigError(f"captions.{name}.source={section.source!r} is not 'tfds' or 'conversations'.")
            if not pairs:
                raise ConfigError(f"captions.{name} has no examples.")
            offset = len(images)
            images.extend(resize_and_crop(image, preprocess) for image in part_images)  # as inference sees them
            try:
                rows = [coder.sequence(prompt, answer) for _, prompt, answer in pairs]
            except ValueError as error:
                raise ConfigError(f"captions.{name}: {error}") from None
            self.parts[name] = {"image_row": np.asarray([offset + row for row, _, _ in pairs], np.int32),
                                "ids": np.stack([r[0] for r in rows]), "mask": np.stack([r[1] for r in rows])}
            self.weights[name] = float(section.weight)
        self.images = np.stack(images)
        # Sequences are as long as the longest example needs (a multiple of 16), not context_length.
        used = max(int(np.max(np.nonzero(part["ids"] != coder.ids["pad_id"])[1], initial=0)) + 1
                   for part in self.parts.values())
        length = min(coder.context_length, -(-used // 16) * 16)
        for part in self.parts.values():
            part["ids"], part["mask"] = part["ids"][:, :length], part["mask"][:, :length]


class GatherImages:
    """Batch map: "image_row" -> "image" float32 [B, S, S, 3], normalized by `preprocess`."""

    def __init__(self, images: np.ndarray, preprocess):
        self.images = images
        self.mean = np.asarray(preprocess.mean, np.float32)
        self.std = np.asarray(preprocess.std, np.float32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = self.images[np.asarray(batch["image_row"])].astype(np.float32) / 255.0
        return {**batch, "image": (pixels - self.mean) / self.std}


class CaptionEvaluator:
    """Greedy captions of held-out Shapes World images vs their dense captions: "captions/" +
    `caption_metrics`'s names."""

    def __init__(self, spec, examples: list[dict[str, Any]], coder, preprocess, batch_size: int = 64):
        from vlm_jax.data.decoding import decode_image  # noqa: PLC0415

        self.spec, self.coder, self.preprocess, self.batch_size = spec, coder, preprocess, batch_size
        self.images = [decode_image(example["image"]) for example in examples]
        self.truth = [_text(example["dense_caption"]) for example in examples]

    def run(self, model) -> dict[str, float]:
        from vlm_jax.data.shapes_world import parse_dense_caption  # noqa: PLC0415
        from vlm_jax.mllm.embedded import EmbeddedMLLM  # noqa: PLC0415

        mllm = EmbeddedMLLM(model, self.coder.tokenizer, self.preprocess, batch_size=self.batch_size)
        texts = mllm.generate(self.images, [self.spec.prompt] * len(self.images), max_tokens=self.spec.max_tokens)
        return {f"captions/{name}": value for name, value in
                caption_metrics(texts, self.truth, parse_dense_caption).items()}


def caption_metrics(texts, truths, parse) -> dict[str, float]:
    """Generated vs true dense captions: "exact_match", "objects" (right object count),
    "<attribute>_accuracy" over the true objects in caption order (a missing object counts wrong),
    "unparsed" (the share of generated captions that do not parse)."""
    exact = [text == truth for text, truth in zip(texts, truths)]
    counts = {name: [0, 0] for name in ATTRIBUTES}
    objects, unparsed = [], 0
    for text, truth in zip(texts, truths):
        true_objects = parse(truth)[0]
        try:
            found = parse(text)[0]
        except ValueError:
            unparsed += 1
            found = []
        objects.append(len(found) == len(true_objects))
        for index, true_object in enumerate(true_objects):
            for position, name in enumerate(ATTRIBUTES):
                counts[name][1] += 1
                counts[name][0] += int(index < len(found) and found[index][position] == true_object[position])
    metrics = {"exact_match": float(np.mean(exact)), "objects": float(np.mean(objects)),
               "unparsed": unparsed / max(len(texts), 1)}
    metrics.update({f"{name}_accuracy": right / max(total, 1) for name, (right, total) in counts.items()})
    return metrics


class CaptionerMethod:
    """The embedded MLLM for the trainer (`vlm_jax.train.trainer.Method`).

    Config: clip_dir, init_vision, init_from (a captioner export to fine-tune, "" none), model
    (`captioner_model_config`), captions (sources), caption_eval, global_batch_size, seed.
    """

    def __init__(self):
        self._pretrained = None
        self._data = None

    def check_config(self, config) -> None:
        check_fields(config.captions, MapOf(caption_source_config()), "captions")
        check_fields(config.model, captioner_model_config(), "model")
        check_fields(config.caption_eval, caption_eval_config(), "caption_eval")
        require_path(config.clip_dir, "clip_dir", field="clip_dir", containing=("config.json", "tokenizer.json"))
        if config.init_from:
            require_path(config.init_from, "init_from", field="init_from", containing=("captioner.json",))
        if not config.captions:
            raise ConfigError("config.captions names no source; add one, e.g. captions.seed = {...}.")
        for name, section in config.captions.items():
            if section.source == "conversations":
                require_path(section.path, f"captions.{name}.path", field=f"captions.{name}.path")

    def pretrained(self, config):
        if self._pretrained is None:
            from vlm_jax.weights import load_pretrained  # noqa: PLC0415

            self._pretrained = load_pretrained(config.clip_dir)
        return self._pretrained

    def coder(self, config):
        from vlm_jax.mllm.embedded import PromptCoder  # noqa: PLC0415

        return PromptCoder(self.pretrained(config).tokenizer, int(config.model.context_length))

    def model_config(self, config) -> captioner_lib.CaptionerConfig:
        pretrained = self.pretrained(config)
        tokenizer = pretrained.tokenizer
        return captioner_lib.CaptionerConfig(
            vision=pretrained.config.vision, vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id, eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id, **config.model.to_dict())

    def reads_weights(self, config) -> bool:
        return bool(config.init_vision or config.init_from)

    def create_model(self, config, rngs):
        if config.init_from:
            from vlm_jax.mllm.embedded import load_captioner  # noqa: PLC0415

            model = load_captioner(config.init_from)[0]
            if model.config != self.model_config(config):
                raise ConfigError(f"init_from {config.init_from!r} holds a captioner of another config than "
                                  "config.model and clip_dir give; make them match.")
            return model
        model = captioner_lib.Captioner(self.model_config(config), rngs=rngs)
        if config.init_vision:
            captioner_lib.init_vision_from(model, self.pretrained(config).model.vision_model)
        return model

    def constants(self, config, mesh):
        return None

    @staticmethod
    def loss_fn(model, batch, constants, rng):
        del constants
        return captioner_lib.caption_loss(model, batch["image"], batch["ids"], batch["mask"], rng)

    def train_iterator(self, config, process_index, process_count):
        from vlm_jax.data import pipeline  # noqa: PLC0415
        from vlm_jax.data.arrays import ArrayDecoder, ArraySource  # noqa: PLC0415

        if self._data is None:
            self._data = CaptionData(config.captions, self.coder(config), self.pretrained(config).preprocess)
        sources = [pipeline.WeightedSource(ArraySource(part), ArrayDecoder(), self._data.weights[name])
                   for name, part in self._data.parts.items()]
        return iter(pipeline.train_mixture(
            sources, global_batch_size=int(config.global_batch_size), seed=int(config.seed),
            process_index=process_index, process_count=process_count,
            batch_maps=(GatherImages(self._data.images, self.pretrained(config).preprocess),)))

    def evaluators(self, config):
        spec = config.caption_eval
        if not spec.split:
            return {}
        coder = self.coder(config)
        examples = read_tfds_examples(spec, spec.limit)
        return {"captions": CaptionEvaluator(spec, examples, coder, self.pretrained(config).preprocess)}

    def export(self, model, workdir) -> None:
        from vlm_jax.mllm.embedded import save_captioner  # noqa: PLC0415

        pretrained = self._pretrained  # loaded by create_model or train_iterator before any export
        save_captioner(model, epath.Path(workdir) / "export", pretrained.tokenizer, pretrained.preprocess)


def write_conversations(path: epath.PathLike, examples) -> int:
    """Writes (image key, uint8 image [H, W, 3], prompt, answer) examples as a LLaVA-format JSONL file
    at `path` (what `read_conversations` and LLaVA / Qwen-VL fine-tuning scripts read), each image
    once as images/<key>.png beside it; the file appears whole or not at all. Returns the count."""
    from PIL import Image  # noqa: PLC0415

    from vlm_jax.files import write_atomic  # noqa: PLC0415

    path = epath.Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for key, image, prompt, answer in examples:
        image_path = path.parent / "images" / f"{key}.png"
        if not image_path.exists():
            Image.fromarray(np.asarray(image, np.uint8)).save(image_path)
        lines.append(json.dumps({"id": f"{key}-{len(lines)}", "image": f"images/{key}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]}))
    text = "".join(line + "\n" for line in lines)
    write_atomic(str(path), lambda file: file.write(text), binary=False)
    return len(lines)
