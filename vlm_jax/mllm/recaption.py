"""Recaptioning a corpus with an MLLM (Stone et al.'s recaptioned-data CLIP; LaCLIP-style rewriting).

    config.recaption = recaption_config()      # the corpus (`data`), the mode, prompts, filters
    summary = recaption(config.recaption, make_backend(config.mllm), "/out/recaptions")
    texts = read_recaptions("/out/recaptions")                        # id -> kept recaption
    source = RecaptionedSource(make_source(data), texts, id_key="id", fallback_key="caption")

Modes (`recaption.mode`):
  grounded    the image, with its alt-text (and page title, `title_key`) in the prompt: Stone et al.'s
              setting, where the MLLM describes the image and may use the web text for names and facts.
  ungrounded  the image only (the embedded Shapes World captioner is trained on "Describe the image.";
              `shapes_world_recaption_config` sets that prompt).
  rewrite     text only: the alt-text rewritten by a language model, no image (LaCLIP). Requests carry no
              image part, so this needs an OpenAI-compatible text LM endpoint (`mllm.backend="openai"`); the
              embedded captioner needs an image and is refused up front.

Prompt templates (`prompts.<mode>`) take `{alt_text}` and `{title}`; a part in square brackets is kept only
when every placeholder inside it has text (`"Describe this image.[ Its alt-text is: {alt_text}.]"` reads
"Describe this image." for a record without alt-text). Braces and brackets in the texts themselves are
never interpreted.

Output (`output_dir`):
  recaptions-00000.array_record, recaptions-00000.jsonl, ...   finished shards: each ArrayRecord record is
      one UTF-8 JSON object {"id": str or null, "index": source position, "recaption": text or null,
      "rejected": "" or the reason, "source_text": the alt-text used}; the .jsonl twin holds the same
      objects, one a line, in the same order.
  recaption.json   the settings that decide the content (mode, prompt, max_tokens, filters, keys, corpus),
      pinned by the first run: a resumed run with other settings is a UserError. batch_size, limit,
      shard_size and progress may change between runs.
  summary.json     written last: written, kept, rejected {reason: count} (all recomputable from the shards,
      `summarize`), failed (this run's answers lost to request failures, not written, retried by the next
      run), remaining, items_per_s (this run), mode, backend, total, shards, seconds.

Resuming: every shard is written under a temporary name and renamed into place, the JSONL twin first and the
ArrayRecord file last, so a shard exists exactly when its .array_record does. A run reads the source positions
already in finished shards and skips them; a twin without its .array_record (a run killed between the two
renames) and temporary files are removed. Killed at any moment and rerun, every record ends up in exactly one
finished shard, once. Rejected records are written too (with `recaption` null), so a rerun never retries them.

Rejection reasons: the quality filters' (`quality_reason`: empty, too_short, too_long, repetitive, refusal,
script), corrupt_image (the image does not decode, or is missing), corrupt_record (the source cannot read the
record; its id is then null), no_source_text (rewrite mode, a record without alt-text). An empty answer from a
backend whose request failed during that call (`counts["failed/..."]` of the HTTP client rose) is not a
rejection: it is counted as failed, left out of the shard, and retried by the next run.

Throughput: the next batch's records are read and decoded on a background thread while the backend generates
the current one. The HTTP backend runs `mllm.concurrency` requests at a time within one `generate` call, so
with `mllm.backend="openai"` keep `recaption.batch_size >= mllm.concurrency` (a smaller batch leaves
request slots idle); the embedded backend runs `mllm.batch_size` images per jitted call.

Output is written with local file APIs (ArrayRecord, os.replace): `output_dir` is a local path. The corpus
reader, the shard store and the batch loop are `vlm_jax.mllm.records`', shared with `vlm_jax.mllm.annotate`.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from vlm_jax.config_lib import ConfigError, check_fields, require_data_files, require_path
from vlm_jax.data import pipeline
from vlm_jax.mllm.records import (BatchedReader, Item, Plan, RunStats, ShardStore, build, data_manifest, describe,
                                  generate_checked, new_counts, normalize_id, plan_run, read_array_record_shard,
                                  record_text, run_batches, scan_ids, tally, write_json)
from vlm_jax.mllm.records import task_schema as corpus_task_schema

MODES = ("grounded", "ungrounded", "rewrite")
PLACEHOLDERS = ("alt_text", "title")
REASONS = ("empty", "too_short", "too_long", "repetitive", "refusal", "script", "corrupt_image", "corrupt_record",
           "no_source_text")
SHARD_PREFIX = "recaptions-"
SHARD_PATTERN = ShardStore("", SHARD_PREFIX).pattern  # recaptions-NNNNN.array_record / .jsonl
MANIFEST_FILE = "recaption.json"
SUMMARY_FILE = "summary.json"
SHAPES_WORLD_PROMPT = "Describe the image."  # the prompt the embedded Shapes World captioner is trained on

DEFAULT_PROMPTS = {
    "grounded": "Describe this image in detail.[ Its alt-text is: {alt_text}.][ Its page title is: {title}.] "
                "Use the alt-text and title only where the image agrees with them.",
    "ungrounded": "Describe this image in detail.",
    "rewrite": "Rewrite the following image caption in other words, keeping its meaning and every detail it "
               "states and adding none. Answer with the new caption only.[ Page title: {title}.] "
               "Caption: {alt_text}",
}
DEFAULT_REFUSALS = ("i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "as an ai", "unable to")


def filters_config() -> ml_collections.ConfigDict:
    """`recaption.filters`: when a generated caption is rejected (`quality_reason`)."""
    return ml_collections.ConfigDict({
        "min_words": 3,  # fewer whitespace-separated words: "too_short"
        "max_words": 300,  # more: "too_long" (0: no limit)
        "repeat_ngram": 3,  # n of the word n-grams the repetition check counts (3: trigrams)
        # Share of the caption's word n-grams that repeat an earlier one (1 - distinct / all); above it the
        # caption is degenerate ("repetitive"). 1.0 disables.
        "max_repeat_fraction": 0.5,
        # Lowercased phrases that mark a refusal, matched as whole words anywhere in the caption ("refusal").
        "refusal_phrases": DEFAULT_REFUSALS,
        # Share of ASCII letters among the caption's letters below which it is rejected ("script"). A script
        # check for Latin-script (e.g. English) training text, not a language identifier: French passes,
        # Russian or Chinese does not. 0 disables.
        "min_ascii_fraction": 0.5,
    })


def recaption_config() -> ml_collections.ConfigDict:
    """The `config.recaption` section with every field and its default."""
    data = pipeline.default_config()
    data.shuffle = False  # read in order (the pipeline's data section; only the source fields matter here)
    return ml_collections.ConfigDict({
        "mode": "grounded",  # "grounded" (image + alt-text/title) | "ungrounded" (image) | "rewrite" (text only)
        "data": data,  # the corpus: a `vlm_jax.data.pipeline.default_config()` section (source, paths/tfds, ...)
        "id_key": "id",  # the record field naming it (Shapes World: "index"); stored as str
        "alt_text_key": "caption",  # the record's alt-text field (Shapes World: "weak_caption")
        "title_key": "",  # the record's page-title field ("" none)
        # One template per mode; {alt_text} and {title} are filled in, [...] parts dropped when theirs are empty.
        "prompts": dict(DEFAULT_PROMPTS),
        "max_tokens": 128,  # the longest answer generated
        "batch_size": 64,  # records per backend call (HTTP backends: keep >= mllm.concurrency)
        "shard_size": 1024,  # records per output shard (the unit of resumption)
        "limit": 0,  # 0: the whole corpus; else its first `limit` records
        "filters": filters_config(),
        "progress": True,  # a tqdm bar (items/s and ETA)
    })


def shapes_world_recaption_config(tfds_name: str = "shapes_world/default", split: str = "pretrain",
                                  data_dir: str | None = None) -> ml_collections.ConfigDict:
    """`recaption_config()` for a Shapes World split and the embedded captioner: ids from "index", the
    alt-text from "weak_caption", mode ungrounded with the captioner's training prompt."""
    config = recaption_config()
    config.data.update(source="tfds", tfds_name=tfds_name, split=split, data_dir=data_dir)
    config.update(mode="ungrounded", id_key="index", alt_text_key="weak_caption")
    config.prompts.ungrounded = SHAPES_WORLD_PROMPT
    return config


