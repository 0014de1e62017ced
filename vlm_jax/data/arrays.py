"""Stored arrays (precomputed embeddings, labels) as a random-access source, checked row by row.

`ArraySource` reads one row of each field per example, so a memmap stays on disk: only the rows a
batch needs are read. It pickles a file-backed memmap as its file name and layout (grain worker
processes reopen the file), never as its contents. `ArrayDecoder` turns a row into an example and
skips and counts a row whose embedding holds NaN or inf (kind "nonfinite_embedding"), through the
same `BadInput` markers as image decoding.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Mapping
from typing import Any

import grain
import ml_dtypes
import numpy as np

from vlm_jax.data.bad_input import BadInput, Fetched, check_on_bad_input, reject

ARRAY_BAD_INPUT_KINDS = ("unreadable_record", "nonfinite_embedding")


def _is_inexact(dtype: np.dtype) -> bool:
    """True for float dtypes, bfloat16 and the other ml_dtypes floats included."""
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _memmap_layout(name: str, array: np.memmap) -> dict[str, Any]:
    if not isinstance(array.base, mmap.mmap) or array.filename is None:
        # A slice of a memmap inherits the file offset of the whole mapping, so its layout cannot be reopened.
        raise TypeError(
            f"ArraySource field {name!r} is a view of a memmap, which worker processes cannot reopen; pass the "
            "memmap np.load(path, mmap_mode='r') returns, or worker_count=0."
        )
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    return {"filename": array.filename, "dtype": array.dtype, "shape": array.shape, "order": order,
            "offset": array.offset}


class ArraySource:
    """Random access to rows of equally long arrays: `source[row]` is {"index": int64 row, field: row}.

    Args:
      fields: name -> array [N, ...] (numpy array or memmap, e.g. from `np.load(path, mmap_mode="r")`);
        every field has the same N. "index" is reserved for the row number.
    """

    def __init__(self, fields: Mapping[str, np.ndarray]):
        if not fields:
            raise ValueError("ArraySource needs at least one field; pass a mapping of name -> array [N, ...].")
        if "index" in fields:
            raise ValueError("ArraySource fields may not be named 'index' (the row number); rename that field.")
        lengths = {name: len(array) for name, array in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ArraySource fields differ in length: {lengths}; give every field one row per example.")
        self.fields = dict(fields)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not 0 <= row < self._length:
            raise IndexError(f"row {row} is outside [0, {self._length}).")
        return {"index": np.int64(row), **{name: np.asarray(array[row]) for name, array in self.fields.items()}}

    def __getstate__(self) -> dict[str, Any]:
        fields = {name: (_memmap_layout(name, array) if isinstance(array, np.memmap) else array)
                  for name, array in self.fields.items()}
        return {"fields": fields, "length": self._length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.fields = {name: np.memmap(mode="r", **value) if isinstance(value, dict) else value
                       for name, value in state["fields"].items()}
        self._length = state["length"]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {array.dtype}{list(array.shape)}" for name, array in self.fields.items())
        return f"ArraySource({shapes})"


@dataclasses.dataclass(frozen=True)
class ArrayDecoder(grain.transforms.Map):
    """Checks one `ArraySource` row and passes it on as an example.

    Example: "index" int64 (the row); each field of `keys` (every field when empty), inexact ones
    (float, bfloat16) cast to `float_dtype` (None: as stored); "mask" bool when `with_mask` (eval).
    A row whose `finite_keys` fields (every inexact field when None) hold NaN or inf is a bad
    input of kind "nonfinite_embedding": skipped and counted, or `BadInputError` (`on_bad_input`).
    """

    keys: tuple[str, ...] = ()
    finite_keys: tuple[str, ...] | None = None
    float_dtype: str | None = "float32"
    with_mask: bool = False
    on_bad_input: str = "skip"
    bad_input_kinds = ARRAY_BAD_INPUT_KINDS  # the kinds it can report, counted in every batch

    def __post_init__(self):
        check_on_bad_input(self.on_bad_input)

    def for_eval(self) -> ArrayDecoder:
        """This decoder as eval uses it: with a "mask" bool field."""
        return dataclasses.replace(self, with_mask=True)

    def map(self, element: Fetched) -> dict[str, Any] | BadInput:
        record = element.record
        if isinstance(record, BadInput):
            return reject(record.kind, record.index, record.detail, self.on_bad_input)
        keys = self.keys or tuple(name for name in record if name != "index")
        missing = [key for key in (*keys, *(self.finite_keys or ())) if key not in record]
        if missing:
            # A name no row has is a configuration error, not bad data: skipping would skip every row.
            raise ValueError(f"ArrayDecoder reads fields {missing}, which the source does not hold (it has "
                             f"{sorted(name for name in record if name != 'index')}); fix keys or finite_keys.")
        example: dict[str, Any] = {"index": np.int64(element.index)}
        if self.with_mask:
            example["mask"] = np.bool_(element.real)
        for key in keys:
            value = record[key]
            if self.float_dtype is not None and _is_inexact(value.dtype):
                value = value.astype(self.float_dtype)
            example[key] = value
        finite_keys = self.finite_keys
        if finite_keys is None:
            finite_keys = tuple(key for key in keys if _is_inexact(record[key].dtype))
        for key in finite_keys:
            finite = np.isfinite(example[key] if key in example else record[key])
            if not finite.all():
                return reject("nonfinite_embedding", element.index,
                              f"field {key!r} holds {int(finite.size - finite.sum())} NaN or inf values",
                              self.on_bad_input)
        return example
