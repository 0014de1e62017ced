"""RECO end to end: the `reco` task of `vlm_jax.main` (`experiments/reco.py`).

    python -m vlm_jax.main --config=experiments/reco.py        # Shapes World, CLIP vs CLIP+RECO

Steps, each resumable (a rerun of the same command skips what is on disk):

1. The frozen CLIP: `config.clip_dir`, else `<workdir>/clip/export`, else trained there first by the
   experiment `config.clip_config` names (the plain CLIP of `experiments/clip.py`, through the same
   `vlm_jax.main.run`), so a first run needs nothing but the package.
2. The memory: `config.memory` (corpus and build settings) embedded by the frozen CLIP into
   `<workdir>/memory` (`vlm_jax.memory.build`: shards, resumable, multi-host); `reco.memory_dir`
   names a memory built elsewhere instead.
3. Training pairs as embeddings (`embeddings.train`): the CLIP is frozen and the training data is
   not augmented, so every epoch would compute the same embeddings; the builder stores each source
   of `config.train_data` once in `<workdir>/train_embeddings/<name>`, and the fusion trains on
   their union with neighbours searched once (`reco.training_retrieval="precomputed"`). Exact, and
   the towers never run during training.
4. Evaluation sets as embeddings (`embeddings.eval`): the eval images, retrieval captions and
   zero-shot prompts embedded once into `<workdir>/eval_embeddings`; every evaluation then runs
   the stock evaluators on them (`EmbeddingInputs`), RECO and the frozen CLIP side by side.
5. Fusion training with the shared trainer, `train(run_config, run_dir, RecoMethod())`, for every
   variant in `config.variants` (RECO and its ablations) and `config.seeds` seeds, into
   `<workdir>/runs/<variant>/seed_<seed>`.
6. The table: CLIP vs each variant on `config.table`'s metrics, mean, sample std and range over
   seeds, printed and written to `<workdir>/results.json` with the wall time of each step.

`self_match_rows` decides which memory row holds a training example (self-exclusion): ids that
are only source positions mean something only within one source, so pairs from another source
never match by position.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from vlm_jax.config_lib import ConfigError, require_path
from vlm_jax.methods.clip import l2_normalize
from vlm_jax.methods.reco import AddRetrieved, RECO, RecoMethod, precompute_neighbours

TRAIN_EMBEDDINGS = "train_embeddings"
EVAL_EMBEDDINGS = "eval_embeddings"
PROMPT_EMBEDDINGS = "prompt_embeddings.npy"
PROMPT_TEXTS = "prompts.json"


# --------------------------------------------------------------------------------------------------
# Models fed frozen-CLIP embeddings
# --------------------------------------------------------------------------------------------------


class EmbeddingInputs(nnx.Module):
    """A RECO model, or the frozen CLIP itself (reco=None), fed stored frozen-CLIP embeddings.

    encode_image / encode_text take float [B, D] embeddings where the CLIP takes pixels and token
    ids, so the evaluators run unchanged on stored embeddings: exact for a frozen CLIP, whose
    towers would compute the same embeddings again.
    """

    def __init__(self, reco: RECO | None):
        self.reco = reco

    def _encode(self, modality: str, embeddings: jax.Array) -> jax.Array:
        embeddings = l2_normalize(embeddings)
        return embeddings if self.reco is None else self.reco.refine(modality, embeddings)

    def encode_image(self, image_embeddings: jax.Array) -> jax.Array:
        """float [B, D] frozen-CLIP image embeddings -> float32 [B, D]."""
        return self._encode("image", image_embeddings)

    def encode_text(self, text_embeddings: jax.Array) -> jax.Array:
        """float [B, D] frozen-CLIP text embeddings -> float32 [B, D]."""
        return self._encode("text", text_embeddings)


# --------------------------------------------------------------------------------------------------
# Training on stored embeddings
# --------------------------------------------------------------------------------------------------


def _positional_ids(memory) -> bool:
    return bool(np.array_equal(np.asarray(memory.ids, str), np.asarray(memory.indices).astype(str)))


def _source_identity(memory) -> dict[str, Any]:
    data = dict(memory.manifest["config"]["data"])
    return {key: data.get(key) for key in ("source", "dataset", "tfds_name", "split", "data_dir", "paths", "root")}


def self_match_rows(examples, memory) -> np.ndarray:
    """int32 [M]: the memory row holding each stored training example (-1: not in the memory).

    Args:
      examples, memory: `vlm_jax.memory.store.Memory`s (the stored training pairs and the memory).

    Examples match by id. When either side's ids are only source positions (the corpus has no id
    field) they match only if both were built from the same source; otherwise nothing matches.
    """
    from vlm_jax.methods.reco import memory_rows_of  # noqa: PLC0415

    positional = _positional_ids(examples) or _positional_ids(memory)
    if positional and _source_identity(examples) != _source_identity(memory):
        return np.full((examples.num_rows,), -1, np.int32)
    return memory_rows_of(examples.ids, memory.ids)


class StoredPairs:
    """Random-access source of stored training pairs: {"index": int64, "image_embedding",
    "text_embedding": float32 [D]} (index = row, which `AddRetrieved` uses to find neighbours)."""

    def __init__(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray):
        if image_embeddings.shape != text_embeddings.shape:
            raise ValueError(f"stored image and text embeddings differ in shape: {image_embeddings.shape} vs "
                             f"{text_embeddings.shape}; the training embeddings need both modalities.")
        self.image_embeddings, self.text_embeddings = image_embeddings, text_embeddings

    def __len__(self) -> int:
        return len(self.image_embeddings)

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return {"index": np.int64(row), "image_embedding": np.asarray(self.image_embeddings[row], np.float32),
                "text_embedding": np.asarray(self.text_embeddings[row], np.float32)}


def stored_pairs_iterator(method: RecoMethod, config, process_index: int, process_count: int) -> grain.DatasetIterator:
    """Restorable iterator of training batches from `reco.train_embeddings_dirs`.

    Each source is shuffled (`config.seed`), split over processes and repeated forever; batches
    draw from the sources with `reco.train_weights` (default: in proportion to their sizes, i.e.
    uniformly over the union). Batches: "index" int64 [b] (row of the union),
    "image_embedding"/"text_embedding" float32 [b, D], and the precomputed neighbours of
    `AddRetrieved` ([b, k, D] values, [b, k] memory rows), b = this process's share of
    `global_batch_size`.
    """
    from vlm_jax.data.pipeline import per_process_batch_size  # noqa: PLC0415
    from vlm_jax.methods.reco import _reco_section  # noqa: PLC0415

    reco = _reco_section(config)
    directories = tuple(reco["train_embeddings_dirs"])
    parts = [method.memory(directory) for directory in directories]
    sizes = [part.num_rows for part in parts]
    weights = tuple(reco["train_weights"]) or tuple(sizes)
    if len(weights) != len(parts) or min(weights) < 0 or not sum(weights):
        raise ValueError(f"reco.train_weights={weights} must give one non-negative weight per directory of "
                         f"train_embeddings_dirs ({len(parts)}), not all zero.")
    source = StoredPairs(np.concatenate([np.asarray(part.image_embeddings) for part in parts]),
                         np.concatenate([np.asarray(part.text_embeddings) for part in parts]))
    batch_size = per_process_batch_size(int(config.global_batch_size), process_count)
    union = grain.MapDataset.source(source).seed(int(config.seed))
    streams, offsets = [], np.cumsum([0, *sizes])
    for directory, start, stop, weight in zip(directories, offsets[:-1], offsets[1:], weights):
        if not weight:
            continue
        per_host = (stop - start) // process_count
        if per_host == 0:
            raise ValueError(f"{directory} holds {stop - start} pairs, fewer than the {process_count} processes.")
        stream = union[int(start) : int(stop)].shuffle()
        streams.append(stream[process_index : per_host * process_count : process_count].repeat(None))
    weights = [float(weight) for weight in weights if weight]
    dataset = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if reco["fusion"] != "none":
        dataset = dataset.map(stored_neighbours(method, reco))
    return iter(dataset)


def stored_neighbours(method: RecoMethod, reco: Mapping[str, Any]) -> AddRetrieved:
    """The memory neighbours of every stored training pair (rows of the union of
    `train_embeddings_dirs`), searched once; each source excludes its own pairs' memory rows."""
    directories = tuple(reco["train_embeddings_dirs"])
    key = ("neighbours", directories, reco["memory_dir"], reco["k"], reco["search"], reco["exclude_self"],
           reco["dedup_threshold"], json.dumps(dict(reco["index"]), sort_keys=True))
    if key not in method._memories:
        parts, memory = [method.memory(directory) for directory in directories], method.memory(reco["memory_dir"])
        exclude = np.concatenate([self_match_rows(part, memory) for part in parts]) if reco["exclude_self"] else None
        # The search runs once on the host: a device backend here is the exact top-k on local devices.
        neighbours = precompute_neighbours(
            np.concatenate([np.asarray(part.image_embeddings) for part in parts]),
            np.concatenate([np.asarray(part.text_embeddings) for part in parts]),
            memory.image_embeddings, memory.text_embeddings, k=reco["k"], search=reco["search"],
            index_config=dict(reco["index"]), exclude_rows=exclude, dedup_threshold=reco["dedup_threshold"])
        method._memories[key] = AddRetrieved(neighbours, memory.image_embeddings, memory.text_embeddings,
                                             search=reco["search"])
    return method._memories[key]


