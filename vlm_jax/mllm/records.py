"""What the corpus pipelines of `vlm_jax.mllm` (recaption, annotate) share: reading a random-access corpus in
batches, resumable sharded output, the pinned manifest, and the batch loop with its progress bar.

    store = ShardStore(directory, "annotations-", array_record=False)
    done, next_shard = scan_finished(store, counts)        # positions already written, and the next number
    reader = BatchedReader(source, data, id_key="id", text_keys={"caption": "caption"}, needs_image=True)
    stats = run_batches(todo, reader.read, process, store, next_shard, shard_size=1024, batch_size=32)

Output shards: `<prefix>NNNNN.jsonl`, one JSON object a line, each carrying the source position ("index") and
"rejected" ("" or the reason); with `array_record=True` an ArrayRecord twin `<prefix>NNNNN.array_record` holds
the same objects. Every file is written under a temporary name and renamed whole, the JSONL first and the
ArrayRecord file last, so a shard is finished exactly when its last file exists. `clean` removes temporary files
and the JSONL of an unfinished shard; a finished shard's positions are skipped by the next run, so a run killed
at any moment and rerun writes every record into exactly one finished shard, once.

Output is written with local file APIs (ArrayRecord, os.replace): directories are local paths.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.files import write_atomic

# -- ids and fields ------------------------------------------------------------------------------------------


def task_schema(name: str, section: Any) -> dict[str, Any]:
    """The fields of a corpus task's config: its `name` section (`section`, with defaults), the MLLM
    section, the captioner experiment (mllm_config), data_dir and cache_dir."""
    from vlm_jax.mllm.config import mllm_config  # noqa: PLC0415

    return {"task": "", "preset": "", name: section, "mllm": mllm_config(), "mllm_config": "", "data_dir": "",
            "cache_dir": ""}


def normalize_id(value: Any) -> str | None:
    """A record id as stored: str (UTF-8 bytes decoded, numpy scalars as their Python value); None stays."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def record_text(value: Any) -> str:
    """A record's text field as one str ("" when absent; the first non-empty entry of a list)."""
    if value is None:
        return ""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else list(value)
    if isinstance(value, (list, tuple)):
        return next((text for text in (record_text(item) for item in value) if text), "")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace").strip()
    return str(value).strip()


def image_key(data: Any) -> str:
    """The record field holding the image, for a data section (its dataset's, else `image_key`)."""
    dataset = pipeline._field(data, "dataset")  # noqa: SLF001 - the pipeline's own field defaults
    if dataset:
        from vlm_jax.data import datasets  # noqa: PLC0415

        return datasets.get(dataset).image_key
    return pipeline._field(data, "image_key") or "image"  # noqa: SLF001


def record_field(raw: bytes, key: str) -> Any:
    """One field of a `vlm_jax.corpus/1` record, skipping the others' values unread (images)."""
    import msgpack  # noqa: PLC0415

    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    for _ in range(unpacker.read_map_header()):
        if unpacker.unpack() == key:
            return unpacker.unpack()
        unpacker.skip()
    return None


def scan_ids(source: Any, id_key: str, chunk: int = 1024) -> list[str | None]:
    """The normalized id of every record of `source` (None where it has none or cannot be read). ArrayRecord
    corpora are read field by field (the image bytes are skipped); other sources record by record, in chunks
    through `__getitems__` where the source has it."""
    from vlm_jax.data.bad_input import BadRecordError  # noqa: PLC0415
    from vlm_jax.data.corpora import ArrayRecordCorpusSource  # noqa: PLC0415

    count = len(source)
    if isinstance(source, ArrayRecordCorpusSource):
        raw = source._records  # noqa: SLF001 - the raw records, so only the id field is unpacked
        ids = []
        for start in range(0, count, chunk):
            for record in raw.__getitems__(list(range(start, min(count, start + chunk)))):
                ids.append(normalize_id(record_field(record, id_key)))
        return ids

    def one(index: int) -> str | None:
        try:
            return normalize_id(source[index].get(id_key))
        except (BadRecordError, OSError, ValueError):
            return None

    if hasattr(source, "__getitems__"):
        ids = []
        for start in range(0, count, chunk):
            indices = list(range(start, min(count, start + chunk)))
            try:
                records = source.__getitems__(indices)
            except (BadRecordError, OSError, ValueError):
                ids.extend(one(index) for index in indices)
                continue
            ids.extend(normalize_id(record.get(id_key)) for record in records)
        return ids
    return [one(index) for index in range(count)]


