"""RAR: Retrieving And Ranking augmented MLLMs for fine-grained recognition (Liu et al.; IEEE TIP 2025).

A frozen CLIP gives recall, an MLLM precision:
1. Retrieve. The CLIP embeds the image and searches a memory (`vlm_jax.memory.index`): few-shot,
   the image embeddings of N shots per class (value: the label); zero-shot, the class names' text
   embeddings (image -> text). The k nearest entries' class names, duplicates removed in rank
   order, are the candidates; the nearest one is CLIP+kNN's answer.
2. Rank. The MLLM sees the image and the candidates and sorts them (the paper's prompt, a JSON
   schema where the server can force one); the answer is parsed by `vlm_jax.mllm.answers`, which
   never reuses or drops a name silently: every fallback is counted. Scoring mode: the MLLM's
   log-likelihood of each name (`MLLM.score`) ranks them, no parser.
3. Regions (the paper's detection setting with given boxes): each box cropped with a scale that
   grows as the box shrinks and blurred outside it (`vlm_jax.data.regions`), then 1-2 on the crop
   against the class names; AP over LVIS-format annotations (`vlm_jax.evaluate.detection`).
4. Ranking fine-tune data: for each training image its 20 nearest neighbours' class names, every
   window of 5 consecutive names holding the true class, target = that window with the truth first;
   written as LLaVA-format conversations, which also fine-tune the embedded MLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vlm_jax.config_lib import ConfigError, MapOf, check_fields, defaults_of, load_config_file, merged, require_data_files, typed
from vlm_jax.data.pipeline import check_source, read_images
from vlm_jax.data.preprocess import preprocess_images
from vlm_jax.data.regions import crop_annotations
from vlm_jax.evaluate import detection, suite
from vlm_jax.evaluate.common import BatchedEncoder
from vlm_jax.evaluate.views import pixel_view
from vlm_jax.evaluate.zero_shot import classification_metrics, zero_shot_classifier
from vlm_jax.memory.build import memory_config
from vlm_jax.memory.index import IndexConfig, build_index
from vlm_jax.memory.neighbours import first_distinct, rows_per_label
from vlm_jax.memory.store import load_memory, unit_rows
from vlm_jax.methods import runner
from vlm_jax.mllm import answers, make_backend
from vlm_jax.mllm.config import mllm_config, parse_mllm
from vlm_jax.mllm.serve import over_http
from vlm_jax.mllm.training import CaptionerMethod, caption_source_config, write_conversations
from vlm_jax.train.cache import cached_run
from vlm_jax.weights import load_pretrained

PAPER_PROMPT = ("Please play the role of a classification expert, and sort the provided {k} categories from high to "
                "low according to the top {k} similarity with the input image. Here are the optional categories:"
                "{names}.")


@dataclasses.dataclass(frozen=True)
class RarConfig:
    """`config.rar`. shots: memory images per class (0: zero-shot, class-name texts); k: candidates;
    shot_seed: None takes the run's seed; prompt: the ranking prompt ({k}; {names}: the list);
    list_style: "python" (the paper's code: ['a', 'b']) or "plain" ([a, b]), also the fine-tune
    targets' form; score_prompt: each name is scored as its answer; max_tokens: of a ranking answer;
    normalize_scores: length-normalized; index: the memory search; neighbours, window: of the fine-tune
    data; crop_scale: (min, max) box scale of region crops; blur_sigma: outside the box; sweep: also
    recall@j and rar_score_* @j of the first j candidates for every j <= k (no more MLLM calls)."""

    shots: int = 4
    k: int = 5
    shot_seed: int | None = None
    prompt: str = PAPER_PROMPT
    list_style: str = "python"
    score_prompt: str = "What is this?"
    max_tokens: int = 96
    normalize_scores: bool = False
    index: IndexConfig = IndexConfig()
    neighbours: int = 20
    window: int = 5
    crop_scale: tuple[float, float] = (1.0, 3.0)
    blur_sigma: float = 2.0
    sweep: bool = False

    def __post_init__(self):
        if self.list_style not in ("python", "plain"):
            raise ValueError(f"rar.list_style must be 'python' or 'plain', got {self.list_style!r}")
        if self.shots < 0 or self.k < 1 or self.window < 1 or self.neighbours < self.window:
            raise ValueError(f"rar needs shots >= 0, k >= 1 and neighbours >= window >= 1; got shots={self.shots}, "
                             f"k={self.k}, neighbours={self.neighbours}, window={self.window}")


def rar_config() -> Any:
    return defaults_of(RarConfig)


def parse_rar(section: Any) -> RarConfig:
    return typed(RarConfig, section, "rar")


# -- 1. retrieve ------------------------------------------------------------------------------------


def retrieve(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, k: int, index: IndexConfig,
             exclude_ids: np.ndarray | None = None, search_k: int | None = None) -> np.ndarray:
    """Candidates int [Q, k]: the distinct `values` (labels) of the nearest `keys` to unit `queries`,
    searching `search_k` rows (default: enough for k distinct labels when each has equally many rows)."""
    per_label = max(1, len(values) // max(1, len(np.unique(values))))
    search_k = min(len(keys), search_k or k * per_label)
    _, ids = build_index(index, keys).search(queries, search_k, exclude_ids=exclude_ids)
    ids = np.asarray(ids)
    return first_distinct(np.where(ids >= 0, values[np.maximum(ids, 0)], -1), k)


# -- 2. rank ----------------------------------------------------------------------------------------


def render_list(names: Sequence[str], style: str) -> str:
    """A list of names as a ranking prompt or answer writes it: "python" ['a', 'b'] or "plain" [a, b]."""
    return str(list(names)) if style == "python" else "[" + ", ".join(names) + "]"


def ranking_prompt(config: RarConfig, names: Sequence[str]) -> str:
    """The ranking prompt for `names`."""
    return config.prompt.format(k=len(names), names=render_list(names, config.list_style))


def ranking_schema(count: int) -> dict[str, Any]:
    """The answer's JSON schema: `count` names (checked by the parser: rows' candidates differ)."""
    return {"type": "array", "items": {"type": "string"}, "minItems": count, "maxItems": count}


def rank(mllm, images: Sequence[np.ndarray], candidates: np.ndarray, class_names: Sequence[str],
         config: RarConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The MLLM's ranking of each row's candidates (labels int [Q, k], -1 padding kept last) ->
    (ranked labels [Q, k], fallback counts by event, "answers" and "answers_with_fallback")."""
    names = [[class_names[label] for label in row if label >= 0] for row in candidates]
    prompts = [ranking_prompt(config, row) for row in names]
    texts = _generate(mllm, images, prompts, names, config.max_tokens)
    rankings = [answers.rank_candidates(text, row) for text, row in zip(texts, names)]
    ranked = candidates.copy()
    for row, ranking in enumerate(rankings):
        ranked[row, : len(ranking.order)] = candidates[row, list(ranking.order)]
    counts = answers.count_events(rankings)
    counts["answers_with_fallback"] = sum(bool(ranking.events) for ranking in rankings)
    return ranked, counts


