"""Open-vocabulary detectors behind one protocol, chosen by config (`detector_config()`).

    detector = make_detector(config.detector)
    detections = detector.detect(images, queries=[["a red star", "a blue disc"], ["a cat"]], ids=["0", "1"])
    kept = detections[0].keep(score_threshold=0.3, max_boxes=5)

Boxes are float32 [n, 4] (x0, y0, x1, y1) normalized to [0, 1] by the image's width and height; each box
carries the index, into that image's query list, of the text query that fired it.

Backends (`detector.backend`):
  file          boxes read from a JSONL file (or glob) in the annotation format of `vlm_jax.data.annotations`,
                keyed by image id: a stored box is matched to the query equal to its description (compared
                lowercased, whitespace collapsed, a trailing full stop dropped) and left out when no query
                matches; a file without descriptions returns its boxes in order, box i for query i (boxes past
                the last query are left out). Boxes made by any external detector load this way.
  owlv2         `vlm_jax.mllm.owlv2_detector.Owlv2Detector(model_dir, batch_size)`: a Hugging Face
                Owlv2ForObjectDetection directory run in JAX.
  ground_truth  Shapes World's ground-truth regions (records carry `regions` with `bbox` normalized (ymin, xmin,
                ymax, xmax) and `description`), matched to the queries as the file backend does, score 1.0. The
                records reach it through `observe_record(id, record)`, which the annotation pipeline calls for
                every record it reads before `detect`; ids it has not observed are a UserError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config_lib import ConfigError, check_fields
from vlm_jax.errors import UserError
from vlm_jax.mllm.answers import normalize_text
from vlm_jax.mllm.protocol import Detections, Detector  # noqa: F401 - re-exported: the detector protocol

BACKENDS = ("file", "owlv2", "ground_truth")


def detector_config() -> ml_collections.ConfigDict:
    """The `detector` section with every field and its default."""
    return ml_collections.ConfigDict({
        "backend": "file",  # "file" | "owlv2" | "ground_truth"
        "path": "",  # file: the annotation-format JSONL file(s) (a path, a directory of *.jsonl, or globs)
        "model_dir": "",  # owlv2: a transformers Owlv2ForObjectDetection directory (with tokenizer.json)
        "score_threshold": 0.3,  # boxes scoring above it are kept
        "max_boxes": 5,  # at most this many boxes per image, best first
        "batch_size": 8,  # owlv2: images per forward pass
    })


def check_detector_section(section: Any, where: str = "detector") -> None:
    """One-line ConfigErrors for an unknown field or a bad value of a `detector_config()` section (the files
    a backend reads are checked when it is built)."""
    check_fields(section, detector_config(), where)
    values = {**detector_config().to_dict(), **_as_dict(section)}
    if values["backend"] not in BACKENDS:
        raise ConfigError(f"{where}.backend={values['backend']!r} is not a backend; expected one of {list(BACKENDS)}.")
    threshold = values["score_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ConfigError(f"{where}.score_threshold must be a number in [0, 1), got {threshold!r}.")
    for name in ("max_boxes", "batch_size"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}.")
    if values["backend"] == "file" and not values["path"]:
        raise ConfigError(f"{where}.backend='file' reads boxes from a file; pass --config.{where}.path=FILE.jsonl.")
    if values["backend"] == "owlv2" and not values["model_dir"]:
        raise ConfigError(f"{where}.backend='owlv2' needs --config.{where}.model_dir=DIR (a transformers "
                          "Owlv2ForObjectDetection directory).")


def _as_dict(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    return section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)


def make_detector(section: Any) -> Detector:
    """The detector a `detector_config()` section names."""
    check_detector_section(section)
    values = {**detector_config().to_dict(), **_as_dict(section)}
    backend = values["backend"]
    if backend == "file":
        return FileDetector(values["path"])
    if backend == "ground_truth":
        return GroundTruthDetector()
    from vlm_jax.config_lib import require_path  # noqa: PLC0415
    from vlm_jax.mllm import owlv2_detector  # noqa: PLC0415 - JAX and the OWLv2 weights only when asked for

    require_path(values["model_dir"], "detector.model_dir", field="detector.model_dir", containing=("config.json",))
    return owlv2_detector.Owlv2Detector(values["model_dir"], batch_size=int(values["batch_size"]))


def match_queries(boxes: np.ndarray, scores: np.ndarray, descriptions: Sequence[str] | None,
                  queries: Sequence[str]) -> Detections:
    """Stored boxes as the Detections of `queries`: each box labelled with the first query equal to its
    description (`normalize_text`), boxes matching none left out; with no descriptions, box i for query i."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if descriptions is None or not any(descriptions):
        count = min(len(boxes), len(queries))
        return Detections(boxes[:count], scores[:count], np.arange(count, dtype=np.int32))
    index: dict[str, int] = {}
    for number, query in enumerate(queries):
        index.setdefault(normalize_text(query), number)
    rows, labels = [], []
    for row, description in enumerate(descriptions):
        number = index.get(normalize_text(description))
        if number is not None:
            rows.append(row)
            labels.append(number)
    rows_array = np.asarray(rows, np.int64)
    return Detections(boxes[rows_array], scores[rows_array], np.asarray(labels, np.int32))


