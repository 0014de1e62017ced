"""The on-disk memory format and its reader: `load_memory(dir)` -> `Memory`.

A memory directory (written by `vlm_jax.memory.build.build_memory`):

    memory.json                    manifest: build config, model identity, embedding dim, storage
                                   dtype, shard size, source rows, number of shards, stored fields
    shard_00000.<field>.npy        one array per stored field, the shard's kept rows in source order
    shard_00000.json               the shard's record: source row range, kept rows, bad-input counts;
                                   written last, so its presence means the shard is finished
    complete.json                  written last, once every shard is finished: kept rows, skipped
                                   rows (in total and per bad-input kind), source rows read

Shard i covers source rows [i * shard_size, min((i + 1) * shard_size, source_rows)); rows skipped as
bad input are absent from its arrays, so `indices` maps memory rows back to source rows. Every file
is written under a temporary name, flushed and renamed into place, so a killed writer leaves either
a whole file or a temporary one, and a shard without its record is unfinished whatever else exists.

Fields: image_embeddings [N, D] and text_embeddings [N, D] (unit-norm rows in the manifest's dtype:
float32, float16 or bfloat16), ids str [N], indices int64 [N] (source row), labels int32 [N] and
texts str [N] when the build kept them. A field the build did not store reads as None.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from vlm_jax.files import write_atomic  # noqa: F401  (store.write_atomic: the memory's writer)

FORMAT_VERSION = 1
MANIFEST_FILE = "memory.json"
COMPLETE_FILE = "complete.json"
FIELDS = ("image_embeddings", "text_embeddings", "ids", "indices", "labels", "texts")
EMBEDDING_FIELDS = ("image_embeddings", "text_embeddings")
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")


class IncompleteMemoryError(RuntimeError):
    """A memory directory whose build has not finished every shard."""


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def shard_ranges(source_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) source rows of each shard: fixed-size contiguous ranges, the last one shorter."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, found {shard_size}.")
    return [(start, min(start + shard_size, source_rows)) for start in range(0, source_rows, shard_size)]


def storage_dtype(name: str) -> np.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"Unknown memory dtype {name!r}; expected one of {sorted(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[name]


_UNIT_ROWS_CHUNK = 1 << 16  # rows per step: temporaries stay at chunk size, never memory size


def unit_rows(rows: np.ndarray, dtype: Any = np.float32, *, chunk_rows: int = _UNIT_ROWS_CHUNK) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): float [N, D] -> `dtype` [N, D].

    Returns `rows` itself, uncopied (a memory map stays one), when it already has `dtype` and unit
    rows, as the memory builder writes them; "unit" allows the rounding of that dtype (a bfloat16
    unit row's norm is within 4e-3 of 1). Works `chunk_rows` rows at a time in float32, so no
    temporary is larger than a chunk.
    """
    rows = np.asanyarray(rows)
    dtype = np.dtype(dtype)
    if rows.ndim != 2:
        raise ValueError(f"expected rows of shape [N, D], got shape {rows.shape}.")
    starts = range(0, rows.shape[0], chunk_rows)

    def chunk(start: int) -> np.ndarray:
        return rows[start : start + chunk_rows].astype(np.float32)

    if rows.dtype == dtype:
        tolerance = max(1e-4, 2 * float(ml_dtypes.finfo(dtype).eps))
        if all(np.all(np.abs(np.linalg.norm(chunk(start), axis=-1) - 1.0) <= tolerance) for start in starts):
            return rows
    out = np.empty(rows.shape, dtype)
    for start in starts:
        values = chunk(start)
        out[start : start + chunk_rows] = values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), 1e-12)
    return out


def save_array(path: str, array: np.ndarray) -> None:
    write_atomic(path, lambda file: np.save(file, array, allow_pickle=False))


def save_json(path: str, value: Any) -> None:
    write_atomic(path, lambda file: json.dump(value, file, indent=2, sort_keys=True), binary=False)


