"""Image-text corpora: random-access readers and conversion to ArrayRecord.

Readers for what `img2dataset` and similar tools write, each a random-access source
(`len(source)`, `source[i] -> dict`) that `vlm_jax.data.pipeline` reads through grain:

- `WebDatasetSource`: WebDataset tar shards. Members sharing a key (the name up to the first
  dot of the basename) form one example: `000123.jpg` + `000123.txt` + `000123.json`.
  The tar headers are scanned once to index member offsets; reads then seek straight to them.
- `ManifestSource`: a JSONL, CSV or parquet table with one row per example and an image path
  column (relative paths resolve against the manifest's folder or `image_root`).
- `ImageFolderSource`: class-per-subfolder image folders (`root/<class>/<file>`), for datasets
  that TFDS does not build.
- `ArrayRecordCorpusSource`: the output of `convert_to_array_record`.

Text must be UTF-8: a manifest line or row that is not, or a WebDataset text member that is not,
makes its record a bad input of kind "undecodable_text" (`BadRecordError`, detail naming the file
and line or the tar member), skipped and counted by the pipeline like any other; the rest of the
file is read as usual.

Examples are flat dicts. Field names: "id" (str), "image" (encoded image bytes), text fields as
str or list[str] ("caption" for `.txt`, "<name>" for `.<name>.txt`), "json" (the raw JSON
member or extra-metadata text), "label" (int) for classification sources.

ArrayRecord record format ("vlm_jax.corpus/1"): each record is one msgpack map from field name
to a msgpack value (bytes, str, int, float, bool, None or a list of those), with the key
"_format" holding the format string. Images are stored exactly as found (the original JPEG/PNG
bytes, not re-encoded), so the converted corpus decodes to identical pixels. Conversion never
drops an example: a broken one is written as found and is skipped and counted by the pipeline; a
record its source cannot read is written as a marker ("_bad_input": {"kind", "detail"}) that reads
back as the same `BadRecordError`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from vlm_jax.data.bad_input import BadRecordError
from vlm_jax.files import write_atomic

_LOG = logging.getLogger(__name__)
RECORD_FORMAT = "vlm_jax.corpus/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a glob, a comma-separated list or a list of paths into a sorted file list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",") if p]
    expanded: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise FileNotFoundError(f"No file matches {str(pattern)!r}; check the path or glob.")
        expanded.extend(matches)
    return expanded


def encode_record(example: Mapping[str, Any]) -> bytes:
    """Serializes one example dict (values: bytes/str/int/float/bool/None/lists) to a record."""
    record = {"_format": RECORD_FORMAT}
    for key, value in example.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        record[key] = value
    return msgpack.packb(record, use_bin_type=True)


def decode_record(record: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`; raises ValueError on a record of another format and
    `BadRecordError` on the marker of a record its source could not read."""
    example = msgpack.unpackb(record, raw=False)
    if not isinstance(example, dict) or example.pop("_format", None) != RECORD_FORMAT:
        raise ValueError(
            f"Record is not in the {RECORD_FORMAT} format; write it with vlm_jax.data.corpora.convert_to_array_record."
        )
    if "_bad_input" in example:
        marker = example["_bad_input"]
        raise BadRecordError(marker["kind"], marker["detail"])
    return example


def _field_name(extension: str) -> str | None:
    """Maps a WebDataset member extension to an example field (None: image)."""
    extension = extension.lower()
    if extension in IMAGE_EXTENSIONS:
        return None
    if extension == "txt":
        return "caption"
    if extension.endswith(".txt"):
        return extension[: -len(".txt")]
    return extension


@dataclasses.dataclass(frozen=True)
class _Member:
    shard: int
    name: str
    offset: int
    size: int


class WebDatasetSource:
    """Random access over WebDataset tar shards (img2dataset's `webdataset` output).

    `source[i]` returns {"id": key, "image": bytes, "caption": str, "json": str, ...}; fields
    are absent when the member is. Keys keep their order of first appearance, shard by shard.
    A text member (.txt, .json) that is not UTF-8 raises `BadRecordError("undecodable_text")`
    naming the shard and member.
    """

    def __init__(self, paths: str | Sequence[str]):
        self.paths = _expand_paths(paths)
        self._keys: list[str] = []
        self._members: list[dict[str, _Member]] = []
        for shard, path in enumerate(self.paths):
            key_to_row: dict[str, int] = {}
            with tarfile.open(path, "r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    basename = os.path.basename(info.name)
                    if basename.startswith(".") or "." not in basename:
                        continue
                    key, extension = basename.split(".", 1)
                    key = os.path.join(os.path.dirname(info.name), key)
                    if key not in key_to_row:
                        key_to_row[key] = len(self._keys)
                        self._keys.append(key)
                        self._members.append({})
                    self._members[key_to_row[key]][extension] = _Member(shard, info.name, info.offset_data, info.size)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example: dict[str, Any] = {"id": self._keys[index]}
        for extension, member in self._members[index].items():
            with open(self.paths[member.shard], "rb") as f:
                f.seek(member.offset)
                data = f.read(member.size)
            field = _field_name(extension)
            if field is None:
                example["image"] = data
            elif extension.endswith("txt") or extension.endswith("json"):
                try:
                    example[field] = data.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise BadRecordError("undecodable_text", (
                        f"{self.paths[member.shard]}: member {member.name} is not UTF-8 text "
                        f"(byte 0x{data[error.start]:02x} at offset {error.start})")) from None
            else:
                example[field] = data
        return example

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.paths)} shards, {len(self)} examples)"


