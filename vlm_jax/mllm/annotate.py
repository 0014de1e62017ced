"""GRAIN's region annotations: an MLLM names what an image shows, a detector boxes those descriptions.

    config.annotate = annotate_config()      # the corpus (`data`), the mode, prompts, the detector section
    summary = annotate(config.annotate, make_backend(config.mllm), make_detector(config.annotate.detector), out)
    annotations = read_annotations(out)      # vlm_jax.data.annotations: id -> Annotation

Per image (`annotate.mode`):
  image  the MLLM answers `prompts.describe` about the whole image; the answer is split into at most
         `max_descriptions` short descriptions (`parse_descriptions`); the detector is prompted with them, so each
         box carries the description that fired it; boxes scoring above `detector.score_threshold` are kept, the
         `detector.max_boxes` best.
  crops  (Shapes World) the ground-truth boxes of the record (`regions`) are cropped, the MLLM describes each
         crop (`prompts.crop`; the embedded Shapes World captioner is trained on "Describe the image.") and the
         crop's box is kept with that description and score 1.0; no detector runs. These pipeline-made regions
         are compared with the ground truth (`compare_with_ground_truth`, in summary.json).
An image with no box kept is rejected "no_boxes" ("no_descriptions": the answer held none); corrupt images and
unreadable records are rejected too (`REASONS`). An empty answer from a backend whose request failed in that
call is not a rejection: the image is left out (counted as failed) and retried by the next run.

Captions: each kept image's caption is its original (`caption_key`) or, with probability `rewrite_p`, an MLLM
rewrite; the choice is a hash of (seed, id), so it is the same in every run. `rewrite_input`: "text" sends
`prompts.rewrite_text` with the caption and no image (a text LM endpoint; how the HTTP backend rewrites);
"image" asks `prompts.rewrite_image` about the image (the embedded captioner, which cannot read text: its
ungrounded caption of the whole image); "auto": "image" for the embedded backend, else "text". A rewrite the
quality filters of `vlm_jax.mllm.recaption` reject, or lost to a failed request, leaves the original (counted
in `rewrite_fallback`).

Output (`output_dir`): annotations-00000.jsonl, ... in the format of `vlm_jax.data.annotations` (one line per
image, also rejected ones, which carry "rejected": reason and no boxes; every line has "index", the source
position); annotate.json pins the settings that decide the content (a resumed run with others is a UserError);
summary.json: written, kept, rejected {reason: count}, failed, remaining, total, boxes_per_image {n: images},
rewritten, rewrite_fallback {reason: count}, items_per_s, seconds, mode, backend, detector, shards, and in crops
mode ground_truth (`compare_with_ground_truth`'s fields). Shards are written whole and renamed into place
(`vlm_jax.mllm.records`): killed at any moment and rerun, every id ends up in exactly one line.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vlm_jax.config_lib import ConfigError, check_fields, require_data_files
from vlm_jax.data import pipeline
from vlm_jax.data.annotations import Annotation, annotation_record
from vlm_jax.mllm import records
from vlm_jax.mllm.answers import normalize_text, parse_descriptions, trim_description  # noqa: F401 - re-exported
from vlm_jax.mllm.detector import (Detections, check_detector_section, detector_config, ground_truth_regions,
                                   make_detector)

MODES = ("image", "crops")
REWRITE_INPUTS = ("auto", "text", "image")
REASONS = ("no_boxes", "no_descriptions", "corrupt_image", "corrupt_record")
SHARD_PREFIX = "annotations-"
MANIFEST_FILE = "annotate.json"
SUMMARY_FILE = "summary.json"
SHAPES_WORLD_PROMPT = "Describe the image."  # the prompt the embedded Shapes World captioner is trained on
PLACEHOLDERS = {"describe": ("max_descriptions",), "crop": (), "rewrite_text": ("caption",), "rewrite_image": ()}

DEFAULT_PROMPTS = {
    "describe": "List up to {max_descriptions} short visual descriptions of the distinct objects and parts in this "
                "image, one per line, each a few words naming one thing with its colour, pattern, shape or "
                "material (for example: a striped red star). Answer with the list only.",
    "crop": "Describe the main object in this image in a few words.",
    "rewrite_text": "Rewrite the following image caption in other words, keeping its meaning and every detail it "
                    "states and adding none. Answer with the new caption only. Caption: {caption}",
    "rewrite_image": "Describe this image in one sentence.",
}


def annotate_config() -> ml_collections.ConfigDict:
    """The `config.annotate` section with every field and its default."""
    data = pipeline.default_config()
    data.shuffle = False  # read in order (only the source fields matter here)
    return ml_collections.ConfigDict({
        "mode": "image",  # "image" (the MLLM describes the image, the detector boxes) | "crops" (ground-truth crops)
        "data": data,  # the corpus: a `vlm_jax.data.pipeline.default_config()` section
        "id_key": "id",  # the record field naming it (Shapes World: "index"); stored as str
        "caption_key": "caption",  # the record's original caption (Shapes World: "weak_caption"; "" none)
        "prompts": dict(DEFAULT_PROMPTS),  # describe takes {max_descriptions}, rewrite_text {caption}
        "max_descriptions": 10,  # descriptions kept per answer
        "max_description_words": 12,  # longer ones are dropped
        "description_cut": (),  # a description ends before the first of these phrases (`trim_description`)
        "description_drop": (),  # words removed from every description
        "max_tokens": 128,  # the longest answer (descriptions, crop descriptions)
        "rewrite_p": 0.5,  # probability that an image's caption is an MLLM rewrite
        "rewrite_input": "auto",  # "auto" | "text" | "image" (module docstring)
        "rewrite_max_tokens": 96,
        "seed": 0,  # of the per-id rewrite choice
        "detector": detector_config(),  # the backend (image mode), score_threshold and max_boxes (both modes)
        "crop": {"size": 64, "min_scale": 1.0, "max_scale": 1.0, "blur_sigma": 0.0},  # crops mode (`crop_region`)
        "batch_size": 32,  # images per MLLM call (HTTP backends: keep >= mllm.concurrency)
        "shard_size": 1024,  # images per output shard (the unit of resumption)
        "limit": 0,  # 0: the whole corpus; else its first `limit` records
        "progress": True,  # a tqdm bar (items/s and ETA)
    })


def shapes_world_annotate_config(tfds_name: str = "shapes_world/default", split: str = "pretrain",
                                 data_dir: str | None = None) -> ml_collections.ConfigDict:
    """`annotate_config()` for a Shapes World split and the embedded captioner: mode crops (ground-truth boxes,
    each crop described with the captioner's training prompt), ids from "index", captions from "weak_caption"."""
    config = annotate_config()
    config.data.update(source="tfds", tfds_name=tfds_name, split=split, data_dir=data_dir)
    config.update(mode="crops", id_key="index", caption_key="weak_caption", rewrite_input="image", max_tokens=24)
    config.prompts.update(crop=SHAPES_WORLD_PROMPT, rewrite_image=SHAPES_WORLD_PROMPT)
    # The captioner writes scene captions ("a large striped red star above a small solid blue ring"); a crop's
    # description is its first object without size, the form of the ground-truth region descriptions.
    from vlm_jax.data.shapes_world import world  # noqa: PLC0415

    config.description_cut, config.description_drop = tuple(world.RELATIONS), tuple(world.SIZES)
    # Crops with 2.5x context, the surroundings blurred: on 311 pretrain objects the embedded captioner names
    # 12.9% exactly (pattern 48%, colour 67%, shape 22%); tight crops, out of its training distribution of whole
    # scenes, 4.8% (pattern 29%, colour 89%, shape 13%).
    config.crop.update(min_scale=2.5, max_scale=2.5, blur_sigma=2.0)
    config.detector.backend = "ground_truth"
    return config


# -- descriptions, rewrites and the ground truth -------------------------------------------------------------

def rewrites(identifier: str, seed: int, p: float) -> bool:
    """Whether image `identifier`'s caption is a rewrite: a hash of (seed, id) below `p` (the same every run)."""
    digest = hashlib.sha256(f"{int(seed)}:{identifier}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < float(p)


def _compare_one(boxes: np.ndarray, descriptions: Sequence[str], record: Mapping[str, Any],
                 iou_threshold: float) -> dict[str, float]:
    truth_boxes, truth_texts = ground_truth_regions(record)
    result = {"boxes": len(descriptions), "matched": 0, "correct": 0, "iou_sum": 0.0}
    if not len(descriptions) or not len(truth_texts):
        return result
    from vlm_jax.models.boxes import pairwise_iou  # noqa: PLC0415

    iou = np.asarray(pairwise_iou(np.asarray(boxes, np.float32).reshape(-1, 4),
                                  np.asarray(truth_boxes, np.float32).reshape(-1, 4)))
    for row, text in enumerate(descriptions):
        best = int(np.argmax(iou[row]))
        result["iou_sum"] += float(iou[row, best])
        if iou[row, best] >= iou_threshold:
            result["matched"] += 1
            result["correct"] += int(normalize_text(text) == normalize_text(truth_texts[best]))
    return result


def _comparison(totals: Mapping[str, float], images: int) -> dict[str, float]:
    boxes = totals.get("boxes", 0)
    return {"images": images, "boxes": int(boxes), "matched": int(totals.get("matched", 0)),
            "correct": int(totals.get("correct", 0)),
            "description_accuracy": totals.get("correct", 0) / boxes if boxes else 0.0,
            "matched_fraction": totals.get("matched", 0) / boxes if boxes else 0.0,
            "mean_iou": totals.get("iou_sum", 0.0) / boxes if boxes else 0.0}


def compare_with_ground_truth(annotations: Mapping[str, Annotation], records: Mapping[str, Mapping[str, Any]], *,
                              iou_threshold: float = 0.5) -> dict[str, float]:
    """How pipeline regions agree with Shapes World's ground truth: each annotated box sits on the ground-truth
    box of its record it overlaps most; it is matched when their IoU >= `iou_threshold`, correct when matched and
    its description equals that box's (`normalize_text`).

    Args:
      annotations: id -> Annotation (`read_annotations`).
      records: id -> the Shapes World record (with `regions`); ids absent here are skipped.
    Returns:
      images, boxes, matched, correct; description_accuracy (correct / boxes: the fraction of pipeline
      descriptions equal to the ground-truth description of the box they sit on), matched_fraction, mean_iou
      (over pipeline boxes, of the best IoU).
    """
    totals: dict[str, float] = {}
    images = 0
    for identifier, annotation in annotations.items():
        record = records.get(identifier)
        if record is None:
            continue
        images += 1
        for name, value in _compare_one(annotation.boxes, annotation.descriptions, record, iou_threshold).items():
            totals[name] = totals.get(name, 0) + value
    return _comparison(totals, images)


# -- config checks -------------------------------------------------------------------------------------------


def _as_config(section: Any) -> ml_collections.ConfigDict:
    """An annotate section (ConfigDict or mapping, possibly partial) over `annotate_config()`'s defaults."""
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    config = annotate_config()
    config.update(ml_collections.ConfigDict(values))
    return config


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_annotate_section(section: Any, where: str = "annotate", *, check_backend: bool = True) -> None:
    """Checks an `annotate_config()` section: every field known, values in range, the prompts' placeholders,
    the detector section (`check_backend=False`: a detector is given, only score_threshold and max_boxes
    apply), and that the corpus files exist. One-line ConfigErrors."""
    check_fields(section, annotate_config(), where)
    section = _as_config(section)
    if section.mode not in MODES:
        raise ConfigError(f"{where}.mode={section.mode!r} is not a mode; expected one of {list(MODES)}.")
    if section.rewrite_input not in REWRITE_INPUTS:
        raise ConfigError(f"{where}.rewrite_input={section.rewrite_input!r}; expected one of {list(REWRITE_INPUTS)}.")
    for name in ("max_descriptions", "max_description_words", "max_tokens", "rewrite_max_tokens", "batch_size",
                 "shard_size"):
        if not _positive_int(section[name]):
            raise ConfigError(f"{where}.{name} must be a positive integer, got {section[name]!r}.")
    for name in ("limit", "seed"):
        if isinstance(section[name], bool) or not isinstance(section[name], int) or section[name] < 0:
            raise ConfigError(f"{where}.{name} must be a non-negative integer, got {section[name]!r}.")
    p = section.rewrite_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ConfigError(f"{where}.rewrite_p must be a probability in [0, 1], got {p!r}.")
    if not section.id_key:
        raise ConfigError(f"{where}.id_key is empty; name the record field holding each record's id.")
    placeholders = {}
    for name, allowed in PLACEHOLDERS.items():
        template = section.prompts[name]
        if not isinstance(template, str) or not template.strip():
            raise ConfigError(f"{where}.prompts.{name} must be a non-empty string, got {template!r}.")
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
            placeholders[name] = fields
        except ValueError as error:
            raise ConfigError(f"{where}.prompts.{name} is not a valid template ({error}); write {{{{ }}}} for "
                              "literal braces.") from None
        if fields - set(allowed):
            takes = ", ".join("{" + field + "}" for field in allowed) or "none"
            raise ConfigError(f"{where}.prompts.{name} has placeholder {{{sorted(fields - set(allowed))[0]}}}; it "
                              f"takes {takes}.")
    if "caption" not in placeholders["rewrite_text"]:
        raise ConfigError(f"{where}.prompts.rewrite_text has no {{caption}}; a text rewrite must carry the caption.")
    crop = section.crop
    if not _positive_int(crop.size):
        raise ConfigError(f"{where}.crop.size must be a positive integer, got {crop.size!r}.")
    for name in ("min_scale", "max_scale", "blur_sigma"):
        if isinstance(crop[name], bool) or not isinstance(crop[name], (int, float)) or crop[name] < 0:
            raise ConfigError(f"{where}.crop.{name} must be a non-negative number, got {crop[name]!r}.")
    if not 0 < crop.min_scale <= crop.max_scale:
        raise ConfigError(f"{where}.crop needs 0 < min_scale <= max_scale, got {crop.min_scale} and {crop.max_scale}.")
    detector = section.detector.to_dict()
    if section.mode == "crops" or not check_backend:  # no backend is built; score_threshold and max_boxes apply
        detector.update(backend="ground_truth")
    check_detector_section(detector, f"{where}.detector")
    require_data_files(section.data, f"{where}.data")
    pipeline.check_source(section.data, f"{where}.data")


def task_schema() -> dict[str, Any]:
    """The fields of a `annotate` task config."""
    return records.task_schema("annotate", annotate_config())


def check_annotate_config(config: Any) -> None:
    """Checks a whole `annotate` task config before any work (`task_schema`): every field, the annotate section,
    the MLLM section (`vlm_jax.mllm.recaption.check_task_mllm`), and that rewrite_input="text" has a text LM
    (the embedded captioner needs an image). One-line ConfigErrors."""
    from vlm_jax.mllm.recaption import check_task_mllm  # noqa: PLC0415

    check_fields(config, task_schema())
    section = _task_section(config)
    check_annotate_section(section)
    mllm = check_task_mllm(config, "annotate", section.batch_size)
    if mllm.backend == "embedded" and section.rewrite_input == "text" and section.rewrite_p > 0:
        raise ConfigError("annotate.rewrite_input='text' sends text-only requests and the embedded captioner needs an "
                          "image; use rewrite_input='image' (or 'auto'), or an openai-compatible text LM endpoint.")


def _task_section(config: Any) -> ml_collections.ConfigDict:
    section = _as_config(config.annotate)
    if not section.data.data_dir and config.get("data_dir"):
        section.data.data_dir = config.data_dir
    if section.rewrite_input == "auto":
        section.rewrite_input = "image" if config.mllm.backend == "embedded" else "text"
    return section


# -- the pipeline --------------------------------------------------------------------------------------------


def _manifest(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that decide the output's content."""
    detector = {name: section.detector[name] for name in ("score_threshold", "max_boxes")}
    if section.mode == "image":
        detector.update(backend=section.detector.backend, path=section.detector.path,
                        model_dir=section.detector.model_dir)
    used = ("crop",) if section.mode == "crops" else ("describe",)
    prompts = {name: section.prompts[name] for name in used + ("rewrite_text", "rewrite_image")}
    return {"mode": section.mode, "prompts": prompts, "id_key": section.id_key, "caption_key": section.caption_key,
            "max_descriptions": section.max_descriptions, "max_description_words": section.max_description_words,
            "description_cut": list(section.description_cut), "description_drop": list(section.description_drop),
            "max_tokens": section.max_tokens, "rewrite_p": float(section.rewrite_p),
            "rewrite_input": section.rewrite_input, "rewrite_max_tokens": section.rewrite_max_tokens,
            "seed": section.seed, "detector": detector,
            "crop": section.crop.to_dict() if section.mode == "crops" else None,
            "data": records.data_manifest(section.data)}


def _counts() -> dict[str, Any]:
    return {**records.new_counts(), "boxes_per_image": {}, "rewritten": 0, "rewrite_fallback": {},
            "ground_truth": {}}


def _count(counts: dict[str, Any], record: Mapping[str, Any]) -> None:
    records.tally(counts, record)
    if record["rejected"]:
        return
    boxes = str(len(record["boxes"]))
    counts["boxes_per_image"][boxes] = counts["boxes_per_image"].get(boxes, 0) + 1
    counts["rewritten"] += record.get("caption_source") == "rewrite"
    if record.get("rewrite_fallback"):
        reason = record["rewrite_fallback"]
        counts["rewrite_fallback"][reason] = counts["rewrite_fallback"].get(reason, 0) + 1
    for name, value in (record.get("ground_truth") or {}).items():
        counts["ground_truth"][name] = counts["ground_truth"].get(name, 0) + value


class _Annotator:
    """Annotates the items of one batch (module docstring)."""

    def __init__(self, section: ml_collections.ConfigDict, mllm: Any, detector: Any, rewrite_input: str):
        self.section, self.mllm, self.detector, self.rewrite_input = section, mllm, detector, rewrite_input
        self.threshold = float(section.detector.score_threshold)
        self.max_boxes = int(section.detector.max_boxes)

    def _parse(self, answer: str) -> list[str]:
        section = self.section
        return parse_descriptions(answer, int(section.max_descriptions), int(section.max_description_words),
                                  cut=tuple(section.description_cut), drop=tuple(section.description_drop))

    def _describe_images(self, ready: list[records.Item]) -> tuple[dict[int, Detections | str], set[int]]:
        """Image mode: per item (by id()), its kept Detections with the descriptions, or a rejection reason."""
        prompt = self.section.prompts.describe.format(max_descriptions=int(self.section.max_descriptions))
        answers, failed_during = records.generate_checked(self.mllm, [item.image for item in ready],
                                                          [prompt] * len(ready), self.section.max_tokens)
        results: dict[int, Any] = {}
        failed: set[int] = set()
        asked = []
        for item, answer in zip(ready, answers):
            descriptions = self._parse(answer)
            if not answer.strip() and failed_during:
                failed.add(id(item))
            elif not descriptions:
                results[id(item)] = "no_descriptions"
            else:
                asked.append((item, descriptions))
        observe = getattr(self.detector, "observe_record", None)
        for item, _ in asked if observe is not None else ():
            observe(item.id, item.record)
        found = self.detector.detect([item.image for item, _ in asked], [texts for _, texts in asked],
                                     [item.id for item, _ in asked]) if asked else []
        if len(found) != len(asked):
            raise RuntimeError(f"the detector answered {len(found)} of {len(asked)} images")
        for (item, descriptions), detections in zip(asked, found):
            kept = detections.keep(self.threshold, self.max_boxes)
            results[id(item)] = (kept, [descriptions[query] for query in kept.queries]) if len(kept) else "no_boxes"
        if hasattr(self.detector, "forget"):
            self.detector.forget([item.id for item, _ in asked])
        return results, failed

    def _describe_crops(self, ready: list[records.Item]) -> tuple[dict[int, Any], set[int]]:
        """Crops mode: per item, the ground-truth boxes its crops' descriptions were kept for, or a reason."""
        from vlm_jax.data.regions import crop_region  # noqa: PLC0415

        crop = self.section.crop
        owners, crops, boxes = [], [], []
        for item in ready:
            regions, _ = ground_truth_regions(item.record)
            height, width = item.image.shape[:2]
            for box in regions:
                pixels = np.clip(box, 0, 1) * np.array([width, height, width, height])
                crops.append(crop_region(item.image, pixels, size=int(crop.size), min_scale=float(crop.min_scale),
                                         max_scale=float(crop.max_scale), blur_sigma=float(crop.blur_sigma)))
                owners.append(id(item))
                boxes.append(box)
        prompts = [self.section.prompts.crop] * len(crops)
        answers, failed_during = records.generate_checked(self.mllm, crops, prompts, self.section.max_tokens)
        kept: dict[int, list[tuple[np.ndarray, str]]] = {id(item): [] for item in ready}
        failed: set[int] = set()
        for owner, box, answer in zip(owners, boxes, answers):
            if not answer.strip() and failed_during:
                failed.add(owner)
            descriptions = self._parse(answer)
            if descriptions:
                kept[owner].append((box, descriptions[0]))
        results: dict[int, Any] = {}
        for owner, pairs in kept.items():
            pairs = pairs[:self.max_boxes]  # every crop scores 1.0: the first max_boxes, in record order
            results[owner] = (Detections(np.asarray([box for box, _ in pairs], np.float32), np.ones(len(pairs)),
                                         np.arange(len(pairs))), [text for _, text in pairs]) if pairs else "no_boxes"
        return results, failed

    def _captions(self, kept: list[records.Item]) -> dict[int, tuple[str | None, str, str]]:
        """Per kept item: (caption, "original" | "rewrite", the reason a chosen rewrite fell back, or "")."""
        from vlm_jax.mllm.recaption import filters_config, quality_reason  # noqa: PLC0415

        section = self.section
        chosen = [item for item in kept if rewrites(item.id, section.seed, section.rewrite_p)
                  and (self.rewrite_input == "image" or item.texts.get("caption"))]
        if self.rewrite_input == "text":
            images = [None] * len(chosen)
            prompts = [section.prompts.rewrite_text.format(caption=item.texts["caption"]) for item in chosen]
        else:
            images, prompts = [item.image for item in chosen], [section.prompts.rewrite_image] * len(chosen)
        answers, failed_during = records.generate_checked(self.mllm, images, prompts, section.rewrite_max_tokens)
        result = {id(item): (item.texts.get("caption") or None, "original", "") for item in kept}
        for item, answer in zip(chosen, answers):
            answer = answer.strip()
            reason = "failed" if not answer and failed_during else quality_reason(answer, filters_config())
            result[id(item)] = (answer, "rewrite", "") if not reason else (result[id(item)][0], "original", reason)
        return result

    def __call__(self, items: list[records.Item]) -> tuple[list[dict[str, Any]], int]:
        ready = [item for item in items if not item.reason]
        describe = self._describe_crops if self.section.mode == "crops" else self._describe_images
        results, failed = describe(ready) if ready else ({}, set())
        kept = [item for item in ready if id(item) not in failed and not isinstance(results[id(item)], str)]
        captions = self._captions(kept)
        rows = []
        for item in items:
            if id(item) in failed:
                continue
            outcome = item.reason or results[id(item)]
            if isinstance(outcome, str):
                rows.append({"id": item.id, "index": item.position, "boxes": [], "descriptions": [], "scores": [],
                             "rejected": outcome})
                continue
            detections, descriptions = outcome
            boxes = np.clip(detections.boxes, 0.0, 1.0)
            boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])],
                                   axis=1)
            caption, source, fallback = captions[id(item)]
            row = {**annotation_record(item.id, boxes, descriptions, detections.scores, caption),
                   "index": item.position, "rejected": "", "caption_source": source}
            if fallback:
                row["rewrite_fallback"] = fallback
            if self.section.mode == "crops":
                row["ground_truth"] = _compare_one(boxes, descriptions, item.record, 0.5)
            rows.append(row)
        return rows, len(failed)


