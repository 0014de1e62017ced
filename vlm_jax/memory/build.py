"""Embed an image-text corpus with a frozen CLIP into memory shards (resumable, multi-host).

    config = memory_config()
    config.data.update(tfds_name="shapes_world/test", split="memory", data_dir=data_dir,
                       text_keys=("name_caption",), label_key="label")
    memory = build_memory(config, model_dir, None, None, out_dir)   # None: preprocessing/tokenizer of the dir
    memory.image_embeddings, memory.text_embeddings                 # [N, D] unit rows

The source is read in order, without shuffling or augmentation, in fixed contiguous shards of
`shard_size` source rows (layout in `vlm_jax.memory.store`). Shard i belongs to process
i % process_count; each process embeds its shards on its own local devices (batches split over them),
so processes never wait for each other. A finished shard is never embedded again: a build that
stops (preemption, SIGKILL) resumes at its first unfinished shard, whatever the process count of the
resumed run. The process that finds every shard finished writes the completion marker (`finalize`
does the same by hand) and returns the `Memory`; the others return None.

Bad input (unreadable records, corrupt images, missing fields, empty or undecodable captions)
follows `data.on_bad_input`: skipped and counted per shard (and in total in complete.json), or an
error naming the shard. Every source row is accounted for: a shard's kept rows plus its skips by
reason equal its source rows, and complete.json's `num_rows + skipped == source_rows`. Skipped
rows leave no hole: `indices` gives each memory row's source row.

Writes are atomic (`vlm_jax.memory.store`): every file goes to a temporary name and is renamed
into place, a shard's record is written after its arrays, and complete.json after every shard, so
an interrupted build leaves nothing `load_memory` takes as complete, and a rerun resumes it.

A resumed build must describe the same memory: the manifest written by the first run pins the data
section, shard size, storage dtype, kept fields and the model (its config and a SHA-256 of its
parameters); anything else is an error. Batch size and reading settings may change between runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlm_jax.data import pipeline
from vlm_jax.memory import store
from vlm_jax.memory.store import IncompleteMemoryError, Memory, load_memory
from vlm_jax.models.layers import l2_normalize

__all__ = ["IncompleteMemoryError", "Memory", "build_memory", "finalize", "load_memory", "memory_config",
           "model_fingerprint"]

# Settings that change speed, never content; a resumed build may change them.
_READING_FIELDS = ("worker_count", "worker_buffer_size", "read_threads", "read_buffer_size")


def memory_config() -> ml_collections.ConfigDict:
    """The `config.memory` section read by `build_memory`, with defaults.

    data: the corpus, as a `pipeline.default_config()` section (source, dataset / tfds_name, split,
      data_dir, paths, image_key, text_keys, label_key, id_key, on_bad_input, reading settings).
      `text_keys` names the caption field (one is drawn per row when several are given, seeded by
      the row's position in its shard, so the choice depends on shard_size); () builds an
      image-only memory and image_key=None a text-only one. `label_key` stores labels (RAR's
      few-shot memory). `id_key` names the id field; rows without one get their source index as id.
      shuffle, num_epochs and augment are ignored: memories are built in order, unaugmented.
    shard_size: source rows per shard; fixed for the life of a memory directory.
    batch_size: rows per encoder call on each process; a multiple of the local device count.
    dtype: storage dtype of the embeddings, "float32" | "float16" | "bfloat16" (normalized in float32).
    keep_texts: store each row's caption as `texts`.
    model_dtype: compute dtype when the model is given as a pretrained directory.
    progress: show a tqdm bar (rows/s and ETA) per process, one line per process index.
    """
    data = pipeline.default_config()
    data.shuffle = False
    return ml_collections.ConfigDict(
        {
            "data": data,
            "shard_size": 16384,
            "batch_size": 256,
            "dtype": "float32",
            "keep_texts": False,
            "model_dtype": "float32",
            "progress": True,
        }
    )


def _resolve_config(config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The memory section with every field present; unknown fields are an error."""
    resolved = memory_config()
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = dict(values.pop("data", {}) or {})
    unknown = sorted(set(values) - set(resolved)) + sorted(f"data.{k}" for k in set(data) - set(resolved.data))
    if unknown:
        raise ValueError(f"Unknown memory config fields {unknown}; memory_config() documents the valid ones.")
    for key, value in data.items():
        resolved.data[key] = tuple(value) if isinstance(value, list) else value
    for key, value in values.items():
        resolved[key] = value
    store.storage_dtype(resolved.dtype)
    return resolved


def model_fingerprint(model: nnx.Module) -> str:
    """SHA-256 over the model's parameter paths, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for path, variable in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda item: str(item[0])):
        value = np.asarray(jax.device_get(variable.get_value()))
        digest.update(repr((tuple(map(str, path)), value.dtype.str, value.shape)).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _model_identity(model: nnx.Module, model_dir: str | None) -> dict[str, Any]:
    model_config = getattr(model, "config", None)
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    return {
        "fingerprint": model_fingerprint(model),
        "config": json.loads(json.dumps(model_config, default=str)),
        "directory": model_dir,
    }


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest entries that decide a memory's content (what a resumed build must keep)."""
    config = dict(manifest["config"])
    data = {key: value for key, value in config.pop("data").items() if key not in _READING_FIELDS}
    for key in ("batch_size", "progress"):
        config.pop(key, None)
    model = {key: value for key, value in manifest["model"].items() if key != "directory"}
    return {**{key: manifest[key] for key in manifest if key not in ("config", "model")},
            "config": {**config, "data": data}, "model": model}


def _write_or_check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    """Writes the manifest once; a later run (or another process) must agree with it."""
    path = os.path.join(out_dir, store.MANIFEST_FILE)
    # Round-trip through JSON so tuples and lists compare equal to what is on disk.
    manifest = json.loads(json.dumps(manifest))
    if not os.path.exists(path):
        store.save_json(path, manifest)
    expected, existing = _flatten(_identity(manifest)), _flatten(_identity(store.read_manifest(out_dir)))
    differing = sorted(key for key in set(expected) | set(existing) if expected.get(key) != existing.get(key))
    if differing:
        raise ValueError(
            f"{out_dir} holds a memory built with different {', '.join(differing)} than this build; resume "
            "with the same data, shard_size, dtype, kept fields and model, or use a new out_dir."
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and key != "model":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _RowRange:
    """Source rows [start, stop) of `source`, as a random-access source of their own."""

    def __init__(self, source: Any, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, row: int) -> Any:
        return self.source[self.start + row]

    def __repr__(self) -> str:
        return f"_RowRange({self.source!r}, {self.start}, {self.stop})"


def _normalized(embeddings: jax.Array) -> jax.Array:
    # Padding rows may embed to zero; they are dropped, but must not produce NaNs on the way.
    return l2_normalize(embeddings, eps=1e-12)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    embeddings = {}
    if "image" in inputs:
        embeddings["image_embeddings"] = _normalized(model.encode_image(inputs["image"]))
    if "text_ids" in inputs:
        embeddings["text_embeddings"] = _normalized(model.encode_text(inputs["text_ids"]))
    return embeddings


class _LocalEncoder:
    """Image and text towers in one jitted step, batches split over this process's devices.

    The evaluators' `BatchedEncoder` runs one tower on one device; a memory build runs both towers
    over a corpus on every local chip, and only local ones, since processes work independently.
    The model is split once and its state replicated on the local devices; the last partial batch
    is padded to `batch_size` (padding rows dropped), so one compilation serves the whole build.
    """

    def __init__(self, model: nnx.Module, batch_size: int):
        devices = jax.local_devices()
        if batch_size % len(devices):
            raise ValueError(
                f"memory.batch_size {batch_size} is not divisible by the {len(devices)} local devices; "
                f"choose a multiple of {len(devices)}."
            )
        from vlm_jax.train.sharding import make_mesh  # noqa: PLC0415 - only builds need a mesh

        mesh = make_mesh((("data", -1),), devices=devices)
        self.batch_size = batch_size
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(mesh, P()))
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.calls = 0

    def embed_dim(self, inputs: dict[str, jax.ShapeDtypeStruct]) -> int:
        shapes = jax.eval_shape(functools.partial(_embed, self.graphdef), self.state, inputs)
        return int(next(iter(shapes.values())).shape[-1])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """inputs: "image" float32 [B, S, S, 3] and/or "text_ids" int32 [B, L], B <= batch_size.

        Returns float32 [B, D] unit rows under "image_embeddings" / "text_embeddings".
        """
        rows = len(next(iter(inputs.values())))
        padded = {}
        for name, values in inputs.items():
            padding = np.zeros((self.batch_size - rows, *values.shape[1:]), values.dtype)
            padded[name] = jax.device_put(np.concatenate([values, padding]), self.batch_sharding)
        self.calls += 1
        return {name: np.asarray(values)[:rows] for name, values in _embed(self.graphdef, self.state, padded).items()}


def _load_model(model_or_dir: Any, preprocess: Any, tokenizer: Any, model_dtype: str):
    if isinstance(model_or_dir, (str, os.PathLike)):
        from vlm_jax.weights import load_pretrained  # noqa: PLC0415

        pretrained = load_pretrained(model_or_dir, dtype=model_dtype)
        return (pretrained.model, preprocess or pretrained.preprocess, tokenizer or pretrained.tokenizer,
                os.fspath(model_or_dir))
    return model_or_dir, preprocess, tokenizer, None


def _make_decoder(config: ml_collections.ConfigDict, preprocess: Any, tokenizer: Any) -> pipeline.ExampleDecoder:
    decoder = pipeline.make_decoder(config.data, preprocess, tokenizer)
    if decoder.texts_per_example:
        raise ValueError("A memory row pairs one image with one text; unset data.texts_per_example.")
    if decoder.image_key is None and not decoder.text_keys:
        raise ValueError("The memory needs data.image_key, data.text_keys or both; both are unset.")
    if decoder.image_key is not None and preprocess is None:
        raise ValueError("An image memory needs the model's preprocessing; pass preprocess or a pretrained dir.")
    if decoder.text_keys and tokenizer is None:
        raise ValueError("data.text_keys is set but there is no tokenizer; pass one or a pretrained dir with one.")
    return dataclasses.replace(decoder, augment="none", keep_text=bool(config.keep_texts))


def _stored_fields(decoder: pipeline.ExampleDecoder) -> list[str]:
    fields = ["ids", "indices"]
    if decoder.image_key is not None:
        fields.append("image_embeddings")
    if decoder.text_keys:
        fields.append("text_embeddings")
    if decoder.label_key is not None:
        fields.append("labels")
    if decoder.keep_text:
        fields.append("texts")
    return [field for field in store.FIELDS if field in fields]


def _embed_shard(
    shard: int, start: int, stop: int, source: Any, decoder: pipeline.ExampleDecoder,
    encoder: _LocalEncoder, config: ml_collections.ConfigDict, fields: list[str], embed_dim: int,
    advance: Callable[[int], None],
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Embeds source rows [start, stop): ({field: rows in source order}, {bad-input kind: count})."""
    dataset = pipeline.eval_dataset(
        _RowRange(source, start, stop), decoder, global_batch_size=config.batch_size, process_index=0,
        process_count=1, **{name: int(config.data[name]) for name in _READING_FIELDS},
    )
    counter = pipeline.BadInputCounter()
    parts: dict[str, list[np.ndarray]] = {field: [] for field in fields}
    try:
        for batch in dataset:
            skipped = sum(counter.update(batch).values())
            if not batch:  # the skip counts of a shard without a usable row
                advance(skipped)
                continue
            indices = np.asarray(batch["index"], np.int64) + start
            parts["indices"].append(indices)
            ids = batch.get("id")
            parts["ids"].append(np.asarray(ids if ids is not None else indices.astype(str), dtype=str))
            if "labels" in parts:
                parts["labels"].append(np.asarray(batch["label"], np.int32))
            if "texts" in parts:
                parts["texts"].append(np.asarray(batch["text"], dtype=str))
            inputs = {name: batch[name] for name in ("image", "text_ids") if name in batch}
            for name, values in encoder(inputs).items():
                parts[name].append(values)
            advance(len(indices) + skipped)
    except pipeline.BadInputError as error:
        raise pipeline.BadInputError(
            f"In memory shard {shard} (source rows {start}-{stop - 1}; indices below count from {start}): {error}"
        ) from error
    empty = {"ids": np.zeros(0, str), "indices": np.zeros(0, np.int64), "labels": np.zeros(0, np.int32),
             "texts": np.zeros(0, str), "image_embeddings": np.zeros((0, embed_dim), np.float32),
             "text_embeddings": np.zeros((0, embed_dim), np.float32)}
    arrays = {field: np.concatenate(values) if values else empty[field] for field, values in parts.items()}
    bad_input = {kind: int(count) for kind, count in counter.totals.items()}
    if len(arrays["indices"]) + sum(bad_input.values()) != stop - start:
        raise RuntimeError(
            f"Memory shard {shard} kept {len(arrays['indices'])} rows and skipped {sum(bad_input.values())} "
            f"({bad_input}) of its {stop - start} source rows; the pipeline lost count of some rows."
        )
    return arrays, bad_input


def _write_shard(out_dir: str, shard: int, start: int, stop: int, arrays: dict[str, np.ndarray],
                 bad_input: dict[str, int], dtype: np.dtype, process_index: int, seconds: float) -> None:
    for field, values in arrays.items():
        if field in store.EMBEDDING_FIELDS:
            values = values.astype(dtype)
        store.save_array(store.array_path(out_dir, shard, field), values)
    record = {"shard": shard, "start": start, "stop": stop, "rows": len(arrays["indices"]),
              "bad_input": bad_input, "process_index": process_index, "seconds": round(seconds, 3)}
    store.save_json(store.record_path(out_dir, shard), record)


def finalize(out_dir: str | os.PathLike) -> Memory:
    """Checks that every shard is finished, writes complete.json with the totals and opens the memory.

    complete.json: {"num_rows": kept rows, "skipped": skipped rows, "bad_input": {kind: skipped},
    "source_rows": rows read, "seconds": embedding time}; num_rows + skipped == source_rows.

    Raises:
      IncompleteMemoryError: listing the shards that are not finished yet.
    """
    out_dir = os.fspath(out_dir)
    manifest = store.read_manifest(out_dir)
    missing = store.missing_shards(out_dir, manifest)
    if missing:
        raise IncompleteMemoryError(
            f"Cannot finalize the memory in {out_dir}: {store.describe_missing(manifest, missing)}; the "
            "processes owning them (shard i belongs to process i % process_count) must finish first."
        )
    records = [store.load_json(store.record_path(out_dir, shard)) for shard in range(manifest["num_shards"])]
    bad_input: dict[str, int] = {}
    for record in records:
        for kind, count in record["bad_input"].items():
            bad_input[kind] = bad_input.get(kind, 0) + count
    unaccounted = [record["shard"] for record in records
                   if record["rows"] + sum(record["bad_input"].values()) != record["stop"] - record["start"]]
    if unaccounted:
        logging.warning(
            "Memory %s: the records of shards %s do not account for every source row (kept + skipped != rows); "
            "delete those shard_*.json files and resume the build to count them again.", out_dir, unaccounted)
    completion = {"num_rows": sum(record["rows"] for record in records), "bad_input": bad_input,
                  "skipped": sum(bad_input.values()), "source_rows": manifest["source_rows"],
                  "seconds": round(sum(record["seconds"] for record in records), 3)}
    # Last: its presence tells readers that every shard above is whole.
    store.save_json(os.path.join(out_dir, store.COMPLETE_FILE), completion)
    store.remove_temporary_files(out_dir)
    return load_memory(out_dir)


def build_memory(
    config: Mapping[str, Any] | ml_collections.ConfigDict,
    model_or_dir: nnx.Module | str | os.PathLike,
    preprocess: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
    on_shard_written: Callable[[int], None] | None = None,
) -> Memory | None:
    """Embeds this process's unfinished shards of the corpus into `out_dir` (see the module docstring).

    Args:
      config: a `memory_config()` section (fields it leaves out take their defaults).
      model_or_dir: a model with encode_image/encode_text, or a pretrained directory
        (`vlm_jax.weights.load_pretrained`), whose preprocessing and tokenizer fill in for None.
      preprocess: the model's `PreprocessSpec` (None: the directory's).
      tokenizer: the model's `Tokenizer` (None: the directory's).
      out_dir: the memory directory; created if missing, resumed if it holds a partial build.
      process_index, process_count: this process's place (default: jax.process_index()/count()).
      source: a random-access source to read instead of the one `config.data` describes.
      on_shard_written: called with each shard index once that shard is on disk.

    Returns:
      The finished `Memory` when every shard is on disk after this process's work, else None.
    """
    config = _resolve_config(config)
    out_dir = os.fspath(out_dir)
    process_index, process_count = pipeline.resolve_process(process_index, process_count)
    model, preprocess, tokenizer, model_dir = _load_model(model_or_dir, preprocess, tokenizer, config.model_dtype)
    decoder = _make_decoder(config, preprocess, tokenizer)
    source = source if source is not None else pipeline.make_source(config.data)
    source_rows = len(source)
    if source_rows == 0:
        raise ValueError("The memory source is empty; check data.split / data.paths.")
    ranges = store.shard_ranges(source_rows, config.shard_size)
    fields = _stored_fields(decoder)
    encoder = _LocalEncoder(model, config.batch_size)
    probe = {}
    if "image_embeddings" in fields:
        probe["image"] = jax.ShapeDtypeStruct((config.batch_size, preprocess.image_size, preprocess.image_size, 3),
                                              jnp.float32)
    if "text_embeddings" in fields:
        probe["text_ids"] = jax.ShapeDtypeStruct((config.batch_size, tokenizer.context_length), jnp.int32)
    embed_dim = encoder.embed_dim(probe)

    os.makedirs(out_dir, exist_ok=True)
    _write_or_check_manifest(out_dir, {
        "format_version": store.FORMAT_VERSION,
        "config": config.to_dict(),
        "model": _model_identity(model, model_dir),
        "embed_dim": embed_dim,
        "dtype": config.dtype,
        "shard_size": config.shard_size,
        "source_rows": source_rows,
        "num_shards": len(ranges),
        "fields": fields,
    })
    if os.path.exists(os.path.join(out_dir, store.COMPLETE_FILE)):
        return load_memory(out_dir)

    owned = [shard for shard in range(len(ranges)) if shard % process_count == process_index]
    finished = store.finished_shards(out_dir, len(ranges))
    todo = [shard for shard in owned if shard not in finished]
    logging.info("Memory %s: process %d/%d owns %d of %d shards, %d already finished.", out_dir, process_index,
                 process_count, len(owned), len(ranges), len(owned) - len(todo))
    from tqdm import tqdm  # noqa: PLC0415

    with tqdm(total=sum(ranges[s][1] - ranges[s][0] for s in owned),
              initial=sum(ranges[s][1] - ranges[s][0] for s in owned if s in finished),
              desc=f"memory p{process_index}", unit="rows", position=process_index,
              disable=not config.progress, dynamic_ncols=True) as progress:
        for shard in todo:
            start, stop = ranges[shard]
            store.discard_partial_shard(out_dir, shard)
            began = time.perf_counter()
            arrays, bad_input = _embed_shard(shard, start, stop, source, decoder, encoder, config, fields,
                                             embed_dim, progress.update)
            _write_shard(out_dir, shard, start, stop, arrays, bad_input, store.storage_dtype(config.dtype),
                         process_index, time.perf_counter() - began)
            if any(bad_input.values()):
                logging.warning("Memory shard %d (source rows %d-%d; the indices logged above count from %d) "
                                "skipped bad inputs: %s", shard, start, stop - 1, start,
                                {kind: count for kind, count in bad_input.items() if count})
            if on_shard_written is not None:
                on_shard_written(shard)

    missing = store.missing_shards(out_dir)
    if missing:
        logging.info("Memory %s: this process is done; %d shards remain for other processes.", out_dir, len(missing))
        return None
    return finalize(out_dir)