def _generate(mllm, images, prompts, names, max_tokens):
    """One `generate` call per candidate count (its schema)."""
    texts = [""] * len(prompts)
    for count in sorted({len(row) for row in names}):
        rows = [row for row, row_names in enumerate(names) if len(row_names) == count]
        outputs = mllm.generate([images[r] for r in rows], [prompts[r] for r in rows], max_tokens,
                                schema=ranking_schema(count))
        for row, text in zip(rows, outputs):
            texts[row] = text
    return texts


def candidate_scores(mllm, images: Sequence[np.ndarray], candidates: np.ndarray, class_names: Sequence[str],
                     config: RarConfig) -> np.ndarray:
    """Scoring mode: the MLLM's log-likelihood of each candidate's name, float [Q, k] (-inf: padding).
    A name's score does not depend on the other candidates, so any prefix of a row reuses it."""
    names = [[class_names[label] if label >= 0 else "" for label in row] for row in candidates]
    scores = mllm.score(images, [config.score_prompt] * len(images), names, normalize=config.normalize_scores)
    return np.where(candidates >= 0, scores, -np.inf)


def by_score(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's candidates [Q, k] sorted by `scores` [Q, k], highest first (ties: retrieval order)."""
    return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable"), axis=1)


def rank_by_score(mllm, images: Sequence[np.ndarray], candidates: np.ndarray, class_names: Sequence[str],
                  config: RarConfig) -> np.ndarray:
    """Scoring mode: each row's candidates sorted by the MLLM's log-likelihood of the name."""
    return by_score(candidates, candidate_scores(mllm, images, candidates, class_names, config))


# -- 4. ranking fine-tune data ----------------------------------------------------------------------


def ranking_windows(neighbour_names: Sequence[str], truth: str, window: int) -> list[tuple[list[str], list[str]]]:
    """Every window of `window` consecutive names (de-duplicated in rank order) that holds `truth`:
    (the window in retrieval order, the target: the same names with the truth moved first)."""
    names = answers.dedupe(neighbour_names)
    examples = []
    for start in range(max(0, len(names) - window) + 1):
        chunk = names[start : start + window]
        if truth in chunk and len(chunk) == window:
            examples.append((chunk, [truth, *[name for name in chunk if name != truth]]))
    return examples


def ranking_conversations(images: Sequence[np.ndarray], neighbour_labels: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str], config: RarConfig):
    """(image key, image, ranking prompt, target list) for every window of every image (those
    whose neighbours miss their class give none)."""
    for row, (image, neighbours, label) in enumerate(zip(images, neighbour_labels, labels)):
        names = [class_names[n] for n in neighbours if n >= 0]
        for chunk, target in ranking_windows(names, class_names[label], config.window):
            yield row, image, ranking_prompt(config, chunk), render_list(target, config.list_style)


