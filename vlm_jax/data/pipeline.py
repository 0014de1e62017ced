"""grain input pipelines: weighted random-access sources -> host shard -> decode -> batch -> method maps.

Train order per process (`train_mixture`; `train_dataset` is the one-source case):

    each source --seed--> global shuffle (same permutation on every host, reshuffled each epoch)
           --> decode (`ExampleDecoder`: image/augment/text/tokenize, a grain `random_map` whose
               Generator is seeded from (seed, global position), so an example is reproducible,
               restorable and independent of the host count; `ArrayDecoder`: stored rows)
           --> host slice [process_index : floor(N/P)*P : process_count]  (disjoint; all hosts
               see floor(N/P) examples per epoch, so they step in lockstep)
           --> repeat(num_epochs)
    sources --> `grain.MapDataset.mix` by weight (a deterministic interleave: of every W examples,
               a source of weight w supplies w * W / sum(weights))
           --> skip bad inputs and batch (per-host batch = global / P) --> batch maps (the method's)
           --> worker processes (`mp_prefetch`)

The first source is seeded with `seed` itself and source i > 0 with a seed drawn from (seed, i), so
one source reads exactly as a single-source pipeline does and adding sources leaves the first
one's order unchanged. With several sources each example carries "source" int32 (its position in
the list), since "index" is a position within its own source.

Eval (`eval_dataset`): no shuffle; host p reads positions p, p+P, ...; when N % P != 0 the
shorter hosts read one wrap-around example with mask False, so every host yields the same
number of batches. The last batch is partial unless `pad_last_batch` (padding rows: mask False).

Bad input (`vlm_jax.data.bad_input`): a record that cannot be read, an image that does not decode,
a missing field, an empty caption or a stored embedding with NaN/inf is either skipped and counted
or raises `BadInputError`, per `on_bad_input`; so is text that is not UTF-8 ("undecodable_text").
Skip counts ride along in each batch as `batch["bad_input"] = {kind: int32 count}` (so they survive
worker processes; batch maps never see or drop them); `BadInputCounter` sums them for the trainer's
metrics. A finite pass counts every skip in some batch, also those after its last example: an eval
pass whose examples are all bad yields one batch holding only "bad_input" (batch maps skip it).

Batch fields (`ExampleDecoder`): "image" float32 [B, S, S, 3] (normalized by the model's
PreprocessSpec); "text_ids" int32 [B, L] (or [B, C, L] with "text_mask" bool [B, C] when
`texts_per_example` is set); "label" int32 [B]; "id" str [B]; "index" int64 [B] (position in the
source); "text" str [B] when `keep_text`; passthrough fields as found; eval only: "mask" bool [B];
"bad_input" as above; then whatever the batch maps add.

Iterator state (`it.get_state()` / `it.set_state(state)`) restores the exact position, also with
worker processes as long as `worker_count` is unchanged; save it with the train state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data.arrays import ARRAY_BAD_INPUT_KINDS, ArrayDecoder, ArraySource
from vlm_jax.data.bad_input import (
    BAD_INPUT_KINDS,
    BadInput,
    BadInputCounter,
    BadInputError,
    BadRecordError,
    Fetched,
    FetchingSource,
    SkipAndBatchIterDataset,
)
from vlm_jax.data.decoding import ExampleDecoder, decode_image

BatchMap = Callable[[dict[str, Any]], dict[str, Any]]


class _EvalHostSource:
    """Host `process_index`'s eval rows: positions p, p+P, ... padded to ceil(N/P) rows."""

    def __init__(self, source: Any, process_index: int, process_count: int):
        self.fetch = FetchingSource(source)
        self.process_index = process_index
        self.process_count = process_count
        self.total = len(source)

    def __len__(self) -> int:
        return math.ceil(self.total / self.process_count)

    def __getitem__(self, row: int) -> Fetched:
        position = self.process_index + row * self.process_count
        if position < self.total:
            return self.fetch[position]
        fetched = self.fetch[position % self.total]
        return dataclasses.replace(fetched, real=False)


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Explicit (index, count), else jax.process_index()/process_count()."""
    if process_index is None or process_count is None:
        import jax  # imported here so grain worker processes, which unpickle this module, skip jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), found {process_index}.")
    return process_index, process_count


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the process count {process_count}; "
            f"choose a multiple of {process_count}."
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class WeightedSource:
    """One source of a training mixture: a random-access source, its decoder and its mixing weight.

    `decoder` is an `ExampleDecoder` (records with images and text), an `ArrayDecoder` (stored
    rows) or any grain RandomMap/Map over `Fetched` records; sources may share one decoder. A
    weight of 0 leaves the source out.
    """

    source: Any
    decoder: Any
    weight: float = 1.0


def _decode(ds: grain.MapDataset, decoder: Any) -> grain.MapDataset:
    # A plain Map (stored rows) needs no per-example Generator, which costs more than the row.
    return ds.map(decoder) if isinstance(decoder, grain.transforms.Map) else ds.random_map(decoder)


def _bad_input_kinds(decoders: Sequence[Any]) -> tuple[str, ...]:
    kinds: list[str] = []
    for decoder in decoders:
        kinds.extend(k for k in getattr(decoder, "bad_input_kinds", BAD_INPUT_KINDS) if k not in kinds)
    return tuple(kinds)


@dataclasses.dataclass(frozen=True)
class _TagSource(grain.transforms.Map):
    """Adds "source" int32 (the source's position in the mixture) to each decoded example."""

    position: int

    def map(self, element: Any) -> Any:
        if isinstance(element, BadInput):
            return element
        return {**element, "source": np.int32(self.position)}


@dataclasses.dataclass(frozen=True)
class _ApplyBatchMaps:
    """Applies the caller's batch maps in order; the skip counts are set aside, so none is lost."""

    batch_maps: tuple[BatchMap, ...]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        bad_input = batch.pop("bad_input")
        if not batch:  # a batch of skip counts alone: no examples to map
            return {"bad_input": bad_input}
        for batch_map in self.batch_maps:
            batch = batch_map(batch)
            if not isinstance(batch, Mapping):
                raise TypeError(f"Batch map {batch_map!r} returned a {type(batch).__name__}; return the batch dict.")
        return {**batch, "bad_input": bad_input}


def _finish(
    ds: grain.MapDataset,
    batch_size: int,
    *,
    kinds: tuple[str, ...],
    drop_remainder: bool,
    pad_remainder: bool,
    finite: bool,
    batch_maps: Sequence[BatchMap],
    worker_count: int,
    worker_buffer_size: int,
    read_threads: int,
    read_buffer_size: int,
) -> grain.IterDataset:
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
    iter_ds = SkipAndBatchIterDataset(
        iter_ds, batch_size, kinds=kinds, drop_remainder=drop_remainder, pad_remainder=pad_remainder,
        finite=finite,
    )
    if batch_maps:
        # Before the workers: the maps run in them, and the iterator state stays one position.
        iter_ds = iter_ds.map(_ApplyBatchMaps(tuple(batch_maps)))
    if worker_count > 0:
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags when starting workers; outside an absl app (tests,
            # notebooks) nothing has parsed them, so use their defaults.
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return iter_ds


def _source_seed(seed: int, position: int) -> int:
    if position == 0:
        return seed
    return int(np.random.SeedSequence((seed, position)).generate_state(1)[0])


def _host_stream(
    part: WeightedSource, position: int, *, tag: bool, seed: int, shuffle: bool, num_epochs: int | None,
    process_index: int, process_count: int,
) -> grain.MapDataset:
    """One source's examples for this host: shuffled, decoded, sliced and repeated."""
    ds = grain.MapDataset.source(FetchingSource(part.source)).seed(_source_seed(seed, position))
    if shuffle:
        ds = ds.shuffle()
    ds = _decode(ds, part.decoder)
    if tag:
        ds = ds.map(_TagSource(position))
    per_host = len(part.source) // process_count
    if per_host == 0:
        raise ValueError(
            f"Source {position} has {len(part.source)} examples, fewer than the {process_count} processes."
        )
    return ds[process_index : per_host * process_count : process_count].repeat(num_epochs)


def train_mixture(
    sources: Sequence[WeightedSource],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    batch_maps: Sequence[BatchMap] = (),
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 32,
) -> grain.IterDataset:
    """Training batches of this process's share of `global_batch_size`, drawn from weighted sources.

    Each source is shuffled, decoded, split over processes and repeated on its own, then the
    streams are mixed by weight (module docstring). `batch_maps` (batch dict -> batch dict) run in
    order on every batch, inside the restorable iterator. `num_epochs=None` repeats forever; a
    finite count ends the mixture when a source has no examples left, dropping the last partial
    batch so every host steps the same number of times (its skips are counted in the batch before).
    """
    sources = list(sources)
    if not sources:
        raise ValueError("train_mixture needs at least one WeightedSource.")
    weights = [float(part.weight) for part in sources]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights):
        raise ValueError(f"Source weights must be finite and non-negative, not all zero; found {weights}.")
    process_index, process_count = resolve_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    streams = [
        _host_stream(part, position, tag=len(sources) > 1, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                     process_index=process_index, process_count=process_count)
        for position, part in enumerate(sources) if part.weight
    ]
    active = [w for w in weights if w]
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, active)
    return _finish(
        ds, batch_size, kinds=_bad_input_kinds([part.decoder for part in sources]), drop_remainder=True,
        pad_remainder=False, finite=num_epochs is not None, batch_maps=batch_maps, worker_count=worker_count,
        worker_buffer_size=worker_buffer_size, read_threads=read_threads, read_buffer_size=read_buffer_size,
    )