# -- prompts -------------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"(\[[^\[\]]*\])")


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(template: str, where: str) -> None:
    """A one-line ConfigError when `template` has a placeholder other than {alt_text}/{title}, nested or
    unbalanced brackets, or does not format."""
    if not isinstance(template, str):
        raise ConfigError(f"{where} must be a string template, got {template!r}.")
    outside = _SEGMENT.sub("", template)
    if "[" in outside or "]" in outside:
        raise ConfigError(f"{where} has unbalanced or nested [...] parts; optional parts are [text {{alt_text}}] "
                          "and cannot nest.")
    try:
        unknown = sorted(set(_fields(template)) - set(PLACEHOLDERS))
        if unknown:
            raise ConfigError(f"{where} has placeholder {{{unknown[0]}}}; templates take {{alt_text}} and {{title}}.")
        template.format(**{name: "" for name in PLACEHOLDERS})
    except (ValueError, KeyError, IndexError, AttributeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where} is not a valid template ({type(error).__name__}: {error}); use {{alt_text}} "
                          "and {title}, and {{ }} for literal braces.") from None


def render_prompt(template: str, alt_text: str = "", title: str = "") -> str:
    """The prompt `template` gives for a record: placeholders filled in, [...] parts dropped when a
    placeholder inside them is empty, brackets of the kept parts removed."""
    values = {"alt_text": alt_text or "", "title": title or ""}
    pieces = []
    for part in _SEGMENT.split(template):
        if part.startswith("[") and part.endswith("]"):
            part = part[1:-1]
            if any(not values[name] for name in _fields(part)):
                continue
        pieces.append(part.format(**values))
    return "".join(pieces).strip()