@dataclasses.dataclass(frozen=True)
class _UndecodableRow:
    """A manifest row whose text is not UTF-8; reading it raises `BadRecordError`."""

    detail: str


def _utf8_error(data: bytes) -> UnicodeDecodeError | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error
    return None


def _undecodable(where: str, data: bytes, error: UnicodeDecodeError) -> _UndecodableRow:
    return _UndecodableRow(f"{where}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})")


def _read_jsonl(path: str) -> list[dict[str, Any] | _UndecodableRow]:
    rows: list[dict[str, Any] | _UndecodableRow] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            error = _utf8_error(raw)
            if error is not None:
                rows.append(_undecodable(f"{path}:{number}", raw, error))
                continue
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error}); fix or remove the line.") from None
    return rows


def _read_csv(path: str) -> list[dict[str, Any] | _UndecodableRow]:
    rows: list[dict[str, Any] | _UndecodableRow] = []
    # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so one bad row does not stop
    # the reader; such a row is found by encoding its values back.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        if any(_escaped_utf8_error(name) for name in reader.fieldnames or ()):
            raise ValueError(f"{path}: the header row is not UTF-8 text; re-encode the file as UTF-8.")
        for row in reader:
            for value in row.values():
                error = _escaped_utf8_error(value)
                if error is not None:
                    rows.append(_undecodable(f"{path}:{reader.line_num}", error.object, error))
                    break
            else:
                rows.append(row)
    return rows


def _escaped_utf8_error(value: Any) -> UnicodeDecodeError | None:
    """The decoding error of a str read with errors="surrogateescape", None when it was UTF-8."""
    if not isinstance(value, str) or value.isascii():
        return None
    return _utf8_error(value.encode("utf-8", "surrogateescape"))