# -- the experiment ---------------------------------------------------------------------------------


class RarRuns:
    """What every run of one experiment shares, loaded once: the frozen CLIP, the memories, the eval
    images, the class names and the MLLM."""

    def __init__(self, config, context: Mapping[str, Any], mllm):
        self.clip = load_pretrained(context["clip_dir"])
        self.memory = load_memory(context["memory_dir"])
        evaluation = load_memory(context["eval_memory_dir"])
        self.queries, self.labels = unit(evaluation.image_embeddings), np.asarray(evaluation.labels)
        self.images = read_images(config.eval.data, evaluation.indices)
        self.class_names, self.templates = suite.class_names_and_templates(config.eval)
        self.subsets = suite.class_subsets(config.eval)
        self.mllm = mllm

    def class_embeddings(self, names: Sequence[str] | None = None) -> np.ndarray:
        """The frozen CLIP's zero-shot classifier over class names (the templates averaged): [C, D]."""
        view = pixel_view(self.clip.model, self.clip.tokenizer)
        return zero_shot_classifier(view.prompts, names or self.class_names, self.templates)

    def top1(self, predictions: np.ndarray, prefix: str) -> dict[str, float]:
        """`prefix`top1 and `prefix`top1_<subset> of predicted labels [Q] (the shared zero-shot metrics)."""
        one_hot = np.eye(len(self.class_names), dtype=np.float32)[np.maximum(predictions, 0)]
        metrics = classification_metrics(one_hot * (predictions >= 0)[:, None], self.labels, self.subsets)
        return {f"{prefix}{name}": value for name, value in metrics.items() if name.startswith("top1")}

    def baseline(self) -> dict[str, float]:
        """The frozen CLIP's zero-shot classification (prompts): top-1 and recall@5."""
        candidates = retrieve(self.class_embeddings(), np.arange(len(self.class_names)), self.queries, 5,
                              IndexConfig())
        return {**self.top1(candidates[:, 0], "knn_"), "recall": recall(candidates, self.labels)}

    def run(self, run_config, run_dir) -> dict[str, float]:
        """One setting (shots, k) and seed: CLIP+kNN, recall@k, RAR by ranking and by scoring (with
        `sweep`, also of every prefix of the candidates); the labels of every eval image's candidates
        and rankings in <run_dir>/predictions.npz."""
        config = parse_rar(run_config.rar)
        if config.shots:
            labels = np.asarray(self.memory.labels)
            rows = rows_per_label(labels, config.shots, run_config.seed if config.shot_seed is None else config.shot_seed)
            keys, values = unit(self.memory.image_embeddings[rows]), labels[rows]
        else:
            keys, values = self.class_embeddings(), np.arange(len(self.class_names))
        candidates = retrieve(keys, values, self.queries, config.k, config.index)
        metrics = {**self.top1(candidates[:, 0], "knn_"), "recall": recall(candidates, self.labels),
                   "rar_top1": float("nan"), "rar_score_top1": float("nan"), "fallback_rate": float("nan")}
        predictions = {"labels": self.labels, "candidates": candidates}
        if "generate" in run_config.rar_modes:
            predictions["ranked"], events = rank(self.mllm, self.images, candidates, self.class_names, config)
            metrics.update(self.top1(predictions["ranked"][:, 0], "rar_"),
                           fallback_rate=events["answers_with_fallback"] / max(events["answers"], 1),
                           **{f"fallback/{event}": float(count) for event, count in events.items()})
        scores = None
        if "score" in run_config.rar_modes:
            scores = candidate_scores(self.mllm, self.images, candidates, self.class_names, config)
            predictions["scored"] = by_score(candidates, scores)
            metrics.update(self.top1(predictions["scored"][:, 0], "rar_score_"))
        for j in range(1, config.k + 1) if config.sweep else ():
            metrics[f"recall@{j}"] = recall(candidates[:, :j], self.labels)
            if scores is not None:
                top = self.top1(by_score(candidates[:, :j], scores[:, :j])[:, 0], "rar_score_")
                metrics.update({f"{name}@{j}": value for name, value in top.items()})
        epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
        np.savez(epath.Path(run_dir) / "predictions.npz", **predictions)
        return metrics


