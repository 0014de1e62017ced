"""grain input pipelines: random-access source -> host shard -> decode/augment/tokenize -> batch.

Train order per process (`train_dataset`):

    source --seed--> global shuffle (same permutation on every host, reshuffled each epoch)
           --> decode / augment / choose text / tokenize  (grain `random_map`: the numpy Generator
               is seeded from (seed, global position), so an example is reproducible, restorable
               and independent of the host count)
           --> host slice [process_index : floor(N/P)*P : process_count]  (disjoint; all hosts
               see floor(N/P) examples per epoch, so they step in lockstep)
           --> repeat(num_epochs)  --> skip bad inputs and batch (per-host batch = global / P)
           --> worker processes (`mp_prefetch`)

Eval (`eval_dataset`): no shuffle; host p reads positions p, p+P, ...; when N % P != 0 the
shorter hosts read one wrap-around example with mask False, so every host yields the same
number of batches. The last batch is partial unless `pad_last_batch` (padding rows: mask False).

Bad input: a record that cannot be read, an image that does not decode, a missing field or an
empty caption is either skipped and counted or raises `BadInputError`, per `on_bad_input`. Skip
counts ride along in each batch as `batch["bad_input"] = {kind: int32 count}` (so they survive
worker processes); `BadInputCounter` sums them for the trainer's metrics.

Batch fields: "image" float32 [B, S, S, 3] (normalized by the model's PreprocessSpec);
"text_ids" int32 [B, L] (or [B, C, L] with "text_mask" bool [B, C] when `texts_per_example` is
set); "label" int32 [B]; "id" str [B]; "index" int64 [B] (position in the source); "text" str [B]
when `keep_text`; passthrough fields as found; eval only: "mask" bool [B]; "bad_input" as above.

Iterator state (`it.get_state()` / `it.set_state(state)`) restores the exact position, also with
worker processes as long as `worker_count` is unchanged; save it with the train state.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import PIL.Image

from vlm_jax.data import augment as augment_lib

_LOG = logging.getLogger(__name__)
BAD_INPUT_KINDS = ("unreadable_record", "corrupt_image", "missing_field", "empty_text")


class BadInputError(ValueError):
    """An example that cannot be used, raised when `on_bad_input == "raise"`."""


@dataclasses.dataclass(frozen=True)
class _BadInput:
    kind: str
    index: int
    detail: str


@dataclasses.dataclass(frozen=True)
class _Fetched:
    """One source record with its source index; `real` is False for eval wrap-around rows."""

    index: int
    record: Any
    real: bool = True


class _FetchingSource:
    """Wraps a random-access source so read errors become data instead of worker crashes."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> _Fetched:
        try:
            return _Fetched(index, self.source[index])
        except Exception as error:  # noqa: BLE001 - any reader failure is one bad record
            return _Fetched(index, _BadInput("unreadable_record", index, f"{type(error).__name__}: {error}"))

    def __repr__(self) -> str:
        return f"_FetchingSource({self.source!r})"


class _EvalHostSource:
    """Host `process_index`'s eval rows: positions p, p+P, ... padded to ceil(N/P) rows."""

    def __init__(self, source: Any, process_index: int, process_count: int):
        self.fetch = _FetchingSource(source)
        self.process_index = process_index
        self.process_count = process_count
        self.total = len(source)

    def __len__(self) -> int:
        return math.ceil(self.total / self.process_count)

    def __getitem__(self, row: int) -> _Fetched:
        position = self.process_index + row * self.process_count
        if position < self.total:
            return self.fetch[position]
        fetched = self.fetch[position % self.total]
        return dataclasses.replace(fetched, real=False)


def decode_image(value: Any) -> np.ndarray:
    """Decodes PNG/JPEG bytes, a PIL image or an array to uint8 [H, W, 3].

    Raises:
      ValueError: on bytes PIL cannot fully decode (corrupt or truncated) or a bad array shape.
    """
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.item()
    from vlm_jax.data.preprocess import to_rgb  # transparency handled as the model's processor does

    if isinstance(value, (bytes, bytearray, memoryview)):
        with PIL.Image.open(io.BytesIO(bytes(value))) as image:
            image.load()  # forces a full decode so truncated files fail here, not later
            return np.asarray(to_rgb(image))
    if isinstance(value, PIL.Image.Image):
        return np.asarray(to_rgb(value))
    array = np.asarray(value)
    if array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image array, found dtype {array.dtype}.")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image of shape [H, W, 1|3|4], found {array.shape}.")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[:, :, :3]