def _read_table(path: str) -> list[dict[str, Any] | _UndecodableRow]:
    if path.endswith(".jsonl") or path.endswith(".json"):
        return _read_jsonl(path)
    if path.endswith(".csv") or path.endswith(".tsv"):
        return _read_csv(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only parquet manifests need pyarrow

        return pq.read_table(path).to_pylist()
    raise ValueError(f"Manifest {path!r} has an unknown extension; expected .jsonl, .json, .csv, .tsv or .parquet.")


class ManifestSource:
    """Rows of a JSONL/CSV/parquet manifest, each naming an image file.

    `source[i]` returns the row with its `image_path_key` column replaced by "image" (the file's
    bytes, or None when the file is missing) and "id" set (the `id_key` column, else the path).
    A `label` column in CSV manifests is parsed as int. A row whose text is not UTF-8 raises
    `BadRecordError("undecodable_text")` naming the file and line; it is logged when the manifest
    is read, and the other rows read as usual.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        *,
        image_path_key: str = "image_path",
        id_key: str | None = "id",
        image_root: str | None = None,
    ):
        self.paths = _expand_paths(paths)
        self.image_path_key = image_path_key
        self.id_key = id_key
        self._rows: list[dict[str, Any] | _UndecodableRow] = []
        self._roots: list[str] = []
        for path in self.paths:
            rows = _read_table(path)
            root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
            undecodable = [row.detail for row in rows if isinstance(row, _UndecodableRow)]
            for row in rows:
                if not isinstance(row, _UndecodableRow) and image_path_key not in row:
                    raise KeyError(
                        f"Manifest {path!r} has no column {image_path_key!r} (columns: {sorted(row)}); "
                        "set image_path_key to the column holding image paths."
                    )
            if undecodable:
                _LOG.warning("Manifest %s: %d row(s) are not UTF-8 text and will be skipped and counted as "
                             "undecodable_text: %s", path, len(undecodable), "; ".join(undecodable[:10])
                             + ("; ..." if len(undecodable) > 10 else ""))
            self._rows.extend(rows)
            self._roots.extend([root] * len(rows))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self._rows[index], _UndecodableRow):
            raise BadRecordError("undecodable_text", self._rows[index].detail)
        row = dict(self._rows[index])
        image_path = str(row.pop(self.image_path_key))
        full_path = os.path.join(self._roots[index], image_path)
        try:
            with open(full_path, "rb") as f:
                row["image"] = f.read()
        except FileNotFoundError:
            row["image"] = None
        if "label" in row and isinstance(row["label"], str):
            row["label"] = int(row["label"])
        row["id"] = str(row.get(self.id_key) if self.id_key and row.get(self.id_key) is not None else image_path)
        return row

    def __repr__(self) -> str:
        return f"ManifestSource({self.paths}, {len(self)} rows)"


class ImageFolderSource:
    """Class-per-subfolder images: `root/<class name>/<image file>`.

    Labels follow `class_dirs` when given (the dataset's official order), else sorted folder
    names. `source[i]` returns {"id": "<class>/<file>", "image": bytes, "label": int}.
    """

    def __init__(self, root: str, class_dirs: Sequence[str] | None = None):
        self.root = root
        if class_dirs is None:
            class_dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_dirs = list(class_dirs)
        self._files: list[tuple[str, int]] = []
        for label, class_dir in enumerate(self.class_dirs):
            directory = os.path.join(root, class_dir)
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"Class folder {directory!r} does not exist; check root and class_dirs.")
            for name in sorted(os.listdir(directory)):
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    self._files.append((os.path.join(class_dir, name), label))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        relative_path, label = self._files[index]
        with open(os.path.join(self.root, relative_path), "rb") as f:
            return {"id": relative_path, "image": f.read(), "label": label}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {len(self.class_dirs)} classes, {len(self)} images)"


class ArrayRecordCorpusSource:
    """Random access over ArrayRecord files written by `convert_to_array_record`."""

    def __init__(self, paths: str | Sequence[str]):
        import grain  # grain pulls in its ArrayRecord reader only when needed

        self.paths = _expand_paths(paths)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._records[index])

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def __repr__(self) -> str:
        return f"ArrayRecordCorpusSource({len(self.paths)} files, {len(self)} records)"


def lift_json_fields(example: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Copies `keys` of the example's "json" text into top-level fields (non-strings as JSON text)."""
    if not keys or not isinstance(example.get("json"), str):
        return example
    try:
        metadata = json.loads(example["json"])
    except json.JSONDecodeError:
        return example
    for key in keys:
        if key in metadata and key not in example:
            value = metadata[key]
            is_text = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            example[key] = value if is_text else json.dumps(value)
    return example


def _read_for_conversion(source: Any, index: int, json_fields: Sequence[str]) -> dict[str, Any]:
    """The example to write for `source[index]`; a record the source cannot read becomes its marker."""
    try:
        return lift_json_fields(dict(source[index]), json_fields)
    except BadRecordError as error:
        return {"_bad_input": {"kind": error.kind, "detail": error.detail}}


def _write_shard(
    source: Any, path: str, start: int, stop: int, json_fields: Sequence[str], group_size: int
) -> int:
    from array_record.python import array_record_module

    # Written under a temporary name and renamed when whole, so a reader's glob never finds a prefix.
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    writer = array_record_module.ArrayRecordWriter(temporary, f"group_size:{group_size}")
    try:
        try:
            for index in range(start, stop):
                writer.write(encode_record(_read_for_conversion(source, index, json_fields)))
        finally:
            writer.close()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return stop - start


def convert_to_array_record(
    source: Any,
    output_dir: str,
    *,
    name: str = "corpus",
    num_shards: int = 1,
    json_fields: Sequence[str] = (),
    group_size: int = 1,
    num_threads: int = 1,
) -> list[str]:
    """Writes every example of a random-access source to ArrayRecord shards, in source order.

    Shard k holds the contiguous index range [k*N/num_shards, (k+1)*N/num_shards), so the output
    is the same for any `num_threads`. `json_fields` lifts keys of a "json" field into top-level
    fields (e.g. ("recaption", "regions")). `group_size=1` keeps single-record random reads cheap.
    A `<name>.meta.json` file records the count, the format and the field names seen; it is written
    last, and each shard is renamed into place only when whole.

    Returns:
      The written shard paths, `<output_dir>/<name>-0000k-of-0000n.array_record`.
    """
    os.makedirs(output_dir, exist_ok=True)
    total = len(source)
    bounds = [round(k * total / num_shards) for k in range(num_shards + 1)]
    paths = [
        os.path.join(output_dir, f"{name}-{k:05d}-of-{num_shards:05d}.array_record") for k in range(num_shards)
    ]
    jobs = [(source, paths[k], bounds[k], bounds[k + 1], tuple(json_fields), group_size) for k in range(num_shards)]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        written = sum(pool.map(lambda job: _write_shard(*job), jobs))
    fields = sorted({key for index in range(min(total, 64))
                     for key in _read_for_conversion(source, index, ()) if key != "_bad_input"} | set(json_fields))
    meta_path = os.path.join(output_dir, f"{name}.meta.json")
    meta = {"format": RECORD_FORMAT, "num_examples": written, "shards": [os.path.basename(p) for p in paths],
            "fields": fields}
    write_atomic(meta_path, lambda file: json.dump(meta, file, indent=1), binary=False)
    return paths