def _resolve_rewrite_input(section: ml_collections.ConfigDict, mllm: Any) -> str:
    if section.rewrite_input != "auto":
        return section.rewrite_input
    return "image" if type(mllm).__module__ == "vlm_jax.mllm.embedded" else "text"


def annotate(config_section: Any, mllm: Any, detector: Any, output_dir: str | os.PathLike, *,
             backend: str = "") -> dict[str, Any]:
    """Annotates the corpus of an `annotate_config()` section into `output_dir` (resumable; module docstring) and
    returns the summary (also in summary.json).

    Args:
      config_section: an `annotate_config()` section (or a partial mapping over its defaults).
      mllm: an MLLM (`generate(images, prompts, max_tokens)`) or a zero-argument callable returning one, called
        only when there is something left to do.
      detector: a `vlm_jax.mllm.detector.Detector`, a zero-argument callable returning one, or None: built from
        the section's `detector` (`make_detector`) when needed. Crops mode runs none.
      output_dir: a local directory.
      backend: describes the MLLM in the summary (default: its repr).
    """
    section = _as_config(config_section)
    check_annotate_section(section, check_backend=detector is None)
    directory = os.fspath(output_dir)
    if "://" in directory:
        raise ConfigError(f"the annotation output {directory!r} must be a local directory.")
    store = records.ShardStore(directory, SHARD_PREFIX, array_record=False)
    plan = records.plan_run(section.data, int(section.limit), store, MANIFEST_FILE, _manifest(section),
                            "annotations", counts=_counts(), count=_count)
    logging.info("Annotate %s: %d of %d images to do (%d already in %d shards), mode %s.", directory,
                 len(plan.todo), plan.total, plan.total - len(plan.todo), plan.next_shard, section.mode)
    counts, stats, detector_name = plan.counts, records.RunStats(), ""
    if plan.todo:
        mllm = records.build(mllm)
        backend = backend or records.describe(mllm)
        if section.mode == "image":
            detector = make_detector(section.detector) if detector is None else records.build(detector, "detect")
            detector_name = records.describe(detector)
        needs_record = section.mode == "crops" or hasattr(detector, "observe_record")
        reader = records.BatchedReader(plan.source, section.data, id_key=section.id_key, where="annotate",
                                       text_keys={"caption": section.caption_key}, keep_record=needs_record)
        annotator = _Annotator(section, mllm, detector, _resolve_rewrite_input(section, mllm))
        stats = records.run_batches(plan.todo, reader.read, annotator, store, plan.next_shard,
                                    shard_size=section.shard_size, batch_size=section.batch_size, counts=counts,
                                    count=lambda record: _count(counts, record), progress=section.progress,
                                    desc="annotate")
        if stats.failed:
            logging.warning("Annotate: %d images lost their answers to failed requests; they are not written, and "
                            "rerunning the same command retries them.", stats.failed)
    summary = {
        "written": counts["written"], "kept": counts["kept"], "rejected": dict(sorted(counts["rejected"].items())),
        "failed": stats.failed, "remaining": len(plan.todo) - (stats.processed - stats.failed), "total": plan.total,
        "boxes_per_image": dict(sorted(counts["boxes_per_image"].items(), key=lambda kv: int(kv[0]))),
        "rewritten": counts["rewritten"], "rewrite_fallback": dict(sorted(counts["rewrite_fallback"].items())),
        "items_per_s": stats.items_per_s, "seconds": stats.seconds, "mode": section.mode,
        "backend": backend or (records.describe(mllm) if hasattr(mllm, "generate") else ""),
        "detector": detector_name, "shards": len(store.finished()),
    }
    if section.mode == "crops":
        summary["ground_truth"] = _comparison(counts["ground_truth"], counts["kept"])
    records.write_json(os.path.join(directory, SUMMARY_FILE), summary)
    return summary