def load_json(path: str) -> Any:
    with open(path) as file:
        return json.load(file)


def array_path(directory: str, shard: int, field: str) -> str:
    return os.path.join(directory, f"{shard_name(shard)}.{field}.npy")


def record_path(directory: str, shard: int) -> str:
    return os.path.join(directory, f"{shard_name(shard)}.json")


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No memory manifest at {path}; build the memory there with vlm_jax.memory.build.build_memory first."
        )
    manifest = load_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has memory format version {manifest.get('format_version')}, this code reads version "
            f"{FORMAT_VERSION}; rebuild the memory."
        )
    return manifest


def finished_shards(directory: str, num_shards: int) -> set[int]:
    """The shards whose record exists (their arrays were renamed into place before it)."""
    names = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    return {shard for shard in range(num_shards) if f"{shard_name(shard)}.json" in names}


def discard_partial_shard(directory: str, shard: int) -> None:
    """Removes whatever an interrupted write of `shard` left: arrays without a record, temporary files."""
    prefix = shard_name(shard) + "."
    for name in os.listdir(directory):
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))


def remove_temporary_files(directory: str) -> None:
    for name in os.listdir(directory):
        if _TEMPORARY.search(name):
            os.remove(os.path.join(directory, name))


def describe_missing(manifest: dict[str, Any], missing: Sequence[int]) -> str:
    shown = ", ".join(str(shard) for shard in missing[:20]) + (", ..." if len(missing) > 20 else "")
    return f"{len(missing)} of {manifest['num_shards']} shards are missing ({shown})"


def missing_shards(directory: str, manifest: dict[str, Any] | None = None) -> list[int]:
    manifest = manifest if manifest is not None else read_manifest(directory)
    finished = finished_shards(directory, manifest["num_shards"])
    return [shard for shard in range(manifest["num_shards"]) if shard not in finished]