def train_dataset(source: Any, decoder: Any, **options: Any) -> grain.IterDataset:
    """Training batches from one source: `train_mixture([WeightedSource(source, decoder)], **options)`
    (global_batch_size, seed and the other keywords of `train_mixture`)."""
    return train_mixture([WeightedSource(source, decoder)], **options)


def eval_dataset(
    source: Any,
    decoder: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_last_batch: bool = False,
    batch_maps: Sequence[BatchMap] = (),
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 32,
) -> grain.IterDataset:
    """One ordered pass over the source, split over processes; batches carry "mask" bool [B].

    `decoder` is used in its eval form (`decoder.for_eval()`: no augmentation, a mask field).
    """
    process_index, process_count = resolve_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    if not hasattr(decoder, "for_eval"):
        raise TypeError(f"eval_dataset needs a decoder with an eval form (`for_eval()`: ExampleDecoder, "
                        f"ArrayDecoder); found a {type(decoder).__name__}.")
    decoder = decoder.for_eval()
    ds = grain.MapDataset.source(_EvalHostSource(source, process_index, process_count)).seed(0)
    ds = _decode(ds, decoder)
    return _finish(
        ds, batch_size, kinds=_bad_input_kinds([decoder]), drop_remainder=False, pad_remainder=pad_last_batch,
        finite=True, batch_maps=batch_maps, worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_threads=read_threads, read_buffer_size=read_buffer_size,
    )