# -- reading the corpus in batches ---------------------------------------------------------------------------


def open_source(data: Any, limit: int = 0) -> tuple[Any, int]:
    """(the random-access source of a data section, built on first use when embedded; the number of its records
    to process: all, or the first `limit`)."""
    pipeline.prepare_embedded(data)
    source = pipeline.make_source(data)
    return source, len(source) if not limit else min(int(limit), len(source))


@dataclasses.dataclass
class Item:
    """One record as a pipeline sees it: its source position, id, texts by name, decoded image, the record
    itself (`keep_record`), and the reason it is rejected before any model sees it ("" none)."""

    position: int
    id: str | None = None
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    image: np.ndarray | None = None
    record: Mapping[str, Any] | None = None
    reason: str = ""


class BatchedReader:
    """Reads and decodes the records a batch names (on the prefetch thread of `run_batches`).

    A record the source cannot read is rejected "corrupt_record" (its id None), an image that does not decode
    "corrupt_image"; a record without the `id_key` field is a UserError naming `where`."""

    def __init__(self, source: Any, data: Any, *, id_key: str, text_keys: Mapping[str, str] | None = None,
                 needs_image: bool = True, keep_record: bool = False, where: str = "recaption"):
        self.source, self.id_key, self.where = source, id_key, where
        self.text_keys = {name: key for name, key in (text_keys or {}).items() if key}
        self.image_key = image_key(data)
        self.needs_image, self.keep_record = needs_image, keep_record

    def read(self, positions: Sequence[int]) -> list[Item]:
        from vlm_jax.data.bad_input import BadRecordError  # noqa: PLC0415
        from vlm_jax.data.decoding import decode_image  # noqa: PLC0415

        items = []
        for position in positions:
            item = Item(position)
            items.append(item)
            try:
                record = self.source[position]
            except (BadRecordError, OSError, ValueError) as error:
                logging.debug("record %d cannot be read: %s", position, error)
                item.reason = "corrupt_record"
                continue
            if self.id_key not in record:
                raise UserError(f"{self.where}.id_key={self.id_key!r} is not a field of the corpus records (fields: "
                                f"{sorted(record)}); set --config.{self.where}.id_key (Shapes World: 'index').")
            item.id = normalize_id(record[self.id_key])
            item.texts = {name: record_text(record.get(key)) for name, key in self.text_keys.items()}
            if self.keep_record:
                item.record = record
            if self.needs_image:
                try:
                    item.image = decode_image(record.get(self.image_key))
                except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a broken file
                    logging.debug("record %d: the image does not decode: %s", position, error)
                    item.reason = "corrupt_image"
        return items


# -- the output store ----------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