def unit(rows) -> np.ndarray:
    return unit_rows(np.asarray(rows, np.float32))


def recall(candidates: np.ndarray, labels: np.ndarray) -> float:
    """The share of queries whose label is among their candidates (RAR's ceiling)."""
    return float(np.mean((candidates == labels[:, None]).any(axis=1)))


def ranking_data_stage(runs: RarRuns, config, context: Mapping[str, Any]) -> epath.Path:
    """The ranking fine-tune data of the memory's images: their neighbours among the other memory
    images (never themselves), as LLaVA-format conversations (`ranking_conversations`) in
    <dir>/ranking.jsonl, built once per (base CLIP, memory, class names, data settings) in the shared
    cache, so the fine-tune on it is cached too."""
    rar = parse_rar(config.rar)
    key = ml_collections.ConfigDict({"ranking_data": {
        "clip_dir": context["clip_dir"], "memory": config.memory.to_dict(), "classes": list(runs.class_names),
        "rar": {name: getattr(rar, name) for name in ("prompt", "list_style", "neighbours", "window")},
        "index": dataclasses.asdict(rar.index)}})

    def build(directory):
        keys, labels = unit(runs.memory.image_embeddings), np.asarray(runs.memory.labels)
        neighbours = retrieve(keys, labels, keys, rar.neighbours, rar.index, exclude_ids=np.arange(len(keys))[:, None])
        examples = ranking_conversations(read_images(config.memory.data, runs.memory.indices), neighbours, labels,
                                         runs.class_names, rar)
        count = write_conversations(epath.Path(directory) / "ranking.jsonl", examples)
        logging.info("Ranking fine-tune data: %d conversations in %s.", count, directory)

    # Index fields at their defaults stay out of the key: a new backend's fields rebuild nothing.
    return epath.Path(cached_run(key, build, root=config.cache_dir or None,
                                 finished=lambda directory: (directory / "ranking.jsonl").exists(),
                                 defaults={"ranking_data": {"index": dataclasses.asdict(IndexConfig())}}))


