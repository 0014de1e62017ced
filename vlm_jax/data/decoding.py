"""Records to model examples: image decoding, the model's preprocessing, caption choice, tokenization.

`ExampleDecoder` is the grain RandomMap the pipeline applies to each fetched record; an example it
cannot use becomes a `BadInput` marker (or `BadInputError`), see `vlm_jax.data.bad_input`.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
import PIL.Image

from vlm_jax.data import augment as augment_lib
from vlm_jax.data import captions
from vlm_jax.data.bad_input import BAD_INPUT_KINDS, BadInput, Fetched, check_on_bad_input, reject


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


def _as_text(value: Any, errors: str = "strict") -> str | None:
    """A str or UTF-8 bytes as str; None for anything else.

    Raises:
      UnicodeDecodeError: bytes that are not UTF-8 (with `errors="strict"`).
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors=errors)
    return value if isinstance(value, str) else None


def _as_id(value: Any) -> str:
    # An id only names the example: bytes that are not UTF-8 stay readable as escapes.
    return _as_text(value, errors="backslashreplace") or str(value)


def _not_utf8(key: str, error: UnicodeDecodeError) -> str:
    return f"field {key!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"


def _as_text_list(value: Any) -> list[str] | None:
    """A str or a list/array of str as a list; None for anything else.

    Raises:
      UnicodeDecodeError: bytes that are not UTF-8.
    """
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
    """Turns one fetched source record into a model example (a grain RandomMap: its numpy Generator
    is seeded from the pipeline seed and the example's position, so augmentation is reproducible).

    `spec` is the model's `PreprocessSpec`. With `augment == "random_resized_crop"`, a crop with
    area fraction in `crop_scale` and aspect ratio in `crop_ratio` is resized to the model size
    (squashed, as in Inception/CLIP training) and normalized with the spec's mean/std; otherwise
    the image goes through `preprocess_image(image, spec)` (the eval transform). `text_keys`
    lists candidate caption fields; one is drawn per example with `text_weights` (uniform when
    None), then one caption if the field holds a list. `texts_per_example=C` instead tokenizes
    the first C captions of `text_keys[0]` (retrieval eval).

    Caption transforms (`vlm_jax.data.captions`, training only): `sentence_sampling` replaces the
    drawn caption by a random subset of its sentences (at most `max_sentences`, 0: any number);
    `hard_negatives` (kinds, e.g. ("swap_attribute",)) adds "negative_ids" [L], the tokenized hard
    negative of the caption, and "negative_mask" (False where the caption has none).

    Regions (`regions_key`, GRAIN): the record field holding an image's boxes and their texts in
    the TFDS layout Shapes World stores ({"bbox": [n, 4] (ymin, xmin, ymax, xmax) normalized,
    "description": [n] texts}; `vlm_jax.data.annotations.AnnotatedSource` gives annotation files
    the same layout). The first `max_regions` boxes that stay inside the model input after
    preprocessing (`preprocess.transform_boxes`) become "boxes" float32 [R, 4] (cx, cy, w, h)
    normalized to the input, "box_mask" bool [R] and "region_ids" int32 [R, L] (their tokenized
    descriptions; padding rows hold pad ids), R = `max_regions`; eval batches also get
    "region_texts" str [R] ("" for padding). Boxes need augment "none": a random crop would move
    them. `region_context_length` (0: the tokenizer's) tokenizes descriptions to fewer ids: short
    descriptions then cost a fraction of a caption's text-tower FLOPs, and in a causal text tower
    pooled at the end-of-text token (CLIP's) a description that fits embeds exactly as at full length.
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
    sentence_sampling: bool = False
    max_sentences: int = 0
    hard_negatives: tuple[str, ...] = ()
    regions_key: str | None = None
    max_regions: int = 5
    region_context_length: int = 0
    on_bad_input: str = "skip"
    bad_input_kinds = BAD_INPUT_KINDS  # the kinds it can report, counted in every batch

    def __post_init__(self):
        check_on_bad_input(self.on_bad_input)
        if self.augment not in ("none", "random_resized_crop"):
            raise ValueError(f"augment must be 'none' or 'random_resized_crop', found {self.augment!r}.")
        if self.text_weights is not None and len(self.text_weights) != len(self.text_keys):
            raise ValueError(
                f"text_weights has {len(self.text_weights)} entries for {len(self.text_keys)} text_keys; give one each."
            )
        if self.text_keys and self.tokenizer is None and not self.keep_text:
            raise ValueError("text_keys are set but there is no tokenizer; pass one or set keep_text=True.")
        captions.check_negative_kinds(self.hard_negatives)
        if self.hard_negatives and (self.tokenizer is None or self.texts_per_example):
            raise ValueError("hard_negatives need a tokenizer and one caption per example (texts_per_example unset).")
        if self.regions_key and (self.augment != "none" or self.tokenizer is None or self.max_regions < 1):
            raise ValueError("regions need augment='none' (a random crop would move the boxes), a tokenizer and "
                             f"max_regions >= 1; got augment={self.augment!r}, max_regions={self.max_regions}.")
        if self.regions_key:
            length = self.region_context_length
            region_tokenizer = self.tokenizer.with_context_length(length) if length else self.tokenizer
            object.__setattr__(self, "_region_tokenizer", region_tokenizer)

    def for_eval(self) -> ExampleDecoder:
        """This decoder as eval uses it: no augmentation, and a "mask" bool field."""
        return dataclasses.replace(self, augment="none", with_mask=True, sentence_sampling=False, hard_negatives=())

    def _bad(self, kind: str, fetched: Fetched, detail: str, record: Mapping[str, Any] | None = None) -> BadInput:
        example_id = record.get(self.id_key) if record is not None and self.id_key else None
        example_id = _as_id(example_id) if example_id is not None else None
        return reject(kind, fetched.index, detail, self.on_bad_input, example_id)

    def _image(self, raw: Any, rng: np.random.Generator) -> np.ndarray:
        from vlm_jax.data.preprocess import preprocess_image  # the model's preprocessing

        pixels = decode_image(raw)
        if self.augment == "random_resized_crop":
            crop = augment_lib.random_resized_crop(pixels, rng, scale=self.crop_scale, ratio=self.crop_ratio)
            squash = dataclasses.replace(self.spec, resize="squash", crop=False, resize_size=None)
            return np.asarray(preprocess_image(crop, squash), np.float32), pixels.shape[:2]
        return np.asarray(preprocess_image(pixels, self.spec), np.float32), pixels.shape[:2]

    def _regions(self, record, element, example, shape):
        from vlm_jax.data.preprocess import transform_boxes  # noqa: PLC0415

        regions = record.get(self.regions_key)
        if not isinstance(regions, Mapping) or "bbox" not in regions or "description" not in regions:
            return self._bad("missing_field", element, f"no {self.regions_key!r} field with bbox and description",
                             record)
        yxyx = np.asarray(regions["bbox"], np.float32).reshape(-1, 4)
        try:
            texts = [_as_text(text) or "" for text in regions["description"]]
        except UnicodeDecodeError as error:
            return self._bad("undecodable_text", element, _not_utf8(self.regions_key, error), record)
        if len(texts) != len(yxyx):
            return self._bad("missing_field", element, f"{len(yxyx)} boxes but {len(texts)} descriptions", record)
        boxes, keep = transform_boxes(yxyx[:, [1, 0, 3, 2]], shape[0], shape[1], self.spec)
        keep &= np.asarray([bool(text.strip()) for text in texts], bool)
        chosen = np.flatnonzero(keep)[: self.max_regions]
        count, xyxy = len(chosen), boxes[chosen]
        out = np.zeros((self.max_regions, 4), np.float32)
        kept = [texts[i].strip() for i in chosen]
        tokenizer = self._region_tokenizer
        ids = np.full((self.max_regions, tokenizer.context_length), tokenizer.pad_id, np.int32)
        if count:
            out[:count] = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                    xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1)
            ids[:count] = tokenizer(kept)
        example["boxes"], example["box_mask"], example["region_ids"] = out, np.arange(self.max_regions) < count, ids
        if self.with_mask or self.keep_text:
            example["region_texts"] = np.asarray(kept + [""] * (self.max_regions - count), dtype=object)
        return None

    def random_map(self, element: Fetched, rng: np.random.Generator):
        record = element.record
        if isinstance(record, BadInput):
            return reject(record.kind, record.index, record.detail, self.on_bad_input)
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
                example["image"], original_shape = self._image(raw, rng)
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
                return self._bad("corrupt_image", element, f"{type(error).__name__}: {error}", record)
            if self.regions_key:
                bad = self._regions(record, element, example, original_shape)
                if bad is not None:
                    return bad
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
            example["id"] = _as_id(record[self.id_key])
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
        try:
            texts = _as_text_list(record[key])
        except UnicodeDecodeError as error:
            return self._bad("undecodable_text", element, _not_utf8(key, error), record)
        if texts is None:
            return self._bad("missing_field", element, f"field {key!r} holds no text", record)
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            return self._bad("empty_text", element, f"field {key!r} is empty", record)
        text = texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        if self.sentence_sampling:
            text = captions.sample_sentences(text, rng, self.max_sentences)
        if self.hard_negatives:
            negative = captions.hard_negative(text, self.hard_negatives, rng)
            example["negative_ids"] = np.asarray(self.tokenizer([negative or ""])[0], np.int32)
            example["negative_mask"] = np.bool_(negative is not None)
        if self.keep_text:
            example["text"] = text
        if self.tokenizer is not None:
            example["text_ids"] = np.asarray(self.tokenizer([text])[0], np.int32)
        return None

    def _all_texts(self, record, element, example):
        key = self.text_keys[0]
        try:
            texts = _as_text_list(record.get(key))
        except UnicodeDecodeError as error:
            return self._bad("undecodable_text", element, _not_utf8(key, error), record)
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