def _check_lengths(images: Sequence[Any], queries: Sequence[Sequence[str]], ids: Sequence[str]) -> None:
    if not len(images) == len(queries) == len(ids):
        raise ValueError(f"{len(images)} images, {len(queries)} query lists and {len(ids)} ids; give one query list "
                         "and one id per image.")
    for texts, identifier in zip(queries, ids):
        if isinstance(texts, str):
            raise ValueError(f"the queries of image {identifier!r} are one string {texts!r}; give a list of strings.")


class FileDetector:
    """Boxes from annotation-format JSONL file(s), keyed by image id (module docstring). An id the files do
    not hold has no boxes."""

    def __init__(self, path_or_glob: str):
        from vlm_jax.data.annotations import read_annotation_files  # noqa: PLC0415

        self.path = str(path_or_glob)
        self._stored: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]] = {}
        for identifier, annotation in read_annotation_files(self.path, require_descriptions=False).items():
            descriptions = annotation.descriptions if any(annotation.descriptions) else None
            self._stored[identifier] = (annotation.boxes, annotation.scores, descriptions)
        self.missing = 0  # ids asked for that the files do not hold

    def __len__(self) -> int:
        return len(self._stored)

    def __repr__(self) -> str:
        return f"FileDetector({self.path!r}, {len(self._stored)} images)"

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]],
               ids: Sequence[str]) -> list[Detections]:
        """The stored boxes of each id matched to its queries (`match_queries`), best first."""
        _check_lengths(images, queries, ids)
        results = []
        for texts, identifier in zip(queries, ids):
            stored = self._stored.get(str(identifier))
            if stored is None:
                self.missing += 1
                results.append(Detections.empty())
                continue
            results.append(match_queries(*stored, texts).keep(-np.inf, len(stored[1])))
        return results


def ground_truth_regions(record: Mapping[str, Any]) -> tuple[np.ndarray, tuple[str, ...]]:
    """A Shapes World record's regions: (float32 [n, 4] (x0, y0, x1, y1) normalized, the n descriptions)."""
    regions = record.get("regions")
    if not isinstance(regions, Mapping) or "bbox" not in regions or "description" not in regions:
        raise UserError(f"the record has no Shapes World regions (fields: {sorted(record)}); the ground_truth "
                        "detector and the crops mode need records with regions.bbox and regions.description.")
    yxyx = np.asarray(regions["bbox"], np.float32).reshape(-1, 4)
    descriptions = tuple(_decode(text) for text in np.asarray(regions["description"]).reshape(-1))
    if len(descriptions) != len(yxyx):
        raise UserError(f"the record has {len(yxyx)} region boxes and {len(descriptions)} region descriptions.")
    return yxyx[:, [1, 0, 3, 2]], descriptions


def _decode(text: Any) -> str:
    if isinstance(text, np.generic):
        text = text.item()
    return bytes(text).decode("utf-8", "replace") if isinstance(text, (bytes, bytearray)) else str(text)


class GroundTruthDetector:
    """Shapes World's ground-truth regions as detections, score 1.0 (module docstring)."""

    def __init__(self, regions: Mapping[str, tuple[np.ndarray, Sequence[str]]] | None = None):
        self._regions: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {
            str(key): (np.asarray(boxes, np.float32).reshape(-1, 4), tuple(texts))
            for key, (boxes, texts) in (regions or {}).items()}

    def __repr__(self) -> str:
        return "GroundTruthDetector()"

    def observe_record(self, identifier: str, record: Mapping[str, Any]) -> None:
        """Remembers the ground-truth regions of the record with id `identifier`."""
        self._regions[str(identifier)] = ground_truth_regions(record)

    def forget(self, ids: Sequence[str]) -> None:
        """Drops the regions of `ids` (after they are detected)."""
        for identifier in ids:
            self._regions.pop(str(identifier), None)

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]],
               ids: Sequence[str]) -> list[Detections]:
        """The ground-truth boxes of each id whose description is one of its queries."""
        _check_lengths(images, queries, ids)
        results = []
        for texts, identifier in zip(queries, ids):
            if str(identifier) not in self._regions:
                raise UserError(f"the ground_truth detector has no regions for image {identifier!r}; it detects "
                                "only records it was shown (observe_record), so use it through the annotation "
                                "pipeline on Shapes World.")
            boxes, descriptions = self._regions[str(identifier)]
            results.append(match_queries(boxes, np.ones(len(boxes), np.float32), descriptions, texts))
        return results


__all__ = ["BACKENDS", "Detections", "Detector", "FileDetector", "GroundTruthDetector", "check_detector_section",
           "detector_config", "ground_truth_regions", "make_detector", "match_queries", "normalize_text"]