# --------------------------------------------------------------------------------------------------
# Evaluation on stored embeddings
# --------------------------------------------------------------------------------------------------


class _Head:
    """The first `count` records of a random-access source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> Any:
        if not 0 <= row < self.count:
            raise IndexError(row)
        return self.source[row]


def _stock_evaluator(name: str, spec, pretrained) -> Any:
    """The evaluator `vlm_jax.evaluate.suite` builds for a spec (class names, templates, subsets)."""
    from vlm_jax.evaluate import suite  # noqa: PLC0415

    return suite.build_evaluator(name, spec, pretrained.preprocess, pretrained.tokenizer).evaluator


def _eval_build_config(spec, embed: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The memory-builder section that stores one eval set's embeddings."""
    from vlm_jax.data import datasets  # noqa: PLC0415
    from vlm_jax.memory.build import memory_config  # noqa: PLC0415

    build = memory_config()
    data = spec.data.to_dict() if hasattr(spec.data, "to_dict") else dict(spec.data)
    if spec.type == "zero_shot":
        entry = datasets.get(spec.classes or data.get("dataset"))
        data.update(text_keys=(), label_key=data.get("label_key") or entry.label_key)
    elif spec.type == "retrieval":
        if data.get("texts_per_example") not in (None, 1):
            raise ConfigError(f"stored-embedding retrieval pairs each image with one caption, but texts_per_example="
                              f"{data['texts_per_example']}; set embeddings.eval=False to evaluate on pixels.")
        data.update(texts_per_example=None)
    else:
        raise ConfigError(f"evaluator type {spec.type!r} has no stored-embedding form; set embeddings.eval=False.")
    for key, value in data.items():
        build.data[key] = tuple(value) if isinstance(value, list) else value
    build.data.shuffle = False
    build.update(shard_size=int(embed["shard_size"]), batch_size=int(embed["batch_size"]),
                 progress=bool(embed.get("progress", True)))
    return build