class ShardStore:
    """Finished shards `<prefix>NNNNN.jsonl` (and `.array_record` twins) in a local directory (module docstring)."""

    def __init__(self, directory: str | os.PathLike, prefix: str, *, array_record: bool = True):
        self.directory, self.prefix, self.array_record = os.fspath(directory), prefix, array_record
        self.pattern = re.compile(rf"^{re.escape(prefix)}(\d{{5,}})\.(array_record|jsonl)$")
        self.marker = "array_record" if array_record else "jsonl"  # the file written last

    def paths(self, number: int) -> tuple[str, str]:
        """(the .array_record path, the .jsonl path) of shard `number`."""
        base = os.path.join(self.directory, f"{self.prefix}{number:05d}")
        return f"{base}.array_record", f"{base}.jsonl"

    def finished(self) -> list[int]:
        """The numbers of the finished shards, sorted."""
        if not os.path.isdir(self.directory):
            return []
        numbers = []
        for name in os.listdir(self.directory):
            match = self.pattern.match(name)
            if match and match.group(2) == self.marker:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def read(self, number: int) -> list[dict[str, Any]]:
        """The records of finished shard `number`."""
        array_path, jsonl_path = self.paths(number)
        if self.array_record:
            return read_array_record_shard(array_path)
        with open(jsonl_path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record of every finished shard, shard by shard."""
        for number in self.finished():
            yield from self.read(number)

    def write(self, number: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Shard `number`: the JSONL file, then the ArrayRecord twin, each under a temporary name, renamed whole."""
        array_path, jsonl_path = self.paths(number)
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        write_atomic(jsonl_path, lambda file: file.write("".join(line + "\n" for line in lines)), binary=False)
        if not self.array_record:
            return
        from array_record.python import array_record_module  # noqa: PLC0415

        temporary = f"{array_path}.tmp-{uuid.uuid4().hex}"
        try:
            writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
            try:
                for line in lines:
                    writer.write(line.encode("utf-8"))
            finally:
                writer.close()
            _fsync(temporary)
            os.replace(temporary, array_path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def clean(self) -> None:
        """Removes temporary files and the JSONL files of unfinished shards (an interrupted shard), and writes the
        JSONL of a finished shard that lacks one."""
        finished = set(self.finished())
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            match = self.pattern.match(name)
            if ".tmp-" in name:
                os.remove(path)
            elif match and match.group(2) == "jsonl" and int(match.group(1)) not in finished:
                logging.info("Removing %s: its shard was interrupted before it was finished.", path)
                os.remove(path)
        for number in finished if self.array_record else ():
            array_path, jsonl_path = self.paths(number)
            if not os.path.exists(jsonl_path):
                lines = [json.dumps(record, ensure_ascii=False) + "\n"
                         for record in read_array_record_shard(array_path)]
                write_atomic(jsonl_path, lambda file, lines=lines: file.write("".join(lines)), binary=False)


def read_array_record_shard(path: str) -> list[dict[str, Any]]:
    """The records of one finished .array_record shard."""
    from array_record.python import array_record_module  # noqa: PLC0415

    reader = array_record_module.ArrayRecordReader(path)
    try:
        return [json.loads(raw) for raw in reader.read_all()]
    finally:
        reader.close()


def new_counts() -> dict[str, Any]:
    """Counters `tally` updates: written, kept, rejected {reason: count}."""
    return {"written": 0, "kept": 0, "rejected": {}}


def tally(counts: dict[str, Any], record: Mapping[str, Any]) -> None:
    """Counts one output record (its "rejected" reason, or kept)."""
    counts["written"] += 1
    if record["rejected"]:
        counts["rejected"][record["rejected"]] = counts["rejected"].get(record["rejected"], 0) + 1
    else:
        counts["kept"] += 1


def scan_finished(store: ShardStore, count: Callable[[Mapping[str, Any]], None]) -> tuple[set[int], int]:
    """(the source positions in the finished shards, the next shard number); `count` sees every record. A
    position in two shards is a UserError (the directory was written by something else)."""
    done: set[int] = set()
    numbers = store.finished()
    for number in numbers:
        for record in store.read(number):
            if record["index"] in done:
                raise UserError(f"{store.directory}: source position {record['index']} is in more than one shard; "
                                "the directory was written by something else. Use a new output directory.")
            done.add(record["index"])
            count(record)
    return done, (numbers[-1] + 1) if numbers else 0


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path`, atomically."""
    write_atomic(path, lambda file: file.write(json.dumps(value, indent=2, sort_keys=True) + "\n"), binary=False)


def pin_manifest(directory: str, filename: str, current: Mapping[str, Any], what: str) -> None:
    """Writes the settings that decide the output's content on the first run; a later run with other settings
    is a UserError naming the first that differs (`what`: the kind of output, for the message)."""
    path = os.path.join(directory, filename)
    current = json.loads(json.dumps(current))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            pinned = json.load(file)
        for name in sorted(set(pinned) | set(current)):
            if pinned.get(name) != current.get(name):
                raise UserError(f"{directory} holds {what} made with {name}={pinned.get(name)!r}, and this run "
                                f"has {current.get(name)!r}; use another output directory, or delete {directory} "
                                "to start over.")
        return
    write_json(path, current)


def data_manifest(data: Any) -> dict[str, Any]:
    """The fields of a data section that decide which records a corpus holds (for a pinned manifest)."""
    return {name: pipeline._field(data, name)  # noqa: SLF001 - the pipeline's own field defaults
            for name in ("source", "dataset", "tfds_name", "split", "paths", "root", "image_key", "image_path_key")}


@dataclasses.dataclass
class Plan:
    """An opened corpus and output directory: the source, the records to process, those left to do, the counts
    of the finished shards and the next shard's number."""

    source: Any
    total: int
    todo: list[int]
    counts: dict[str, Any]
    next_shard: int


def plan_run(data: Any, limit: int, store: ShardStore, manifest_file: str, manifest: Mapping[str, Any], what: str,
             *, counts: dict[str, Any] | None = None,
             count: Callable[[dict[str, Any], Mapping[str, Any]], None] = tally) -> Plan:
    """Opens the corpus of `data` (its first `limit` records; 0 all) and the output directory: pins `manifest`
    (`pin_manifest`), cleans up an interrupted shard, and counts the finished shards' records into `counts`
    (default `new_counts()`) with `count(counts, record)`."""
    source, total = open_source(data, limit)
    os.makedirs(store.directory, exist_ok=True)
    pin_manifest(store.directory, manifest_file, manifest, what)
    store.clean()
    counts = new_counts() if counts is None else counts
    done, next_shard = scan_finished(store, lambda record: count(counts, record))
    todo = [position for position in range(total) if position not in done]
    return Plan(source, total, todo, counts, next_shard)


# -- the batch loop ------------------------------------------------------------------------------------------


def describe(model: Any) -> str:
    """A model's repr, or its class name when it has none of its own."""
    return repr(model) if type(model).__repr__ is not object.__repr__ else type(model).__name__


def failures(mllm: Any) -> int:
    """Requests the backend counted as failed so far (`counts["failed/..."]` of the HTTP client; 0 for others)."""
    counts = getattr(mllm, "counts", None)
    if not isinstance(counts, Mapping):
        return 0
    return sum(int(value) for name, value in counts.items() if str(name).startswith("failed/"))


def build(model: Any, method: str = "generate") -> Any:
    """`model` itself when it has `method`, else the model the zero-argument callable `model` returns."""
    return model() if not hasattr(model, method) and callable(model) else model


def generate_checked(mllm: Any, images: Sequence[Any], prompts: Sequence[str],
                     max_tokens: int) -> tuple[list[str], bool]:
    """(one answer per prompt, whether a request failed during the call: an empty answer then means a lost
    request, to be retried, not an empty caption). No prompts: no call."""
    if not prompts:
        return [], False
    before = failures(mllm)
    texts = list(mllm.generate(list(images), list(prompts), int(max_tokens)))
    if len(texts) != len(prompts):
        raise RuntimeError(f"the MLLM answered {len(texts)} of {len(prompts)} prompts")
    return texts, failures(mllm) > before


@dataclasses.dataclass
class RunStats:
    """What one run did: items processed, answers failed (not written), seconds, shards written."""

    processed: int = 0
    failed: int = 0
    seconds: float = 0.0
    shards: int = 0

    @property
    def items_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def run_batches(todo: Sequence[int], read: Callable[[Sequence[int]], list[Item]],
                process: Callable[[list[Item]], tuple[list[dict[str, Any]], int]], store: ShardStore,
                next_shard: int, *, shard_size: int, batch_size: int, counts: dict[str, Any],
                count: Callable[[Mapping[str, Any]], None], progress: bool = True, desc: str = "") -> RunStats:
    """Processes the positions `todo` in batches of `batch_size`, `shard_size` per shard numbered from
    `next_shard`: `read` (on a background thread, one batch ahead) then `process` (-> the batch's output
    records, the number of items left out to retry) and, per finished shard, `store.write` then `count` of each
    record. A tqdm bar (items/s, ETA) shows kept and rejected from `counts` when `progress`."""
    from tqdm import tqdm  # noqa: PLC0415

    stats = RunStats()
    if not todo:
        return stats
    shards = [todo[start:start + shard_size] for start in range(0, len(todo), shard_size)]
    batches = [(shard, positions[start:start + batch_size]) for shard, positions in enumerate(shards)
               for start in range(0, len(positions), batch_size)]
    number = next_shard
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{desc or 'pipeline'}-read") as pool, \
            tqdm(total=len(todo), desc=desc, unit="items", disable=not progress, dynamic_ncols=True) as bar:
        future = pool.submit(read, batches[0][1])
        records: list[dict[str, Any]] = []
        for position, (shard, _) in enumerate(batches):
            items = future.result()
            if position + 1 < len(batches):
                future = pool.submit(read, batches[position + 1][1])
            batch_records, batch_failed = process(items)
            records.extend(batch_records)
            stats.failed += batch_failed
            stats.processed += len(items)
            bar.update(len(items))
            last = position + 1 == len(batches) or batches[position + 1][0] != shard
            if last and records:
                store.write(number, records)
                for record in records:
                    count(record)
                number += 1
                stats.shards += 1
                records = []
            bar.set_postfix(kept=counts["kept"], rejected=sum(counts["rejected"].values()), refresh=False)
    stats.seconds = time.perf_counter() - started
    return stats


__all__ = ["BatchedReader", "Item", "Plan", "RunStats", "ShardStore", "build", "data_manifest", "describe",
           "failures", "generate_checked", "image_key", "new_counts", "normalize_id", "open_source", "pin_manifest",
           "plan_run", "read_array_record_shard", "record_field", "record_text", "run_batches", "scan_finished",
           "scan_ids", "tally", "write_json"]