class Memory:
    """A finished memory: per-field arrays over all shards, in source order.

    `image_embeddings` / `text_embeddings` [N, D], `ids` str [N], `indices` int64 [N], `labels` int32 [N]
    and `texts` str [N] are concatenated from the shards on first access (a memory of one shard hands
    out its memory-mapped file as is); `read(field, start, stop)` reads a row range touching only the
    shards it overlaps. Fields the build did not store are None. `metadata` holds the manifest and
    the completion record (total rows, bad-input totals).
    """

    def __init__(self, directory: str, manifest: dict[str, Any], completion: dict[str, Any],
                 records: list[dict[str, Any]], mmap: bool):
        self.directory = directory
        self.manifest = manifest
        self.completion = completion
        self.records = records
        self._mmap_mode = "r" if mmap else None
        self.offsets = np.cumsum([0] + [record["rows"] for record in records])

    @property
    def metadata(self) -> dict[str, Any]:
        return {**self.manifest, "completion": self.completion}

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.manifest["dtype"])

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.manifest["fields"])

    def _shard_array(self, shard: int, field: str) -> np.ndarray:
        array = np.load(array_path(self.directory, shard, field), mmap_mode=self._mmap_mode, allow_pickle=False)
        if field in EMBEDDING_FIELDS and array.dtype != self.dtype:
            # numpy writes bfloat16 as raw 2-byte records; the manifest says how to read them.
            array = array.view(self.dtype)
        if len(array) != self.records[shard]["rows"]:
            raise ValueError(
                f"{array_path(self.directory, shard, field)} holds {len(array)} rows, its shard record says "
                f"{self.records[shard]['rows']}; the memory is damaged, rebuild shard {shard} by deleting "
                f"{record_path(self.directory, shard)} and resuming the build."
            )
        return array

    def _field(self, field: str) -> np.ndarray | None:
        if field not in self.fields:
            return None
        parts = [self._shard_array(shard, field) for shard in range(len(self.records))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read(self, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of `field`, reading only the shards that hold them."""
        if field not in self.fields:
            raise KeyError(f"The memory in {self.directory} stores {list(self.fields)}, not {field!r}.")
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        for shard in range(max(first, 0), len(self.records)):
            begin, end = int(self.offsets[shard]), int(self.offsets[shard + 1])
            if begin >= stop:
                break
            if end > start:
                parts.append(self._shard_array(shard, field)[max(start - begin, 0) : min(stop, end) - begin])
        if not parts:
            return self._shard_array(0, field)[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rows(self, field: str) -> "Rows":
        """`field` [N, ...] over every shard, read on demand (`Rows`): no shard is concatenated or
        kept mapped, so placing a large memory on device holds it once."""
        if field not in self.fields:
            raise KeyError(f"The memory in {self.directory} stores {list(self.fields)}, not {field!r}.")
        return Rows(self, field)

    image_embeddings = functools.cached_property(lambda self: self._field("image_embeddings"))
    text_embeddings = functools.cached_property(lambda self: self._field("text_embeddings"))
    ids = functools.cached_property(lambda self: self._field("ids"))
    indices = functools.cached_property(lambda self: self._field("indices"))
    labels = functools.cached_property(lambda self: self._field("labels"))
    texts = functools.cached_property(lambda self: self._field("texts"))

    def __repr__(self) -> str:
        return (f"Memory({self.directory!r}, rows={self.num_rows}, embed_dim={self.embed_dim}, "
                f"dtype={self.manifest['dtype']}, fields={list(self.fields)})")


def load_memory(directory: str | os.PathLike, mmap: bool = True) -> Memory:
    """Opens a finished memory; `mmap` memory-maps the shard files instead of reading them.

    Raises:
      FileNotFoundError: no memory manifest in `directory`.
      IncompleteMemoryError: the build has not finished; the message lists the missing shards.
    """
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    missing = missing_shards(directory, manifest)
    if missing:
        raise IncompleteMemoryError(
            f"The memory in {directory} is incomplete: {describe_missing(manifest, missing)}; resume the build "
            "(build_memory on the same out_dir, by every process that owns one of them) before loading it."
        )
    complete = os.path.join(directory, COMPLETE_FILE)
    if not os.path.exists(complete):
        raise IncompleteMemoryError(
            f"Every shard of the memory in {directory} is written but {COMPLETE_FILE} is not; run "
            f"vlm_jax.memory.build.finalize({directory!r}) to check the shards and mark the memory complete."
        )
    records = [load_json(record_path(directory, shard)) for shard in range(manifest["num_shards"])]
    return Memory(directory, manifest, load_json(complete), records, mmap)


class Rows:
    """A memory field's rows over all shards as an array-like [N, ...]: `rows[start:stop]` reads that
    range from the shard files with plain reads (not through a memory map, whose pages would stay
    resident in the process), `np.asarray(rows)` reads everything."""

    def __init__(self, memory: Memory, field: str):
        self.memory, self.field = memory, field
        first = memory._shard_array(0, field)
        self.dtype = first.dtype
        self.shape = (memory.num_rows, *first.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _read_shard(self, shard: int, start: int, stop: int) -> np.ndarray:
        mapped = np.load(array_path(self.memory.directory, shard, self.field), mmap_mode="r", allow_pickle=False)
        row_items = int(np.prod(mapped.shape[1:], dtype=np.int64))
        offset = mapped.offset + start * row_items * mapped.dtype.itemsize
        values = np.fromfile(mapped.filename, dtype=mapped.dtype, count=(stop - start) * row_items, offset=offset)
        return values.view(self.dtype).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"Rows supports row slices rows[start:stop], got {index!r}.")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("Rows supports contiguous slices only.")
        offsets, parts = self.memory.offsets, []
        for shard in range(len(self.memory.records)):
            begin, end = int(offsets[shard]), int(offsets[shard + 1])
            if end > start and begin < stop:
                parts.append(self._read_shard(shard, max(start - begin, 0), min(stop, end) - begin))
        if not parts:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        values = self[0 : len(self)]
        return values if dtype is None else values.astype(dtype)