def build_eval_embeddings(evals, clip_dir: str, out_dir: epath.PathLike, embed: Mapping[str, Any]) -> None:
    """Stores every evaluator's frozen-CLIP embeddings under `out_dir/<name>` (resumable).

    Zero-shot: the images with their labels (a memory directory) and the class prompts
    (prompt_embeddings.npy float32 [P, D], prompts.json: the P texts in class order).
    Retrieval: (image, caption) pairs (a memory directory).
    """
    from vlm_jax.evaluate.common import BatchedEncoder  # noqa: PLC0415
    from vlm_jax.evaluate.zero_shot import class_prompts  # noqa: PLC0415
    from vlm_jax.memory.build import build_memory  # noqa: PLC0415
    from vlm_jax.weights import load_pretrained  # noqa: PLC0415

    pretrained = load_pretrained(clip_dir)
    for name, spec in evals.items():
        directory = epath.Path(out_dir) / name
        stock = _stock_evaluator(name, spec, pretrained)
        source = None
        if spec.max_examples:
            from vlm_jax.data import pipeline  # noqa: PLC0415

            source = _Head(pipeline.make_source(spec.data), spec.max_examples)
        build_memory(_eval_build_config(spec, embed), pretrained.model, pretrained.preprocess, pretrained.tokenizer,
                     directory, source=source)
        if spec.type != "zero_shot":
            continue
        texts = [text for prompts in class_prompts(stock.class_names, stock.templates) for text in prompts]
        texts_path, embeddings_path = directory / PROMPT_TEXTS, directory / PROMPT_EMBEDDINGS
        if texts_path.exists() and embeddings_path.exists() and json.loads(texts_path.read_text()) == texts:
            continue
        encoder = BatchedEncoder(pretrained.model, "encode_text", int(embed["batch_size"]))
        embeddings = encoder(pretrained.tokenizer(texts))
        with embeddings_path.open("wb") as file:
            np.save(file, embeddings.astype(np.float32))
        texts_path.write_text(json.dumps(texts))