def summary_line(summary: Mapping[str, Any], directory: str | os.PathLike = "") -> str:
    """One line: kept / rejected by reason / boxes / items/s (and where)."""
    rejected = summary["rejected"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1]))
    boxes = sum(int(n) * count for n, count in summary["boxes_per_image"].items())
    line = (f"annotate ({summary['mode']}): {summary['kept']} kept with {boxes} boxes, {sum(rejected.values())} "
            f"rejected{f' ({reasons})' if reasons else ''} of {summary['written']} written, {summary['rewritten']} "
            f"captions rewritten, {summary['items_per_s']:.2f} items/s")
    if "ground_truth" in summary:
        line += f"; descriptions equal to the ground truth: {summary['ground_truth']['description_accuracy']:.3f}"
    if summary.get("failed"):
        line += f"; {summary['failed']} failed requests (rerun to retry)"
    return f"{line} -> {directory}" if directory else line


def annotate_dir(config: Any, directory: str | os.PathLike) -> dict[str, Any]:
    """A resumable stage: annotates config.annotate's corpus into `directory` with config.mllm (the embedded
    captioner of config.mllm_config, trained once into the shared cache, when mllm.model_dir is empty) and
    returns the summary; `read_annotations(directory)` reads the result. The config is checked by the caller."""
    from vlm_jax.mllm.recaption import task_backend  # noqa: PLC0415

    section = _task_section(config)
    build, description = task_backend(config)
    return annotate(section, build, lambda: make_detector(section.detector), os.fspath(directory), backend=description)


