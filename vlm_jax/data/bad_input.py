"""Bad input as data: read errors and unusable examples become markers that batching skips and counts.

A record that cannot be read (`FetchingSource`) or an example a decoder rejects (`reject`) is a
`BadInput` marker instead of an exception, so it survives grain worker processes; the batching
step (`SkipAndBatchIterDataset`) drops markers and reports them in each batch as
`batch["bad_input"] = {kind: int32 count}`, and `BadInputCounter` sums those for the metrics.
With `on_bad_input == "raise"`, `reject` raises `BadInputError` at the example instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

_LOG = logging.getLogger(__name__)
BAD_INPUT_KINDS = ("unreadable_record", "corrupt_image", "missing_field", "empty_text")
ON_BAD_INPUT = ("skip", "raise")


class BadInputError(ValueError):
    """An example that cannot be used, raised when `on_bad_input == "raise"`."""


@dataclasses.dataclass(frozen=True)
class BadInput:
    """The marker a skipped example leaves in the stream: its kind, source index and why."""

    kind: str
    index: int
    detail: str


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One source record with its source index; `real` is False for eval wrap-around rows."""

    index: int
    record: Any
    real: bool = True


def check_on_bad_input(on_bad_input: str) -> None:
    if on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"on_bad_input must be 'skip' or 'raise', found {on_bad_input!r}.")


def reject(kind: str, index: int, detail: str, on_bad_input: str, example_id: str | None = None) -> BadInput:
    """The `BadInput` marker for a skipped example, or `BadInputError` when `on_bad_input == "raise"`."""
    if on_bad_input == "raise":
        raise BadInputError(
            f"Bad input ({kind}) at source index {index}"
            + (f", id {example_id!r}" if example_id is not None else "")
            + f": {detail}. Fix the data or set on_bad_input='skip' to skip and count such examples."
        )
    return BadInput(kind, index, detail)


class FetchingSource:
    """Wraps a random-access source so read errors become data instead of worker crashes."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Fetched:
        try:
            return Fetched(index, self.source[index])
        except Exception as error:  # noqa: BLE001 - any reader failure is one bad record
            return Fetched(index, BadInput("unreadable_record", index, f"{type(error).__name__}: {error}"))

    def __repr__(self) -> str:
        return f"FetchingSource({self.source!r})"


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, str):
        return np.asarray(values, dtype=object)
    if isinstance(first, (np.ndarray, np.generic, int, float, bool)):
        return np.stack([np.asarray(v) for v in values])
    return values


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, kinds: tuple[str, ...],
                 drop_remainder: bool, pad_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._kinds = kinds
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder

    def __next__(self) -> dict[str, Any]:
        counts = dict.fromkeys(self._kinds, 0)
        examples: list[dict[str, Any]] = []
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if isinstance(element, BadInput):
                # A kind no decoder declared is still counted: nothing is skipped silently.
                counts[element.kind] = counts.get(element.kind, 0) + 1
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


class SkipAndBatchIterDataset(grain.IterDataset):
    """Drops `BadInput` markers (counting them by kind into the batch) and stacks examples.

    `kinds` are the counts every batch carries (zero when none was seen), so all batches and all
    hosts report the same keys.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, *, kinds: Sequence[str] = BAD_INPUT_KINDS,
                 drop_remainder: bool, pad_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._kinds = tuple(kinds)
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipAndBatchIterator(
            self._parent.__iter__(), self._batch_size, self._kinds, self._drop_remainder, self._pad_remainder
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