class _PromptLookup:
    """Stands in for the tokenizer: prompt texts -> their stored embeddings float32 [N, D]."""

    def __init__(self, texts: Sequence[str], embeddings: np.ndarray):
        self.row = {text: row for row, text in enumerate(texts)}
        self.embeddings = embeddings

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = [text for text in texts if text not in self.row]
        if missing:
            raise ValueError(f"prompts {missing[:3]} have no stored embedding; delete the eval_embeddings directory "
                             "to embed the current prompts.")
        return self.embeddings[[self.row[text] for text in texts]]


def _stored_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    rows = len(next(iter(arrays.values())))

    def batches():
        for start in range(0, rows, batch_size):
            yield {name: np.asarray(values[start : start + batch_size]) for name, values in arrays.items()}

    return batches


class StoredEmbeddingEvaluator:
    """One `config.evals` evaluator run on stored embeddings, with RECO and with the frozen CLIP side
    by side: metrics "reco/<name>/..." and "clip/<name>/..." as `SideBySideEvaluator` gives them."""

    def __init__(self, name: str, evaluator: Any, memory: Callable[[], Any]):
        self.name, self.evaluator, self.memory = name, evaluator, memory

    def run(self, model: RECO) -> dict[str, float]:
        view = nnx.merge(*nnx.split(model))
        if view.config.fusion != "none":
            view.attach_memory(self.memory())
        metrics = {f"reco/{self.name}/{key}": value for key, value in self.evaluator.run(EmbeddingInputs(view)).items()}
        metrics.update({f"clip/{self.name}/{key}": value
                        for key, value in self.evaluator.run(EmbeddingInputs(None)).items()})
        return metrics