# ---------------------------------------------------------------------------------------------
# Config-driven construction.


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` section with every field the constructors read, and its defaults.

    Source (one of):
      source: "tfds" | "array_record" | "webdataset" | "manifest" | "image_folder".
      dataset: optional registry name (vlm_jax.data.datasets, e.g. "cars", "shapes_world"); fills
        tfds_name, image_key and label_key, and the split when `split` is empty.
      tfds_name, split, data_dir, download: for "tfds" (`tfds.data_source(tfds_name, split=split,
        data_dir=data_dir, download=download)`); tfds_name may carry a version ("cars196:2.1.0").
      paths: file glob(s) for "array_record" / "webdataset" / "manifest" (comma-separated allowed).
      image_root, image_path_key: manifest image folder (default: the manifest's) and column.
      root: the folder for "image_folder" (class-per-subfolder).
    Example fields:
      image_key, text_keys (tuple; one drawn per example), text_weights (tuple or None: uniform),
      texts_per_example (None, or C captions per example for retrieval eval), label_key, id_key,
      passthrough_keys, keep_text.
    Augmentation (train only):
      augment: "none" | "random_resized_crop"; crop_scale, crop_ratio.
      sentence_sampling (bool), max_sentences (0: no cap): train on a random subset of a caption's
        sentences; hard_negatives (kinds, e.g. ("swap_attribute",)): a rule-made negative caption
        per example ("negative_ids", "negative_mask"); see `vlm_jax.data.captions`.
    Regions: regions_key (the field with "bbox" and "description" lists, e.g. Shapes World's
      "regions"; "": none), max_regions (R), region_context_length (0: the tokenizer's): "boxes",
      "box_mask", "region_ids" per example (see `ExampleDecoder`).
    Reading:
      max_examples: the source's first N records only (0: all), e.g. a training subset every row
        of an experiment shares,
      shuffle, num_epochs (None: repeat forever), worker_count (grain worker processes; 0: in
      process), worker_buffer_size (batches per worker), read_threads, read_buffer_size.
    Bad input:
      on_bad_input: "skip" (skip and count in batch["bad_input"]) | "raise" (BadInputError).
    """
    return ml_collections.ConfigDict(
        {
            "source": "tfds",
            "dataset": "",
            "tfds_name": "",
            "split": "",
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            "download": False,
            "paths": "",
            "image_root": ml_collections.FieldReference(None, field_type=str),
            "image_path_key": "image_path",
            "root": "",
            "image_key": "image",
            "text_keys": (),
            "text_weights": ml_collections.FieldReference(None, field_type=tuple),
            "texts_per_example": ml_collections.FieldReference(None, field_type=int),
            "label_key": ml_collections.FieldReference(None, field_type=str),
            "id_key": "id",
            "passthrough_keys": (),
            "keep_text": False,
            "augment": "none",
            "crop_scale": (0.9, 1.0),
            "crop_ratio": (3 / 4, 4 / 3),
            "sentence_sampling": False,
            "max_sentences": 0,
            "hard_negatives": (),
            "regions_key": "",
            "max_regions": 5,
            "region_context_length": 0,
            "max_examples": 0,
            "shuffle": True,
            "num_epochs": ml_collections.FieldReference(None, field_type=int),
            "worker_count": 0,
            "worker_buffer_size": 2,
            "read_threads": 4,
            "read_buffer_size": 32,
            "on_bad_input": "skip",
        }
    )


def _field(config: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> Any:
    """`config.<name>`, or its `default_config()` value when the config leaves it out."""
    return config.get(name, default_config()[name])


class Head:
    """The first `count` records of a random-access source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> Any:
        if not 0 <= row < self.count:
            raise IndexError(row)
        return self.source[row]


def make_source(config: Mapping[str, Any] | ml_collections.ConfigDict, *, split: str | None = None) -> Any:
    """Builds the random-access source a data config describes (see `default_config`), cut to its
    first `max_examples` records when that is set."""
    source = _open_source(config, split)
    limit = int(_field(config, "max_examples") or 0)
    return Head(source, limit) if limit else source


def _open_source(config: Mapping[str, Any] | ml_collections.ConfigDict, split: str | None) -> Any:
    from vlm_jax.data import corpora  # noqa: PLC0415 - keeps the pipeline import light

    kind = _field(config, "source")
    split = split or _field(config, "split")
    dataset = _field(config, "dataset")
    if dataset:
        from vlm_jax.data import datasets  # noqa: PLC0415

        entry = datasets.get(dataset)
        if kind == "tfds":
            return entry.source(split or entry.test_split, data_dir=_field(config, "data_dir"))
    if kind == "tfds":
        import tensorflow_datasets as tfds  # noqa: PLC0415

        name = _field(config, "tfds_name")
        if not name or not split:
            raise ValueError("A tfds source needs data.tfds_name and data.split (or data.dataset).")
        return tfds.data_source(name, split=split, data_dir=_field(config, "data_dir"),
                                download=bool(_field(config, "download")))
    if kind == "array_record":
        return corpora.ArrayRecordCorpusSource(_field(config, "paths"))
    if kind == "webdataset":
        return corpora.WebDatasetSource(_field(config, "paths"))
    if kind == "manifest":
        return corpora.ManifestSource(
            _field(config, "paths"), image_path_key=_field(config, "image_path_key"),
            id_key=_field(config, "id_key"), image_root=_field(config, "image_root"),
        )
    if kind == "image_folder":
        return corpora.ImageFolderSource(_field(config, "root"))
    raise ValueError(
        f"Unknown data.source {kind!r}; expected 'tfds', 'array_record', 'webdataset', 'manifest' or 'image_folder'."
    )


def prepare_embedded(config) -> None:
    """Builds an embedded TFDS dataset (Shapes World) a data section names, on first use."""
    name = _field(config, "tfds_name") or ""
    if _field(config, "source") == "tfds" and name.startswith("shapes_world"):
        from vlm_jax.data import shapes_world  # noqa: PLC0415

        shapes_world.prepare(_field(config, "data_dir"), name.split("/", 1)[1].split(":")[0] if "/" in name
                             else "default")


def check_source(config, where: str) -> None:
    """Opens the source of a data section once, so a TFDS dataset that is not prepared (or a split it
    lacks) is a one-line ConfigError naming the section before any work. Embedded builders (Shapes
    World) are built on first use and not opened here."""
    from vlm_jax.config_lib import ConfigError  # noqa: PLC0415

    name = _field(config, "tfds_name") or _field(config, "dataset") or ""
    if _field(config, "source") != "tfds" or name.startswith("shapes_world"):
        return
    try:
        make_source(config)
    except Exception as error:  # noqa: BLE001 - TFDS raises KeyError, ValueError, AssertionError, ...
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{where}: cannot open {name!r} split {_field(config, 'split')!r} ({detail}); prepare the "
                          f"dataset in --config.data_dir or fix --config.{where}.") from None


def read_images(config: Mapping[str, Any] | ml_collections.ConfigDict, indices: Sequence[int]) -> list[np.ndarray]:
    """The decoded uint8 images [H, W, 3] of a data config's records at `indices` (source positions,
    e.g. a memory's `indices`), for consumers that need pixels as stored (an MLLM, region crops)."""
    from vlm_jax.data.decoding import decode_image  # noqa: PLC0415

    source = make_source(config)
    key = _field(config, "image_key") or "image"
    return [decode_image(source[int(index)][key]) for index in indices]


def make_decoder(config, preprocess, tokenizer) -> ExampleDecoder:
    """The `ExampleDecoder` a data config describes; registry entries fill image/label keys."""
    image_key, label_key = _field(config, "image_key"), _field(config, "label_key")
    if _field(config, "dataset"):
        from vlm_jax.data import datasets  # noqa: PLC0415

        entry = datasets.get(_field(config, "dataset"))
        image_key = entry.image_key
        label_key = label_key if label_key is not None else entry.label_key
    text_weights = _field(config, "text_weights")
    return ExampleDecoder(
        spec=preprocess,
        tokenizer=tokenizer,
        image_key=image_key,
        text_keys=tuple(_field(config, "text_keys")),
        text_weights=tuple(text_weights) if text_weights is not None else None,
        texts_per_example=_field(config, "texts_per_example"),
        label_key=label_key,
        id_key=_field(config, "id_key") or None,
        passthrough_keys=tuple(_field(config, "passthrough_keys")),
        keep_text=bool(_field(config, "keep_text")),
        augment=_field(config, "augment"),
        crop_scale=tuple(_field(config, "crop_scale")),
        crop_ratio=tuple(_field(config, "crop_ratio")),
        sentence_sampling=bool(_field(config, "sentence_sampling")),
        max_sentences=int(_field(config, "max_sentences")),
        hard_negatives=tuple(_field(config, "hard_negatives")),
        regions_key=_field(config, "regions_key") or None,
        max_regions=int(_field(config, "max_regions")),
        region_context_length=int(_field(config, "region_context_length")),
        on_bad_input=_field(config, "on_bad_input"),
    )


def _reading(config) -> dict[str, int]:
    return {name: int(_field(config, name)) for name in
            ("worker_count", "worker_buffer_size", "read_threads", "read_buffer_size")}


def make_train_iterator(
    config,
    preprocess,
    tokenizer,
    global_batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
    batch_maps: Sequence[BatchMap] = (),
) -> grain.DatasetIterator:
    """A restorable iterator of this process's training batches (see `default_config`)."""
    ds = train_dataset(
        source if source is not None else make_source(config),
        make_decoder(config, preprocess, tokenizer),
        global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, num_epochs=_field(config, "num_epochs"),
        shuffle=bool(_field(config, "shuffle")), batch_maps=batch_maps, **_reading(config),
    )
    return iter(ds)


def make_eval_iterator(
    config,
    preprocess,
    tokenizer,
    global_batch_size: int,
    *,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_last_batch: bool = False,
    source: Any = None,
    batch_maps: Sequence[BatchMap] = (),
) -> grain.DatasetIterator:
    """One ordered pass of eval batches with a "mask" field (see `eval_dataset`)."""
    ds = eval_dataset(
        source if source is not None else make_source(config, split=split),
        make_decoder(config, preprocess, tokenizer),
        global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
        pad_last_batch=pad_last_batch, batch_maps=batch_maps, **_reading(config),
    )
    return iter(ds)


__all__ = ["ARRAY_BAD_INPUT_KINDS", "BAD_INPUT_KINDS", "ArrayDecoder", "ArraySource", "BadInputCounter",
           "BadInputError", "BadRecordError", "BatchMap", "ExampleDecoder", "Head", "WeightedSource", "decode_image",
           "default_config", "eval_dataset", "make_decoder", "make_eval_iterator", "make_source", "make_train_iterator",
           "per_process_batch_size", "resolve_process", "train_dataset", "train_mixture"]