def _as_text(value: Any) -> str | None:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _as_text_list(value: Any) -> list[str] | None:
    """A str or a list/array of str as a list; None for anything else."""
    single = _as_text(value)
    if single is not None:
        return [single]
    if isinstance(value, (list, tuple, np.ndarray)):
        texts = [_as_text(v) for v in value]
        if all(t is not None for t in texts):
            return texts
    return None


@dataclasses.dataclass(frozen=True)
class ExampleDecoder(grain.transforms.RandomMap):
    """Turns one source record into a model example (grain RandomMap; see the module docstring).

    `spec` is the model's `PreprocessSpec`. With `augment == "random_resized_crop"`, a crop with
    area fraction in `crop_scale` and aspect ratio in `crop_ratio` is resized to the model size
    (squashed, as in Inception/CLIP training) and normalized with the spec's mean/std; otherwise
    the image goes through `preprocess_image(image, spec)` (the eval transform). `text_keys`
    lists candidate caption fields; one is drawn per example with `text_weights` (uniform when
    None), then one caption if the field holds a list. `texts_per_example=C` instead tokenizes
    the first C captions of `text_keys[0]` (retrieval eval).
    """

    spec: Any = None
    tokenizer: Any = None
    image_key: str | None = "image"
    text_keys: tuple[str, ...] = ()
    text_weights: tuple[float, ...] | None = None
    texts_per_example: int | None = None
    label_key: str | None = None
    id_key: str | None = "id"
    passthrough_keys: tuple[str, ...] = ()
    keep_text: bool = False
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    with_mask: bool = False
    on_bad_input: str = "skip"

    def __post_init__(self):
        if self.on_bad_input not in ("skip", "raise"):
            raise ValueError(f"on_bad_input must be 'skip' or 'raise', found {self.on_bad_input!r}.")
        if self.augment not in ("none", "random_resized_crop"):
            raise ValueError(f"augment must be 'none' or 'random_resized_crop', found {self.augment!r}.")
        if self.text_weights is not None and len(self.text_weights) != len(self.text_keys):
            raise ValueError(
                f"text_weights has {len(self.text_weights)} entries for {len(self.text_keys)} text_keys; give one each."
            )
        if self.text_keys and self.tokenizer is None and not self.keep_text:
            raise ValueError("text_keys are set but there is no tokenizer; pass one or set keep_text=True.")

    def _bad(self, kind: str, fetched: _Fetched, detail: str, record: Mapping[str, Any] | None = None):
        example_id = record.get(self.id_key) if record is not None and self.id_key else None
        if self.on_bad_input == "raise":
            raise BadInputError(
                f"Bad input ({kind}) at source index {fetched.index}"
                + (f", id {_as_text(example_id)!r}" if example_id is not None else "")
                + f": {detail}. Fix the data or set on_bad_input='skip' to skip and count such examples."
            )
        return _BadInput(kind, fetched.index, detail)

    def _image(self, raw: Any, rng: np.random.Generator) -> np.ndarray:
        from vlm_jax.data.preprocess import preprocess_image  # the model's preprocessing

        pixels = decode_image(raw)
        if self.augment == "random_resized_crop":
            crop = augment_lib.random_resized_crop(pixels, rng, scale=self.crop_scale, ratio=self.crop_ratio)
            squash = dataclasses.replace(self.spec, resize="squash", crop=False, resize_size=None)
            return np.asarray(preprocess_image(crop, squash), np.float32)
        return np.asarray(preprocess_image(pixels, self.spec), np.float32)

    def random_map(self, element: _Fetched, rng: np.random.Generator):
        record = element.record
        if isinstance(record, _BadInput):
            if self.on_bad_input == "raise":
                raise BadInputError(
                    f"Bad input (unreadable_record) at source index {record.index}: {record.detail}. "
                    "Fix the data or set on_bad_input='skip' to skip and count such examples."
                )
            return record
        if not isinstance(record, Mapping):
            return self._bad("unreadable_record", element, f"record is a {type(record).__name__}, not a dict")
        example: dict[str, Any] = {"index": np.int64(element.index)}
        if self.with_mask:
            example["mask"] = np.bool_(element.real)
        if self.image_key is not None:
            raw = record.get(self.image_key)
            if raw is None:
                return self._bad("missing_field", element, f"no {self.image_key!r} field", record)
            try:
                example["image"] = self._image(raw, rng)
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
                return self._bad("corrupt_image", element, f"{type(error).__name__}: {error}", record)
        if self.text_keys:
            if self.texts_per_example:
                bad = self._all_texts(record, element, example)
            else:
                bad = self._one_text(record, element, example, rng)
            if bad is not None:
                return bad
        if self.label_key is not None:
            if record.get(self.label_key) is None:
                return self._bad("missing_field", element, f"no {self.label_key!r} field", record)
            example["label"] = np.int32(record[self.label_key])
        if self.id_key is not None and record.get(self.id_key) is not None:
            example["id"] = _as_text(record[self.id_key]) or str(record[self.id_key])
        for key in self.passthrough_keys:
            if key not in record:
                return self._bad("missing_field", element, f"no {key!r} field", record)
            example[key] = record[key]
        return example

    def _one_text(self, record, element, example, rng):
        key_index = 0
        if len(self.text_keys) > 1:
            key_index = int(rng.choice(len(self.text_keys), p=self._probabilities()))
        key = self.text_keys[key_index]
        if record.get(key) is None:
            return self._bad("missing_field", element, f"no {key!r} field", record)
        texts = _as_text_list(record[key])
        if texts is None:
            return self._bad("missing_field", element, f"field {key!r} holds no text", record)
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            return self._bad("empty_text", element, f"field {key!r} is empty", record)
        text = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        if self.keep_text:
            example["text"] = text
        if self.tokenizer is not None:
            example["text_ids"] = np.asarray(self.tokenizer([text])[0], np.int32)
        return None

    def _all_texts(self, record, element, example):
        key = self.text_keys[0]
        texts = _as_text_list(record.get(key))
        if texts is None:
            return self._bad("missing_field", element, f"no text field {key!r}", record)
        texts = [t.strip() for t in texts if t.strip()][: self.texts_per_example]
        if not texts:
            return self._bad("empty_text", element, f"field {key!r} is empty", record)
        count = self.texts_per_example
        ids = np.zeros((count, self.tokenizer.context_length), np.int32)
        ids[:, :] = self.tokenizer.pad_id
        ids[: len(texts)] = self.tokenizer(texts)
        example["text_ids"] = ids
        example["text_mask"] = np.arange(count) < len(texts)
        return None

    def _probabilities(self) -> np.ndarray:
        if self.text_weights is None:
            return np.full(len(self.text_keys), 1.0 / len(self.text_keys))
        weights = np.asarray(self.text_weights, np.float64)
        return weights / weights.sum()


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, str):
        return np.asarray(values, dtype=object)
    if isinstance(first, (np.ndarray, np.generic, int, float, bool)):
        return np.stack([np.asarray(v) for v in values])
    return values


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool, pad_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder

    def __next__(self) -> dict[str, Any]:
        counts = dict.fromkeys(BAD_INPUT_KINDS, 0)
        examples: list[dict[str, Any]] = []
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if isinstance(element, _BadInput):
                counts[element.kind] += 1
            else:
                examples.append(element)
        if not examples or (self._drop_remainder and len(examples) < self._batch_size):
            if any(counts.values()) or examples:
                _LOG.warning(
                    "End of data: dropped a final partial batch of %d examples; skipped bad inputs in it: %s",
                    len(examples), counts,
                )
            raise StopIteration
        if self._pad_remainder and len(examples) < self._batch_size:
            padding = dict(examples[-1], mask=np.bool_(False))
            examples.extend([padding] * (self._batch_size - len(examples)))
        batch = {key: _stack([example[key] for example in examples]) for key in examples[0]}
        batch["bad_input"] = {kind: np.int32(count) for kind, count in counts.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        # A batch is emitted whole, so between batches the parent's position is the whole state.
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _SkipAndBatchIterDataset(grain.IterDataset):
    """Drops `_BadInput` markers (counting them into the batch) and stacks examples."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, *, drop_remainder: bool, pad_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipAndBatchIterator(
            self._parent.__iter__(), self._batch_size, self._drop_remainder, self._pad_remainder
        )

    def __str__(self) -> str:
        return f"SkipAndBatch(batch_size={self._batch_size})"


class BadInputCounter:
    """Sums the per-batch skip counts: `counts = counter.update(batch)` pops batch["bad_input"]."""

    def __init__(self):
        self.totals = dict.fromkeys(BAD_INPUT_KINDS, 0)

    def update(self, batch: dict[str, Any]) -> dict[str, int]:
        counts = {kind: int(count) for kind, count in batch.pop("bad_input", {}).items()}
        for kind, count in counts.items():
            self.totals[kind] = self.totals.get(kind, 0) + count
        return counts

    def metrics(self, prefix: str = "data/skipped_") -> dict[str, int]:
        return {prefix + kind: count for kind, count in self.totals.items()}


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


def _finish(
    ds: grain.MapDataset,
    batch_size: int,
    *,
    drop_remainder: bool,
    pad_remainder: bool,
    worker_count: int,
    worker_buffer_size: int,
    read_threads: int,
    read_buffer_size: int,
) -> grain.IterDataset:
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
    iter_ds = _SkipAndBatchIterDataset(
        iter_ds, batch_size, drop_remainder=drop_remainder, pad_remainder=pad_remainder
    )
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


def train_dataset(
    source: Any,
    decoder: ExampleDecoder,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 32,
) -> grain.IterDataset:
    """Training batches of this process's share of `global_batch_size` (see module docstring).

    `num_epochs=None` repeats forever; a finite count ends after that many passes, dropping the
    last partial batch so every host steps the same number of times.
    """
    process_index, process_count = resolve_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(_FetchingSource(source)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.random_map(decoder)
    per_host = len(source) // process_count
    if per_host == 0:
        raise ValueError(f"The source has {len(source)} examples, fewer than the {process_count} processes.")
    ds = ds[process_index : per_host * process_count : process_count]
    ds = ds.repeat(num_epochs)
    return _finish(
        ds, batch_size, drop_remainder=True, pad_remainder=False, worker_count=worker_count,
        worker_buffer_size=worker_buffer_size, read_threads=read_threads, read_buffer_size=read_buffer_size,
    )


def eval_dataset(
    source: Any,
    decoder: ExampleDecoder,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_last_batch: bool = False,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 32,
) -> grain.IterDataset:
    """One ordered pass over the source, split over processes; batches carry "mask" bool [B]."""
    process_index, process_count = resolve_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    decoder = dataclasses.replace(decoder, augment="none", with_mask=True)
    ds = grain.MapDataset.source(_EvalHostSource(source, process_index, process_count)).seed(0)
    ds = ds.random_map(decoder)
    return _finish(
        ds, batch_size, drop_remainder=False, pad_remainder=pad_last_batch, worker_count=worker_count,
        worker_buffer_size=worker_buffer_size, read_threads=read_threads, read_buffer_size=read_buffer_size,
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
    Reading:
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


def make_source(config: Mapping[str, Any] | ml_collections.ConfigDict, *, split: str | None = None) -> Any:
    """Builds the random-access source a data config describes (see `default_config`)."""
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
) -> grain.DatasetIterator:
    """A restorable iterator of this process's training batches (see `default_config`)."""
    ds = train_dataset(
        source if source is not None else make_source(config),
        make_decoder(config, preprocess, tokenizer),
        global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, num_epochs=_field(config, "num_epochs"),
        shuffle=bool(_field(config, "shuffle")), **_reading(config),
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
) -> grain.DatasetIterator:
    """One ordered pass of eval batches with a "mask" field (see `eval_dataset`)."""
    ds = eval_dataset(
        source if source is not None else make_source(config, split=split),
        make_decoder(config, preprocess, tokenizer),
        global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
        pad_last_batch=pad_last_batch, **_reading(config),
    )
    return iter(ds)