def finetuned_mllm(config, base_dir: str, data: epath.Path) -> str:
    """The embedded MLLM of `base_dir` fine-tuned on the ranking data in `data` (`config.finetune`
    overrides the captioner's trainer fields), once per resolved config in the shared cache."""
    module, tune = runner.captioner_config(config)
    ranking = caption_source_config()
    ranking.update(source="conversations", path=str(data / "ranking.jsonl"))
    tune = merged(tune, config.finetune.to_dict(), "finetune")
    tune.captions = ml_collections.ConfigDict({"ranking": ranking})
    tune.caption_eval.split, tune.init_from, tune.init_vision = "", base_dir, False
    tune.optim.warmup_steps = max(1, int(tune.total_steps) // 10)
    return runner.cached_model_dir(tune, CaptionerMethod(), module=module, cache_dir=config.get("cache_dir"),
                                   what="the ranking fine-tune of the embedded MLLM")


# -- 3. regions -------------------------------------------------------------------------------------


def regions_config() -> ml_collections.ConfigDict:
    """`config.regions`: enabled, and the given boxes (`detection.boxes_config`)."""
    return ml_collections.ConfigDict({"enabled": True, **detection.boxes_config()})


def region_recognition(config, runs: RarRuns, workdir: epath.Path) -> dict[str, float]:
    """Recognition of given boxes: crops -> CLIP top-k class names (zero-shot) -> MLLM ranking; AP of
    CLIP's and RAR's detections (`vlm_jax.evaluate.detection`), printed and written to regions.json."""
    rar, section = parse_rar(config.rar), config.regions
    gt, images = detection.load_boxes(section.annotations, section.image_dir, section.data, section.limit)
    annotations = gt["annotations"]
    crops = crop_annotations(images, annotations, size=runs.clip.preprocess.image_size, min_scale=rar.crop_scale[0],
                             max_scale=rar.crop_scale[1], blur_sigma=rar.blur_sigma)
    embeddings = unit(BatchedEncoder(runs.clip.model, "encode_image", 256)(preprocess_images(crops, runs.clip.preprocess)))
    categories = sorted(gt["categories"], key=lambda category: category["id"])
    names, category_ids = [c["name"] for c in categories], np.asarray([c["id"] for c in categories])
    similarities = embeddings @ runs.class_embeddings(names).T
    candidates = np.argsort(-similarities, axis=1, kind="stable")[:, : rar.k]
    top = np.take_along_axis(similarities, candidates, axis=1)
    ranked, events = rank(runs.mllm, list(crops), candidates, names, rar)
    results = {}
    for name, labels in (("clip", candidates), ("rar", ranked)):
        metrics = detection.average_precision(gt, detection.ranked_detections(annotations, labels, top, category_ids))
        results.update({f"regions/{name}/{key}": float(value) for key, value in metrics.items()})
    results.update({f"regions/fallback/{event}": float(count) for event, count in events.items()})
    lines = [f"Region recognition with given boxes ({len(annotations)} boxes, {len(images)} images), AP in %:",
             f"{'':>8}" + "".join(f"{key:>8}" for key in ("AP", "AP50", "APr", "APc", "APf"))]
    for name in ("clip", "rar"):
        lines.append(f"{name.upper():>8}" + "".join(f"{100 * results[f'regions/{name}/{key}']:>8.1f}"
                                                   for key in ("AP", "AP50", "APr", "APc", "APf")))
    print("\n".join(lines), flush=True)
    runner.write_json(workdir / "regions.json", results)
    return results


def rar_task(config, workdir) -> dict[str, float]:
    """The `rar` task (experiments/rar.py): the frozen CLIP, its memory of the few-shot split and the
    eval images embedded once, the embedded MLLM (cached) fine-tuned on ranking data, then every
    setting x seed (CLIP+kNN vs RAR side by side), then region recognition with given boxes."""

    workdir = epath.Path(workdir)
    check_fields(config, runner.experiment_schema(
        memory=memory_config(), eval_memory=memory_config(), eval=suite.eval_spec(), rar=rar_config(), rar_modes=(),
        mllm=mllm_config(), mllm_config="", finetune=MapOf(None), serve=False, regions=regions_config(),
        ranking_data=False))
    if config.finetune.total_steps:  # its fields are the captioner experiment's
        merged(load_config_file(config.mllm_config), config.finetune.to_dict(), "finetune")
    parse_rar(config.rar)
    parse_mllm(config.mllm)
    if config.regions.enabled:
        detection.check_boxes(config.regions, "regions")
    for name in ("memory", "eval_memory"):
        require_data_files(config[name].data, f"{name}.data")
        check_source(config[name].data, f"{name}.data")
    if config.mllm.backend == "openai" and not config.mllm.base_url:
        raise ConfigError("mllm.backend='openai' needs --config.mllm.base_url=http://HOST:PORT/v1 (and mllm.model).")
    state: dict[str, Any] = {"serving": contextlib.ExitStack()}

    def stages(steps):
        clip_dir = steps.run("clip", lambda: runner.base_model_dir(config, workdir))
        context = {"clip_dir": clip_dir}
        for name in ("memory", "eval_memory"):
            context[f"{name}_dir"] = steps.run(name, lambda name=name: runner.build_memory_stage(
                config[name], clip_dir, workdir / name))
        state["runs"] = RarRuns(config, context, None)
        if config.ranking_data or config.finetune.total_steps:
            context["ranking_data"] = steps.run("ranking_data", lambda: ranking_data_stage(state["runs"], config,
                                                                                           context))
            if not str(workdir).startswith("gs://") and not (workdir / "ranking_data").exists():
                workdir.mkdir(parents=True, exist_ok=True)
                os.symlink(context["ranking_data"], workdir / "ranking_data")  # the cached data, beside the run
        if config.mllm.backend == "embedded" or config.serve:
            context["model_dir"] = steps.run("mllm", lambda: runner.captioner_dir(config))
            if config.finetune.total_steps:
                context["model_dir"] = steps.run("finetune", lambda: finetuned_mllm(
                    config, context["model_dir"], context["ranking_data"]))
        state["runs"].mllm = mllm_backend(config, context.get("model_dir", ""), state["serving"])
        return context

    def run_config(variant, context):
        return ml_collections.ConfigDict(variant.to_dict())

    try:
        results = runner.run_experiment(config, workdir, None, stages=stages, run_config=run_config,
                                        baseline_metrics=lambda context: state["runs"].baseline(),
                                        run=lambda run, run_dir: state["runs"].run(run, run_dir),
                                        counted=("fallback/",))
        if config.regions.enabled:
            results.update(region_recognition(config, state["runs"], workdir))
    finally:
        state["serving"].close()
    return results


def mllm_backend(config, model_dir: str, stack: contextlib.ExitStack):
    """`config.mllm`'s backend (embedded: the fine-tuned captioner); with `config.serve`, that model
    served on loopback for the life of `stack` and reached through the HTTP client."""
    section = {**config.mllm.to_dict(), **({"model_dir": model_dir} if model_dir else {})}
    return over_http(section, stack) if config.serve else make_backend(section)
