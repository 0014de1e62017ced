"""Region annotations: GRAIN's per-image boxes, each with the short description that fired it.

One JSON object per line (JSONL), one line per image:

    {"id": "<image id>", "boxes": [[x0, y0, x1, y1], ...], "descriptions": ["a striped red star", ...],
     "scores": [0.9, ...], "caption": "..."}

Boxes are normalized to [0, 1] by the image's width and height, x0 <= x1 and y0 <= y1 (values within 1e-6
outside [0, 1] are taken as rounding and clipped). "descriptions" and "scores" have one entry per box;
"scores" may be left out (every box then scores 1.0), "caption" too (null or absent: the record's own caption
is used). An integer id is read as its decimal string. Other keys are ignored, so the output of any
detector + MLLM pipeline loads once it is written in this shape. A line with a non-empty "rejected" field
names an image the annotation pipeline (`vlm_jax.mllm.annotate`) rejected (its reason); the reader skips it.

    write_annotation_line(file, "17", boxes, ["a red star"], [0.8], caption="A red star on grey.")
    annotations = read_annotations("/out/annotations/*.jsonl")     # id -> Annotation

Every malformed line (bad JSON, a missing field, mismatched lengths, a box out of [0, 1] or with x1 < x0 or
y1 < y0, a non-finite number, an id in two lines) is a one-line UserError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
from etils import epath

from vlm_jax.errors import UserError

TOLERANCE = 1e-6  # how far outside [0, 1] a coordinate may stray by rounding


@dataclasses.dataclass(frozen=True, eq=False)
class Annotation:
    """One image's regions.

    Attributes:
      boxes: float32 [n, 4] (x0, y0, x1, y1) normalized to [0, 1] by the image's width and height.
      descriptions: the n descriptions, one per box.
      scores: float32 [n], the detector's score of each box.
      caption: the image's caption (an MLLM rewrite or the original), or None: use the record's own.
    """

    boxes: np.ndarray
    descriptions: tuple[str, ...]
    scores: np.ndarray
    caption: str | None = None

    def __len__(self) -> int:
        return len(self.descriptions)


class AnnotationError(UserError, ValueError):
    """A malformed annotation (the message names the file and line where it was read)."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{what} is {value!r}, not a number")
    if not math.isfinite(value):
        raise AnnotationError(f"{what} is {value!r}, not finite")
    return float(value)


def validate_annotation(identifier: Any, boxes: Any, descriptions: Any, scores: Any = None, caption: Any = None, *,
                        require_descriptions: bool = True) -> tuple[str, Annotation]:
    """(the id as str, the Annotation) of one image's fields, or an AnnotationError saying what is wrong.

    Args:
      identifier: the image id (str, or int read as its decimal string).
      boxes: n boxes [x0, y0, x1, y1] normalized to [0, 1].
      descriptions: n strings (None allowed only with `require_descriptions=False`: n empty strings).
      scores: n numbers, or None: 1.0 each.
      caption: a str or None.
      require_descriptions: False lets a file of boxes without descriptions load (`FileDetector`).
    """
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)) or identifier == "":
        raise AnnotationError(f"\"id\" must be a non-empty string (or an integer), got {identifier!r}")
    identifier = str(identifier)
    if not isinstance(boxes, (list, tuple, np.ndarray)):
        raise AnnotationError(f"\"boxes\" must be a list of [x0, y0, x1, y1], got {boxes!r}")
    rows = []
    for number, box in enumerate(boxes):
        if isinstance(box, (str, bytes)) or not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
            raise AnnotationError(f"box {number} is {box!r}, not [x0, y0, x1, y1]")
        values = [_number(value, f"box {number} coordinate {axis}") for axis, value in enumerate(box)]
        if any(value < -TOLERANCE or value > 1 + TOLERANCE for value in values):
            raise AnnotationError(f"box {number} {values} is out of [0, 1]; boxes are normalized by the image's "
                                  "width and height (divide pixel coordinates by them)")
        x0, y0, x1, y1 = (min(max(value, 0.0), 1.0) for value in values)
        if x1 < x0 or y1 < y0:
            raise AnnotationError(f"box {number} {values} has x1 < x0 or y1 < y0; boxes are [x0, y0, x1, y1]")
        rows.append((x0, y0, x1, y1))
    if descriptions is None and not require_descriptions:
        descriptions = [""] * len(rows)
    if isinstance(descriptions, str) or not isinstance(descriptions, (list, tuple)):
        raise AnnotationError(f"\"descriptions\" must be a list of strings, got {descriptions!r}")
    if not all(isinstance(text, str) for text in descriptions):
        raise AnnotationError(f"\"descriptions\" must be a list of strings, got {descriptions!r}")
    if len(descriptions) != len(rows):
        raise AnnotationError(f"{len(rows)} boxes and {len(descriptions)} descriptions; give one description per box")
    if scores is None:
        scores = [1.0] * len(rows)
    if isinstance(scores, str) or not isinstance(scores, (list, tuple, np.ndarray)):
        raise AnnotationError(f"\"scores\" must be a list of numbers, got {scores!r}")
    if len(scores) != len(rows):
        raise AnnotationError(f"{len(rows)} boxes and {len(scores)} scores; give one score per box")
    score_values = [_number(value, f"score {number}") for number, value in enumerate(scores)]
    if caption is not None and not isinstance(caption, str):
        raise AnnotationError(f"\"caption\" must be a string or null, got {caption!r}")
    return identifier, Annotation(boxes=np.asarray(rows, np.float32).reshape(-1, 4),
                                  descriptions=tuple(descriptions),
                                  scores=np.asarray(score_values, np.float32).reshape(-1), caption=caption)