def stored_embedding_evaluators(method: RecoMethod, config) -> dict[str, StoredEmbeddingEvaluator]:
    """The evaluators of `config.evals` over the embeddings in `reco.eval_embeddings_dir`."""
    from vlm_jax.evaluate import RetrievalEvaluator, ZeroShotEvaluator  # noqa: PLC0415
    from vlm_jax.methods.reco import _reco_section  # noqa: PLC0415

    pretrained = method.pretrained(config)
    reco = _reco_section(config)
    root = epath.Path(reco["eval_embeddings_dir"])
    memory = functools.partial(method.eval_memory, reco["eval_memory_dir"] or reco["memory_dir"], reco)
    evaluators = {}
    for name, spec in config.evals.items():
        stored = method.memory(str(root / name))
        stock = _stock_evaluator(name, spec, pretrained)
        if spec.type == "zero_shot":
            texts = json.loads((root / name / PROMPT_TEXTS).read_text())
            prompts = _PromptLookup(texts, np.load(root / name / PROMPT_EMBEDDINGS))
            evaluator = ZeroShotEvaluator(
                _stored_batches({"image": stored.image_embeddings, "label": stored.labels}, spec.batch_size),
                prompts, stock.class_names, stock.templates, spec.batch_size, stock.subsets)
        else:
            captions = np.asarray(stored.text_embeddings)[:, None, :]
            evaluator = RetrievalEvaluator(
                _stored_batches({"image": stored.image_embeddings, "text_ids": captions}, spec.batch_size),
                spec.batch_size, stock.ks)
        evaluators[name] = StoredEmbeddingEvaluator(name, evaluator, memory)
    return evaluators


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