# -- quality filters -----------------------------------------------------------------------------------------


def _get(section: Any, name: str) -> Any:
    return section[name] if name in section else filters_config()[name]


def repeat_fraction(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` (lowercased words) that repeat an earlier one: 1 - distinct/all;
    0 when it has no n-gram."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def ascii_fraction(text: str) -> float:
    """Share of ASCII letters among the letters of `text` (1 when it has none)."""
    letters = [char for char in text if char.isalpha()]
    return sum(char.isascii() for char in letters) / len(letters) if letters else 1.0


def quality_reason(text: str | None, filters: Any) -> str:
    """"" when the caption passes `filters` (a `filters_config()` section or mapping), else the first failing
    check's reason, in this order: "empty" (nothing but whitespace), "refusal", "script", "too_short",
    "too_long", "repetitive"."""
    text = (text or "").strip()
    if not text:
        return "empty"
    lowered = text.lower().replace("\u2019", "'")
    for phrase in _get(filters, "refusal_phrases") or ():
        phrase = str(phrase).strip().lower()
        if phrase and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", lowered):
            return "refusal"
    minimum = float(_get(filters, "min_ascii_fraction"))
    if minimum > 0 and ascii_fraction(text) < minimum:
        return "script"
    words = len(text.split())
    if words < int(_get(filters, "min_words")):
        return "too_short"
    if int(_get(filters, "max_words")) and words > int(_get(filters, "max_words")):
        return "too_long"
    if repeat_fraction(text, int(_get(filters, "repeat_ngram"))) > float(_get(filters, "max_repeat_fraction")):
        return "repetitive"
    return ""


# -- config checks -------------------------------------------------------------------------------------------


def check_recaption_section(section: Any, where: str = "recaption") -> None:
    """Checks a `recaption_config()` section: every field known, values in range, the templates, and that
    the corpus files exist (and a prepared TFDS split opens). One-line ConfigErrors."""
    check_fields(section, recaption_config(), where)
    section = _as_config(section)
    if section.mode not in MODES:
        raise ConfigError(f"{where}.mode={section.mode!r} is not a mode; expected one of {list(MODES)}.")
    for name in ("max_tokens", "batch_size", "shard_size"):
        if isinstance(section[name], bool) or not isinstance(section[name], int) or section[name] < 1:
            raise ConfigError(f"{where}.{name} must be a positive integer, got {section[name]!r}.")
    if isinstance(section.limit, bool) or not isinstance(section.limit, int) or section.limit < 0:
        raise ConfigError(f"{where}.limit must be 0 (the whole corpus) or a positive integer, got {section.limit!r}.")
    if not section.id_key:
        raise ConfigError(f"{where}.id_key is empty; name the record field holding each record's id.")
    if section.mode in ("grounded", "rewrite") and not section.alt_text_key:
        raise ConfigError(f"{where}.mode={section.mode!r} reads the alt-text, but {where}.alt_text_key is empty; "
                          f"set it, or use mode 'ungrounded'.")
    for mode in MODES:
        check_template(section.prompts[mode], f"{where}.prompts.{mode}")
    if section.mode == "rewrite" and "alt_text" not in _fields(section.prompts.rewrite):
        raise ConfigError(f"{where}.prompts.rewrite has no {{alt_text}}; a rewrite prompt must carry the alt-text.")
    filters = section.filters
    for name in ("min_words", "max_words", "repeat_ngram"):
        if isinstance(filters[name], bool) or not isinstance(filters[name], int) or filters[name] < 0:
            raise ConfigError(f"{where}.filters.{name} must be a non-negative integer, got {filters[name]!r}.")
    if filters.repeat_ngram < 1:
        raise ConfigError(f"{where}.filters.repeat_ngram must be >= 1, got {filters.repeat_ngram}.")
    if filters.max_words and filters.max_words < filters.min_words:
        raise ConfigError(f"{where}.filters.max_words={filters.max_words} is below min_words={filters.min_words}.")
    for name in ("max_repeat_fraction", "min_ascii_fraction"):
        value = filters[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{where}.filters.{name} must be a number in [0, 1], got {value!r}.")
    phrases = filters.refusal_phrases
    if isinstance(phrases, str) or not all(isinstance(phrase, str) for phrase in phrases or ()):
        raise ConfigError(f"{where}.filters.refusal_phrases must be a tuple of strings, got {phrases!r}.")
    require_data_files(section.data, f"{where}.data")
    pipeline.check_source(section.data, f"{where}.data")


def task_schema() -> dict[str, Any]:
    """The fields of a `recaption` task config."""
    return corpus_task_schema("recaption", recaption_config())


def check_recaption_config(config: Any) -> None:
    """Checks a whole `recaption` task config up front (`task_schema`): every field, the recaption section, the
    MLLM section, and that the backend can do the mode: "rewrite" needs an OpenAI-compatible text LM endpoint
    (the embedded captioner needs an image); the embedded backend needs mllm.model_dir or an mllm_config that
    trains one; the openai backend a base_url."""
    from vlm_jax.mllm.config import parse_mllm  # noqa: PLC0415

    check_fields(config, task_schema())
    mllm = parse_mllm(config.mllm)
    section = _task_section(config)
    check_recaption_section(section)
    if mllm.backend == "embedded" and section.mode == "rewrite":
        raise ConfigError("recaption.mode='rewrite' is text-only and the embedded captioner needs an image; use "
                          "an openai-compatible text LM endpoint (--config.mllm.backend=openai "
                          "--config.mllm.base_url=http://HOST:PORT/v1).")
    check_task_mllm(config, "recaption", section.batch_size)


def check_task_mllm(config: Any, where: str, batch_size: int) -> Any:
    """The parsed `config.mllm` of a corpus task, checked: the embedded backend needs mllm.model_dir (an export)
    or an mllm_config that trains one; the openai backend a base_url (a `where`.batch_size below its concurrency
    is warned about). One-line ConfigErrors."""
    from vlm_jax.mllm.config import parse_mllm  # noqa: PLC0415

    mllm = parse_mllm(config.mllm)
    if mllm.backend == "embedded":
        if mllm.model_dir:
            require_path(mllm.model_dir, "mllm.model_dir", field="mllm.model_dir", containing=("captioner.json",))
        elif not config.get("mllm_config"):
            raise ConfigError("the embedded backend needs a captioner: pass --config.mllm.model_dir=DIR (an "
                              "experiments/captioner.py export) or --config.mllm_config=experiments/captioner.py.")
    elif not mllm.base_url:
        raise ConfigError("mllm.backend='openai' needs --config.mllm.base_url=http://HOST:PORT/v1 (and mllm.model).")
    elif batch_size < mllm.concurrency:
        logging.warning("%s.batch_size=%d is below mllm.concurrency=%d: each call leaves request slots idle; "
                        "raise %s.batch_size.", where, batch_size, mllm.concurrency, where)
    return mllm


def _task_section(config: Any) -> ml_collections.ConfigDict:
    """The task's recaption section, its corpus's data_dir the task's `data_dir` when it sets none."""
    section = _as_config(config.recaption)
    if not section.data.data_dir and config.get("data_dir"):
        section.data.data_dir = config.data_dir
    return section


def _as_config(section: Any) -> ml_collections.ConfigDict:
    """A recaption section (ConfigDict or mapping, possibly partial) over `recaption_config()`'s defaults."""
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    config = recaption_config()
    config.update(ml_collections.ConfigDict(values))
    return config


# -- reading the corpus --------------------------------------------------------------------------------------


def _read(reader: BatchedReader, mode: str, positions: Sequence[int]) -> list[Item]:
    """The batch's records; in rewrite mode a record without alt-text is rejected "no_source_text"."""
    items = reader.read(positions)
    for item in items:
        if mode == "rewrite" and not item.reason and not item.texts.get("alt_text"):
            item.reason = "no_source_text"
    return items


# -- the output store ----------------------------------------------------------------------------------------


def _store(directory: str | os.PathLike) -> ShardStore:
    return ShardStore(directory, SHARD_PREFIX)


def shard_paths(directory: str | os.PathLike, number: int) -> tuple[str, str]:
    """(the .array_record path, the .jsonl path) of shard `number`."""
    return _store(directory).paths(number)


def finished_shards(directory: str | os.PathLike) -> list[int]:
    """The numbers of the finished shards (those whose .array_record exists), sorted."""
    return _store(directory).finished()


read_shard = read_array_record_shard  # the records of one finished .array_record shard


def iter_records(directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every record of every finished shard, shard by shard."""
    return _store(directory).records()


def summarize(directory: str | os.PathLike) -> dict[str, Any]:
    """written, kept and rejected {reason: count} recomputed from the finished shards."""
    counts = new_counts()
    for record in iter_records(directory):
        tally(counts, record)
    return {"written": counts["written"], "kept": counts["kept"], "rejected": dict(sorted(counts["rejected"].items()))}


def read_recaptions(directory: str | os.PathLike) -> dict[str, str]:
    """id -> recaption of every kept record of the finished shards in `directory`."""
    return {record["id"]: record["recaption"] for record in iter_records(directory)
            if not record["rejected"] and record["id"] is not None}


def _manifest(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that decide the output's content."""
    return {"mode": section.mode, "prompt": section.prompts[section.mode], "max_tokens": int(section.max_tokens),
            "id_key": section.id_key, "alt_text_key": section.alt_text_key, "title_key": section.title_key,
            "filters": section.filters.to_dict(), "data": data_manifest(section.data)}


# -- the pipeline --------------------------------------------------------------------------------------------


def _plan(section: ml_collections.ConfigDict, directory: str) -> Plan:
    """Opens the corpus and the output directory: what is done, what is left."""
    return plan_run(section.data, int(section.limit), _store(directory), MANIFEST_FILE, _manifest(section),
                    "recaptions")


def pending(section: Any, directory: str | os.PathLike) -> int:
    """How many records of the corpus `section` names are not yet in a finished shard of `directory`."""
    section = _as_config(section)
    check_recaption_section(section)
    return len(_plan(section, os.fspath(directory)).todo)


def _generate(mllm: Any, items: list[Item], section: ml_collections.ConfigDict) -> tuple[list[dict], int]:
    """(the output records of one batch, the number of items whose request failed: left out, retried later)."""
    template = section.prompts[section.mode]
    ready = [item for item in items if not item.reason]
    prompts = [render_prompt(template, item.texts.get("alt_text", ""), item.texts.get("title", "")) for item in ready]
    texts, failed_during = generate_checked(mllm, [item.image for item in ready], prompts, section.max_tokens)
    answers = {id(item): text for item, text in zip(ready, texts)}
    records, failed = [], 0
    for item in items:
        text = (answers.get(id(item)) or "").strip()
        if item.reason:
            reason = item.reason
        elif not text and failed_during:
            failed += 1
            continue
        else:
            reason = quality_reason(text, section.filters)
        records.append({"id": item.id, "index": item.position, "recaption": None if reason else text,
                        "rejected": reason, "source_text": item.texts.get("alt_text", "")})
    return records, failed


def recaption(config: Any, mllm: Any, output_dir: str | os.PathLike, *, backend: str = "") -> dict[str, Any]:
    """Recaptions the corpus of a `recaption_config()` section into `output_dir` (resumable; see the module
    docstring) and returns the summary (also in summary.json).

    `mllm` is an MLLM (`generate(images, prompts, max_tokens)`; in rewrite mode every image is None) or a
    zero-argument callable returning one, called only when there is something left to do. `backend` describes
    it in the summary (default: its repr)."""
    section = _as_config(config)
    check_recaption_section(section)
    directory = os.fspath(output_dir)
    if "://" in directory:
        raise ConfigError(f"the recaption output {directory!r} must be a local directory.")
    plan = _plan(section, directory)
    logging.info("Recaption %s: %d of %d records to do (%d already in %d shards), mode %s.", directory,
                 len(plan.todo), plan.total, plan.total - len(plan.todo), plan.next_shard, section.mode)
    counts, stats = plan.counts, RunStats()
    if plan.todo:
        mllm = build(mllm)
        backend = backend or describe(mllm)
        reader = BatchedReader(plan.source, section.data, id_key=section.id_key, where="recaption",
                               text_keys={"alt_text": section.alt_text_key, "title": section.title_key},
                               needs_image=section.mode != "rewrite")
        stats = run_batches(plan.todo, lambda positions: _read(reader, section.mode, positions),
                            lambda items: _generate(mllm, items, section), _store(directory), plan.next_shard,
                            shard_size=section.shard_size, batch_size=section.batch_size, counts=counts,
                            count=lambda record: tally(counts, record), progress=section.progress, desc="recaption")
        if stats.failed:
            logging.warning("Recaption: %d answers were lost to failed requests; they are not written, and rerunning "
                            "the same command retries them.", stats.failed)
    failed, processed = stats.failed, stats.processed
    summary = {
        "written": counts["written"], "kept": counts["kept"], "rejected": dict(sorted(counts["rejected"].items())),
        "failed": failed, "remaining": len(plan.todo) - (processed - failed), "total": plan.total,
        "items_per_s": stats.items_per_s, "seconds": stats.seconds, "mode": section.mode,
        "backend": backend or (describe(mllm) if hasattr(mllm, "generate") else ""),
        "shards": len(finished_shards(directory)),
    }
    write_json(os.path.join(directory, SUMMARY_FILE), summary)
    return summary


def summary_line(summary: Mapping[str, Any], directory: str | os.PathLike = "") -> str:
    """One line: kept / rejected by reason / items/s (and where)."""
    rejected = summary["rejected"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1]))
    line = (f"recaption ({summary['mode']}): {summary['kept']} kept, {sum(rejected.values())} rejected"
            f"{f' ({reasons})' if reasons else ''} of {summary['written']} written, "
            f"{summary['items_per_s']:.2f} items/s")
    if summary.get("failed"):
        line += f"; {summary['failed']} failed requests (rerun to retry)"
    return f"{line} -> {directory}" if directory else line


def describe_backend(mllm_section: Any) -> str:
    """A description of an `mllm` section's backend, for the summary (never the API key)."""
    section = mllm_section.to_dict() if hasattr(mllm_section, "to_dict") else dict(mllm_section)
    if section.get("backend", "embedded") == "embedded":
        return f"embedded model_dir={section.get('model_dir', '')!r}"
    return f"openai base_url={section.get('base_url', '')!r} model={section.get('model', '')!r}"


def recaption_dir(config_section: Any, mllm_section: Any, directory: str | os.PathLike) -> str:
    """A cached stage: recaptions into `directory` with the backend of `mllm_section` (built only when something
    is left to do) and returns the directory, for `read_recaptions` / `RecaptionedSource`."""
    from vlm_jax.mllm import make_backend  # noqa: PLC0415

    section = mllm_section.to_dict() if hasattr(mllm_section, "to_dict") else dict(mllm_section)
    recaption(config_section, lambda: make_backend(section), directory, backend=describe_backend(section))
    return os.fspath(directory)


def task_backend(config: Any) -> tuple[Any, str]:
    """(a zero-argument callable building the MLLM of a corpus task's `config.mllm`, its description). With the
    embedded backend and no mllm.model_dir, the callable first trains (once, cached) the captioner of
    `config.mllm_config`."""
    from vlm_jax.mllm import make_backend  # noqa: PLC0415

    mllm_section = config.mllm.to_dict()
    trained = mllm_section["backend"] == "embedded" and not mllm_section["model_dir"]
    description = (f"embedded, the captioner of mllm_config={config.mllm_config!r}" if trained
                   else describe_backend(mllm_section))

    def build_backend():
        if trained:
            from vlm_jax.methods import runner  # noqa: PLC0415

            mllm_section["model_dir"] = runner.captioner_dir(config)
        return make_backend(mllm_section)

    return build_backend, description


def recaption_task(config: Any, workdir: Any) -> dict[str, float]:
    """The `recaption` task: config.recaption (`recaption_config()`), config.mllm (the MLLM section),
    mllm_config (an experiments/captioner.py config that trains the embedded captioner when mllm.model_dir is
    empty), data_dir (the corpus's TFDS data_dir when recaption.data.data_dir is unset), cache_dir. Writes
    <workdir>/recaptions and prints the summary line."""
    check_recaption_config(config)
    section = _task_section(config)
    directory = os.path.join(os.fspath(workdir), "recaptions")
    build, description = task_backend(config)
    summary = recaption(section, build, directory, backend=description)
    print(summary_line(summary, directory), flush=True)
    metrics = {f"recaption/{name}": float(summary[name]) for name in ("written", "kept", "failed", "items_per_s")}
    metrics.update({f"recaption/rejected/{reason}": float(count) for reason, count in summary["rejected"].items()})
    return metrics


# -- reading recaptions back ---------------------------------------------------------------------------------


class RecaptionedSource:
    """A random-access source whose records gain field `key`: the record's kept recaption, else its
    `fallback_key` text ("" when neither). The record's own fields stay, so a decoder may draw from both
    (`text_keys=("recaption", "caption")` with `text_weights`: Stone et al.'s mix of recaptions and alt-text).

    `recaptions`: id -> text (`read_recaptions`) or a recaption output directory. The ids are scanned once
    at construction (`scan_ids`); `fallbacks` (also `missing`) counts the records without a kept recaption,
    and `recaptioned` those with one."""

    def __init__(self, source: Any, recaptions: Mapping[str, str] | str | os.PathLike, id_key: str = "id",
                 key: str = "recaption", fallback_key: str | None = "caption"):
        if isinstance(recaptions, (str, os.PathLike)):
            recaptions = read_recaptions(recaptions)
        self.source, self.id_key, self.key, self.fallback_key = source, id_key, key, fallback_key
        self._ids = scan_ids(source, id_key)
        self._texts = [recaptions.get(identifier) if identifier is not None else None for identifier in self._ids]
        self.recaptioned = sum(text is not None for text in self._texts)
        self.fallbacks = len(self._texts) - self.recaptioned

    @property
    def missing(self) -> int:
        return self.fallbacks

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self.source[index])
        text = self._texts[int(index)]
        if text is None:
            text = record_text(record.get(self.fallback_key)) if self.fallback_key else ""
        record[self.key] = text
        return record

    def __repr__(self) -> str:
        return (f"RecaptionedSource({self.source!r}, {self.recaptioned} recaptioned, {self.fallbacks} falling back to "
                f"{self.fallback_key!r})")


__all__ = ["MODES", "REASONS", "RecaptionedSource", "check_recaption_config", "check_recaption_section",
           "filters_config", "normalize_id", "pending", "quality_reason", "read_recaptions", "recaption",
           "recaption_config", "recaption_dir", "recaption_task", "render_prompt", "scan_ids",
           "shapes_world_recaption_config", "summarize", "summary_line"]