def annotate_task(config: Any, workdir: Any) -> dict[str, float]:
    """The `annotate` task: config.annotate (`annotate_config()`), config.mllm (the MLLM section), mllm_config (an
    experiments/captioner.py config that trains the embedded captioner when mllm.model_dir is empty), data_dir
    (the corpus's TFDS data_dir when annotate.data.data_dir is unset), cache_dir. Writes <workdir>/annotations
    and prints the summary line."""
    check_annotate_config(config)
    directory = os.path.join(os.fspath(workdir), "annotations")
    summary = annotate_dir(config, directory)
    print(summary_line(summary, directory), flush=True)
    metrics = {f"annotate/{name}": float(summary[name])
               for name in ("written", "kept", "failed", "rewritten", "items_per_s")}
    metrics.update({f"annotate/rejected/{reason}": float(count) for reason, count in summary["rejected"].items()})
    for name, value in summary.get("ground_truth", {}).items():
        metrics[f"annotate/ground_truth/{name}"] = float(value)
    return metrics


__all__ = ["MODES", "REASONS", "annotate", "annotate_config", "annotate_dir", "annotate_task", "check_annotate_config",
           "check_annotate_section", "compare_with_ground_truth", "parse_descriptions", "rewrites",
           "shapes_world_annotate_config", "summary_line"]