def _load_experiment(argument: str) -> ml_collections.ConfigDict:
    """`path/to/x.py[:arg]` -> its get_config(arg)."""
    path, _, arg = argument.partition(":")
    spec = importlib.util.spec_from_file_location(f"experiment_{epath.Path(path).stem}", path)
    if spec is None or not epath.Path(path).exists():
        raise ConfigError(f"clip_config names {path!r}, which is not a config file; fix --config.clip_config.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _entry_point():
    """`vlm_jax.main` as loaded: under `python -m vlm_jax.main` it is `__main__`, and importing it
    again would define its flags a second time."""
    running = sys.modules.get("__main__")
    if getattr(getattr(running, "__spec__", None), "name", None) == "vlm_jax.main":
        return running
    return importlib.import_module("vlm_jax.main")


def ensure_clip(config, workdir: epath.Path) -> str:
    """The frozen CLIP directory: clip_dir, or `<workdir>/clip/export`, trained first if missing."""
    if config.clip_dir:
        return str(require_path(config.clip_dir, "the frozen CLIP directory", field="clip_dir"))
    export = workdir / "clip" / "export"
    if not (export / "config.json").exists():
        if not config.clip_config:
            raise ConfigError("neither clip_dir nor clip_config is set; pass --config.clip_dir=DIR (a CLIP in the "
                              "Hugging Face format) or name an experiment that trains one.")
        clip_config = _load_experiment(config.clip_config)
        if "data_dir" in clip_config and config.get("data_dir") is not None:
            clip_config.data_dir = config.data_dir
        logging.info("No frozen CLIP given: training one with %s into %s.", config.clip_config, workdir / "clip")
        _entry_point().run(clip_config, str(workdir / "clip"))
    if not (export / "config.json").exists():
        raise ConfigError(f"{config.clip_config} did not export a CLIP to {export}; set --config.clip_dir.")
    return str(export)


def _prepare_source(data) -> None:
    """Builds an embedded TFDS dataset (Shapes World) on first use."""
    name = data.get("tfds_name") or ""
    if data.get("source", "tfds") == "tfds" and name.startswith("shapes_world"):
        from vlm_jax.data import shapes_world  # noqa: PLC0415

        config_name = name.split("/", 1)[1].split(":")[0] if "/" in name else "default"
        shapes_world.prepare(data.get("data_dir"), config_name)


def _embedding_build_config(data, embed: Mapping[str, Any]) -> ml_collections.ConfigDict:
    from vlm_jax.memory.build import memory_config  # noqa: PLC0415

    build = memory_config()
    for key, value in (data.to_dict() if hasattr(data, "to_dict") else dict(data)).items():
        if key in build.data:
            build.data[key] = tuple(value) if isinstance(value, list) else value
    build.data.update(shuffle=False, augment="none")
    build.update(shard_size=int(embed["shard_size"]), batch_size=int(embed["batch_size"]),
                 dtype=embed["dtype"], progress=bool(embed.get("progress", True)))
    return build


def run_config(config, *, variant: str, seed: int, clip_dir: str, memory_dir: str, workdir: epath.Path):
    """The trainer config of one fusion run: the experiment's fields, the variant's reco overrides."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.task, run.method, run.seed, run.model_dir = "train", "reco", int(seed), clip_dir
    run.reco.memory_dir = memory_dir
    if config.embeddings.train:
        run.reco.train_embeddings_dirs = tuple(str(workdir / TRAIN_EMBEDDINGS / name) for name in config.train_data)
        weights = config.get("train_weights") or {}
        unknown = sorted(set(weights) - set(config.train_data))
        if unknown:
            raise ConfigError(f"train_weights names {unknown}, which are not train_data sources "
                              f"{list(config.train_data)}.")
        if weights:
            run.reco.train_weights = tuple(float(weights.get(name, 0.0)) for name in config.train_data)
        run.reco.training_retrieval = "precomputed"
    elif len(config.train_data) == 1:
        run.data = next(iter(config.train_data.values()))
    else:
        raise ConfigError(f"training on pixels reads one source, but train_data names {list(config.train_data)}; "
                          "keep one or set embeddings.train=True.")
    if config.embeddings.eval:
        run.reco.eval_embeddings_dir = str(workdir / EVAL_EMBEDDINGS)
    overrides = config.variants[variant].to_dict()
    fusion_overrides = overrides.pop("fusion_config", {})
    run.reco.update(overrides)
    run.reco.fusion_config.update(fusion_overrides)
    return run


def summarize(runs: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str]) -> dict[str, float]:
    """Flat results: "<row>/<metric>" (mean over seeds), ".../std" (sample std), ".../min", ".../max",
    ".../seed_<i>"; rows are "clip" (the frozen CLIP, from the first run) and each variant."""
    results: dict[str, float] = {}
    first = next(iter(runs.values()))[0]
    for metric in metrics:
        results[f"clip/{metric}"] = float(first[f"clip/{metric}"])
    for variant, variant_runs in runs.items():
        for metric in metrics:
            values = np.asarray([run[f"reco/{metric}"] for run in variant_runs], np.float64)
            results[f"{variant}/{metric}"] = float(values.mean())
            results[f"{variant}/{metric}/std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            results[f"{variant}/{metric}/min"] = float(values.min())
            results[f"{variant}/{metric}/max"] = float(values.max())
            for index, value in enumerate(values):
                results[f"{variant}/{metric}/seed_{index}"] = float(value)
    return results


def format_table(results: Mapping[str, float], rows: Mapping[str, str], columns: Sequence[Sequence[str]],
                 seeds: int) -> str:
    """A plain-text table of `results` (percent, mean ± std over seeds)."""
    width = max(len(label) for label in rows.values()) + 2
    lines = [" " * width + "".join(f"{label:>16}" for _, label in columns)]
    for row, label in rows.items():
        cells = []
        for metric, _ in columns:
            mean = 100 * results[f"{row}/{metric}"]
            std = results.get(f"{row}/{metric}/std")
            cells.append(f"{mean:>16.1f}" if std is None else f"{f'{mean:.1f} ± {100 * std:.1f}':>16}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    lines.append(f"(top-1 and recall@1 in %; CLIP+RECO rows: mean ± sample std over {seeds} seed(s))")
    return "\n".join(lines)


def reco_task(config, workdir: epath.Path) -> dict[str, float]:
    """The `reco` task (module docstring): CLIP, memory, embeddings, fusion runs, table."""
    from vlm_jax.evaluate.tasks import write_results  # noqa: PLC0415
    from vlm_jax.memory.build import build_memory  # noqa: PLC0415
    from vlm_jax.train.trainer import train  # noqa: PLC0415

    workdir = epath.Path(workdir)
    if not config.variants:
        raise ConfigError("config.variants is empty; name at least RECO itself, e.g. variants.reco = {}.")
    if int(config.seeds) < 1:
        raise ConfigError(f"config.seeds must be >= 1, got {config.seeds}.")
    timings: dict[str, float] = {}
    began = time.perf_counter()

    def timed(step: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = function()
        timings[f"time/{step}_s"] = time.perf_counter() - started
        logging.info("RECO step %s: %.1f s", step, timings[f"time/{step}_s"])
        return value

    clip_dir = timed("clip", lambda: ensure_clip(config, workdir))
    embed = config.embeddings.to_dict()

    memory_dir = config.reco.memory_dir or str(workdir / "memory")
    if not config.reco.memory_dir:
        def memory_step():
            _prepare_source(config.memory.data)
            build_memory(config.memory, clip_dir, None, None, memory_dir)

        timed("memory", memory_step)
    if config.embeddings.train:
        def train_embeddings_step():
            for name, data in config.train_data.items():
                _prepare_source(data)
                build_memory(_embedding_build_config(data, embed), clip_dir, None, None,
                             workdir / TRAIN_EMBEDDINGS / name)

        timed("train_embeddings", train_embeddings_step)
    if config.embeddings.eval:
        def eval_embeddings_step():
            for spec in config.evals.values():
                _prepare_source(spec.data)
            build_eval_embeddings(config.evals, clip_dir, workdir / EVAL_EMBEDDINGS, embed)

        timed("eval_embeddings", eval_embeddings_step)

    method = RecoMethod()  # one instance: the CLIP, memory, stored embeddings and neighbours load once
    runs: dict[str, list[dict[str, float]]] = {}
    for variant in config.variants:
        runs[variant] = []
        for index in range(int(config.seeds)):
            run_dir = workdir / "runs" / variant / f"seed_{index}"
            results_path = run_dir / "results.json"
            if results_path.exists():
                runs[variant].append(json.loads(results_path.read_text()))
                continue
            run = run_config(config, variant=variant, seed=int(config.seed) + index, clip_dir=clip_dir,
                             memory_dir=memory_dir, workdir=workdir)
            started = time.perf_counter()
            metrics = train(run, run_dir, method)
            if "preempted_at_step" in metrics:
                logging.warning("Stopped during %s; rerun the same command to continue.", run_dir)
                return metrics
            metrics["time/run_s"] = time.perf_counter() - started
            write_results(run_dir, metrics)
            runs[variant].append(metrics)
            logging.info("RECO %s seed %d: %s", variant, index,
                         ", ".join(f"{m}={metrics[f'reco/{m}']:.4f}" for m in _table_metrics(config)))
    timings["time/fusion_runs_s"] = float(sum(run.get("time/run_s", 0.0) for rs in runs.values() for run in rs))
    timings["time/total_s"] = time.perf_counter() - began

    results = {**summarize(runs, _table_metrics(config)), **timings}
    # RECO's own design first, its ablations under it.
    rows = {"clip": "CLIP (frozen)", **{variant: str(config.variant_labels.get(variant, variant))
                                        for variant in sorted(runs, key=lambda variant: variant != "reco")}}
    table = format_table(results, rows, [tuple(column) for column in config.table], int(config.seeds))
    print(table, flush=True)
    (workdir / "results.txt").write_text(table + "\n" + json.dumps(timings, indent=1) + "\n")
    write_results(workdir, results)
    return results


def _table_metrics(config) -> list[str]:
    return [metric for metric, _ in config.table]


__all__ = ["EmbeddingInputs", "StoredEmbeddingEvaluator", "StoredPairs", "build_eval_embeddings", "ensure_clip",
           "format_table", "reco_task", "run_config", "self_match_rows", "stored_embedding_evaluators",
           "stored_neighbours", "stored_pairs_iterator", "summarize"]