def annotation_record(identifier: Any, boxes: Any, descriptions: Sequence[str], scores: Any = None,
                      caption: str | None = None) -> dict[str, Any]:
    """The JSON object of one image (validated; boxes and scores as plain floats)."""
    identifier, annotation = validate_annotation(identifier, np.asarray(boxes, np.float64).reshape(-1, 4).tolist(),
                                                 list(descriptions), None if scores is None
                                                 else np.asarray(scores, np.float64).reshape(-1).tolist(), caption)
    record = {"id": identifier, "boxes": [[round(float(v), 6) for v in box] for box in annotation.boxes.tolist()],
              "descriptions": list(annotation.descriptions),
              "scores": [round(float(v), 6) for v in annotation.scores.tolist()]}
    if caption is not None:
        record["caption"] = caption
    return record


def annotation_line(identifier: Any, boxes: Any, descriptions: Sequence[str], scores: Any = None,
                    caption: str | None = None) -> str:
    """One line of the format (with its newline) for one image; an AnnotationError when a field is wrong."""
    return json.dumps(annotation_record(identifier, boxes, descriptions, scores, caption), ensure_ascii=False) + "\n"


def write_annotation_line(file: IO[str], identifier: Any, boxes: Any, descriptions: Sequence[str], scores: Any = None,
                          caption: str | None = None) -> None:
    """Writes one image's line to the text file `file` (`annotation_line`)."""
    file.write(annotation_line(identifier, boxes, descriptions, scores, caption))


def parse_annotation_line(line: str, where: str = "annotation", *,
                          require_descriptions: bool = True) -> tuple[str, Annotation] | None:
    """(id, Annotation) of one line, None for a blank line or a rejected image's line; `where` ("file:line")
    leads the error message."""
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{where}: not a JSON object ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if value.get("rejected"):
        return None
    for key in ("id", "boxes") + (("descriptions",) if require_descriptions else ()):
        if key not in value:
            raise AnnotationError(f"{where}: no {key!r} field (fields: {sorted(value)}); each line is "
                                  "{\"id\", \"boxes\", \"descriptions\", \"scores\", \"caption\"}")
    try:
        return validate_annotation(value["id"], value["boxes"], value.get("descriptions"), value.get("scores"),
                                   value.get("caption"), require_descriptions=require_descriptions)
    except AnnotationError as error:
        raise AnnotationError(f"{where}: {error}") from None


def annotation_files(path_or_glob: str | os.PathLike) -> list[str]:
    """The files a path names: a file, a directory (its *.jsonl files), or comma-separated globs (local or
    gs://), sorted; a UserError when it names none."""
    files: list[str] = []
    for pattern in [part for part in str(os.fspath(path_or_glob)).split(",") if part]:
        if "://" in pattern:
            path = epath.Path(pattern)
            if path.is_dir():
                matches = sorted(str(match) for match in path.glob("*.jsonl"))
            elif path.exists():
                matches = [pattern]
            else:
                matches = sorted(str(match) for match in path.parent.glob(path.name))
        elif os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(pattern, "*.jsonl")))
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise UserError(f"annotations {pattern!r} match no file; pass a JSONL file, a directory of them or a glob.")
        files.extend(matches)
    if not files:
        raise UserError("no annotation path given; pass a JSONL file, a directory of them or a glob.")
    return files


def _numbered(path: str, require_descriptions: bool) -> Iterator[tuple[int, str, Annotation]]:
    try:
        with epath.Path(path).open("r", encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                parsed = parse_annotation_line(line, f"{path}:{number}", require_descriptions=require_descriptions)
                if parsed is not None:
                    yield (number, *parsed)
    except (PermissionError, FileNotFoundError) as error:
        raise UserError(f"annotations {path!r} cannot be read ({type(error).__name__}); check the path.") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error.reason}); annotation files are UTF-8 JSONL.") from None


def iter_annotation_file(path: str, *, require_descriptions: bool = True) -> Iterator[tuple[str, Annotation]]:
    """(id, Annotation) of every annotated image of one file, in order (rejected images skipped)."""
    for _, identifier, annotation in _numbered(path, require_descriptions):
        yield identifier, annotation


def read_annotation_files(path_or_glob: str | os.PathLike, *,
                          require_descriptions: bool = True) -> dict[str, Annotation]:
    """`read_annotations`, optionally accepting lines without descriptions."""
    annotations: dict[str, Annotation] = {}
    first_seen: dict[str, str] = {}
    for path in annotation_files(path_or_glob):
        for number, identifier, annotation in _numbered(path, require_descriptions):
            if identifier in annotations:
                raise AnnotationError(f"{path}:{number}: image id {identifier!r} is annotated twice (first at "
                                      f"{first_seen[identifier]}); each image has one line.")
            annotations[identifier] = annotation
            first_seen[identifier] = f"{path}:{number}"
    return annotations


def read_annotations(path_or_glob: str | os.PathLike) -> dict[str, Annotation]:
    """id -> Annotation of every annotated image in a JSONL file, a directory of them, or globs (rejected
    images left out); a one-line UserError naming the file and line of the first malformed line."""
    return read_annotation_files(path_or_glob, require_descriptions=True)


def annotation_counts(annotations: Mapping[str, Annotation]) -> dict[int, int]:
    """boxes per image -> number of images."""
    counts: dict[int, int] = {}
    for annotation in annotations.values():
        counts[len(annotation)] = counts.get(len(annotation), 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["Annotation", "AnnotationError", "annotation_counts", "annotation_files", "annotation_line",
           "annotation_record", "iter_annotation_file", "parse_annotation_line", "read_annotation_files",
           "read_annotations", "validate_annotation", "write_annotation_line"]
