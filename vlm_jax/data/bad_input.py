"""Bad input as data: read errors and unusable examples become markers that batching skips and counts.

A record that cannot be read (`FetchingSource`) or an example a decoder rejects (`reject`) is a
`BadInput` marker instead of an exception, so it survives grain worker processes; the batching
step (`SkipAndBatchIterDataset`) drops markers and reports them in each batch as
`batch["bad_input"] = {kind: int32 count}`, and `BadInputCounter` sums those for the metrics.
With `on_bad_input == "raise"`, `reject` raises `BadInputError` at the example instead.

A source reports a record it can read only in part by raising `BadRecordError(kind, detail)`
(e.g. text that is not UTF-8, detail naming the file and line); `FetchingSource` turns it into a
marker of that kind. Every skip is counted in a batch, also at the end of a finite pass: there the
batching reads one batch ahead, so the skips of a final group that yields no batch (only bad
inputs, or a partial batch that `drop_remainder` drops) are counted in the last batch returned, and
a pass without any usable example (and no `drop_remainder`) ends in one batch that holds only
"bad_input". The first few skips of each kind are logged with their detail.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

_LOG = logging.getLogger(__name__)
BAD_INPUT_KINDS = ("unreadable_record", "corrupt_image", "missing_field", "empty_text", "undecodable_text")
ON_BAD_INPUT = ("skip", "raise")
LOGGED_PER_KIND = 10  # skips logged one by one per kind and iterator; later ones are counted only


class BadInputError(ValueError):
    """An example that cannot be used, raised when `on_bad_input == "raise"`."""


class BadRecordError(ValueError):
    """Raised by a source for a record it cannot read; `FetchingSource` counts it as `kind`.

    `detail` says where and why ("manifest.jsonl:3: not UTF-8 ..."), for the log and for errors.
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


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
        except BadRecordError as error:
            return Fetched(index, BadInput(error.kind, index, error.detail))
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


def _added(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {**counts, **{kind: counts.get(kind, 0) + count for kind, count in more.items()}}


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, kinds: tuple[str, ...],
                 drop_remainder: bool, pad_remainder: bool, finite: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._kinds = kinds
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder
        self._finite = finite
        self._ahead: tuple[list[Any], dict[str, int], bool] | None = None  # the next group, read early
        self._ahead_state: Any = None  # the parent's state before that group
        self._ended = False
        self._logged: dict[str, int] = {}

    def _log(self, marker: BadInput) -> None:
        logged = self._logged.get(marker.kind, 0)
        if logged < LOGGED_PER_KIND:
            _LOG.warning("Skipped bad input (%s) at source index %d: %s", marker.kind, marker.index, marker.detail)
        elif logged == LOGGED_PER_KIND:
            _LOG.warning("More bad inputs of kind %s follow; they are counted in batch['bad_input'], not logged.",
                         marker.kind)
        self._logged[marker.kind] = logged + 1

    def _read_group(self) -> tuple[list[Any], dict[str, int], bool]:
        """Up to batch_size examples and the skips read among them: (examples, counts, parent exhausted)."""
        counts = dict.fromkeys(self._kinds, 0)
        examples: list[Any] = []
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                return examples, counts, True
            if isinstance(element, BadInput):
                # A kind no decoder declared is still counted: nothing is skipped silently.
                counts[element.kind] = counts.get(element.kind, 0) + 1
                self._log(element)
            else:
                examples.append(element)
        return examples, counts, False

    def _yields_batch(self, examples: list[Any]) -> bool:
        return bool(examples) and not (self._drop_remainder and len(examples) < self._batch_size)

    def __next__(self) -> dict[str, Any]:
        if self._ended:
            raise StopIteration
        if self._ahead is not None:
            (examples, counts, exhausted), self._ahead = self._ahead, None
        else:
            examples, counts, exhausted = self._read_group()
        if self._finite and not exhausted and self._yields_batch(examples):
            state = copy.deepcopy(self._parent.get_state())
            following = self._read_group()
            if self._yields_batch(following[0]):
                self._ahead, self._ahead_state = following, state
            else:
                # The pass ends in a group that yields no batch: this batch carries its skips.
                if following[0]:
                    _LOG.warning("End of data: dropped a final partial batch of %d examples.", len(following[0]))
                counts, exhausted = _added(counts, following[1]), True
        self._ended = exhausted
        if not self._yields_batch(examples):
            self._ended = True
            if examples:
                _LOG.warning("End of data: dropped a final partial batch of %d examples; skipped bad inputs in "
                             "it (in no batch): %s", len(examples), counts)
            elif any(counts.values()) and not self._drop_remainder:
                return {"bad_input": {kind: np.int32(count) for kind, count in counts.items()}}
            elif any(counts.values()):
                _LOG.warning("End of data: skipped bad inputs in no batch: %s", counts)
            raise StopIteration
        if self._pad_remainder and len(examples) < self._batch_size:
            padding = dict(examples[-1], mask=np.bool_(False))
            examples.extend([padding] * (self._batch_size - len(examples)))
        batch = {key: _stack([example[key] for example in examples]) for key in examples[0]}
        batch["bad_input"] = {kind: np.int32(count) for kind, count in counts.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        # Between batches the parent's position is the whole state; a group read ahead is read again
        # after a restore.
        return self._ahead_state if self._ahead is not None else self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._ahead = self._ahead_state = None
        self._ended = False


class SkipAndBatchIterDataset(grain.IterDataset):
    """Drops `BadInput` markers (counting them by kind into the batch) and stacks examples.

    `kinds` are the counts every batch carries (zero when none was seen), so all batches and all
    hosts report the same keys. `finite`: the parent ends (an eval pass, a fixed number of epochs),
    so each batch is returned once the next one is read and a final group that yields no batch
    hands its skips to the last batch (module docstring); False spares an endless parent that
    read-ahead.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, *, kinds: Sequence[str] = BAD_INPUT_KINDS,
                 drop_remainder: bool, pad_remainder: bool, finite: bool = True):
        super().__init__(parent)
        self._batch_size = batch_size
        self._kinds = tuple(kinds)
        self._drop_remainder = drop_remainder
        self._pad_remainder = pad_remainder
        self._finite = finite

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size, self._kinds, self._drop_remainder,
                                     self._pad_remainder, self._finite)

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
