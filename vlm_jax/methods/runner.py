"""The experiment runner every method's task shares: stages, variants x seeds, the table.

    results = run_experiment(config, workdir, method, stages=prepare, run_config=one_run)

1. Stages (`Stages.run`): named, timed steps whose outputs stay on disk, so a rerun skips what is
   done (the base model, a memory, stored embeddings). Shared ones live here: `base_model_dir`
   trains the base CLIP by calling the trainer, once per config in the shared cache, `build_memory_stage` and `store_evals` embed a
   corpus and the eval sets with a frozen model.
2. The frozen baseline (`baseline`): views that do not change across variants (the frozen CLIP)
   are evaluated once per experiment, not once per run.
3. Variants x seeds: each variant is a nested override of the experiment config (checked: every
   overridden field must exist); each run trains with the shared trainer into
   `<workdir>/runs/<variant>/seed_<i>` and writes its resolved config.json; finished runs are read
   back from their results.json.
4. The table: mean, sample std and range over seeds, printed, in results.txt and results.json.

SIGTERM during a stage or a run raises `Preempted` out of `run_experiment` (the entry point exits 3);
every finished stage, cached base model and checkpoint stays, so the same command resumes.

Config fields read: seed, seeds, variants (name -> overrides), variant_labels, table (pairs of
metric and column label), row_order (variant names in table order; others follow), baseline_label.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from vlm_jax import console
from vlm_jax.config_lib import (ConfigError, MapOf, check_fields, experiment_module, load_config_file, merged,
                                require_data_files, require_eval_files, require_path)
from vlm_jax.data.pipeline import prepare_embedded
from vlm_jax.errors import Preempted
from vlm_jax.evaluate.common import skip_footnote


def experiment_schema(**sections: Any) -> dict[str, Any]:
    """The fields an experiment run by `run_experiment` may have: the trainer's, the runner's and
    the method's `sections` (checked once with `config_lib.check_fields`)."""
    from vlm_jax.data.pipeline import default_config  # noqa: PLC0415
    from vlm_jax.evaluate.suite import eval_spec  # noqa: PLC0415
    from vlm_jax.train.trainer import trainer_config  # noqa: PLC0415

    # A plain dict: a ConfigDict would refuse a MapOf where the trainer's config has a section.
    schema = dict(trainer_config().items())
    schema.update(preset="", data_dir="", clip_dir="", clip_config="", cache_dir="", dtype="float32", seeds=1,
                  baseline_label="", table=(), row_order=(), data=default_config())
    for name, value in {"variants": MapOf(None), "variant_labels": MapOf(None), "evals": MapOf(eval_spec()),
                        **sections}.items():
        schema[name] = value
    return schema


def write_json(path: epath.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=float) + "\n")


@dataclasses.dataclass
class Stages:
    """Named, timed steps of one experiment; wall times land in results.json as time/<name>_s."""

    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = function()
        self.timings[f"time/{name}_s"] = time.perf_counter() - started
        console.say(f"{name}: {console.duration(self.timings[f'time/{name}_s'])}")
        return value


NO_BASE_MODEL = ("neither clip_dir nor clip_config is set; pass --config.clip_dir=DIR (a CLIP in the Hugging Face "
                 "format) or name an experiment that trains one.")


def base_model_config(config) -> tuple[Any, ml_collections.ConfigDict]:
    """(the experiment module, the resolved config) of the base CLIP that `config.clip_config` names,
    with the experiment's data_dir; a one-line ConfigError when it is not a plain CLIP."""
    module = experiment_module(config.clip_config.partition(":")[0])
    base = load_config_file(config.clip_config)
    if base.get("method") != "clip":
        raise ConfigError(f"clip_config {config.clip_config!r} trains method {base.get('method')!r}; the base model "
                          "must be a plain CLIP (method 'clip').")
    if "data_dir" in base and config.get("data_dir") is not None:
        base.data_dir = config.data_dir
    return module, base


def base_model_dir(config, workdir: epath.Path) -> str:
    """The frozen base model: `config.clip_dir` when set, else the CLIP that the experiment
    `config.clip_config` names trains, built once per resolved config and dataset version in the
    shared cache (`vlm_jax.train.cache`, root `config.cache_dir` or the user's cache directory):
    a second experiment, or another method, reuses it; an interrupted build resumes, and SIGTERM
    during it raises Preempted. A cached build counts as done only when its export holds the
    completion marker (`vlm_jax.weights.atomic`)."""
    del workdir  # the base model lives in the cache, shared by every experiment that names it
    if config.clip_dir:
        return str(require_path(config.clip_dir, "clip_dir", field="clip_dir", containing=("config.json",)))
    if not config.clip_config:
        raise ConfigError(NO_BASE_MODEL)
    from vlm_jax.methods.clip import ClipMethod  # noqa: PLC0415

    module, base = base_model_config(config)
    return cached_model_dir(base, ClipMethod(), module=module, cache_dir=config.get("cache_dir"),
                            what="the base model")


def cached_model_dir(base, method, *, module, cache_dir: str | None, what: str) -> str:
    """The export of `base` (a resolved experiment config) trained by the shared trainer with
    `method`, once per resolved config and dataset version in the shared cache (`vlm_jax.train.cache`);
    an interrupted build resumes, and SIGTERM during it raises Preempted. A cached build counts as
    done only when its export holds the completion marker (`vlm_jax.weights.atomic`)."""
    from vlm_jax.train.cache import cached_run  # noqa: PLC0415
    from vlm_jax.weights.atomic import export_finished  # noqa: PLC0415

    version = module.dataset_version(base) if hasattr(module, "dataset_version") else ""
    directory = cached_run(base, lambda directory: train_export(base, directory, method, what), root=cache_dir or None,
                           dataset_version=version, finished=lambda directory: export_finished(directory / "export"),
                           defaults=training_defaults())
    return str(directory / "export")


def training_defaults() -> dict[str, Any]:
    """The defaults of every training config: the trainer's fields with a data section; a cached
    build's key leaves out the fields at these values (`vlm_jax.train.cache`)."""
    from vlm_jax.data.pipeline import default_config  # noqa: PLC0415
    from vlm_jax.evaluate.suite import eval_spec  # noqa: PLC0415
    from vlm_jax.train.cache import EVERY  # noqa: PLC0415
    from vlm_jax.train.trainer import trainer_config  # noqa: PLC0415

    defaults = trainer_config().to_dict()
    defaults.update(data=default_config().to_dict(), evals={EVERY: eval_spec().to_dict()},
                    text_context_length=0, text_trainable_layers=-1)  # ClipMethod's, where they change nothing
    return defaults


def train_export(config, directory: epath.Path, method, what: str) -> str:
    """Trains `config` with `method` into `directory` (resuming its checkpoints) unless its export
    is finished; returns the export's path. SIGTERM during it raises Preempted."""
    import jax  # noqa: PLC0415

    from vlm_jax.train.trainer import train  # noqa: PLC0415
    from vlm_jax.weights.atomic import export_finished  # noqa: PLC0415

    directory = epath.Path(directory)
    if not export_finished(directory / "export"):
        console.say(f"training {what} into {directory}")
        metrics = train(config, directory, method)
        if "preempted_at_step" in metrics:
            raise Preempted(f"stopped at step {int(metrics['preempted_at_step'])} while training {what} "
                            f"in {directory}")
        if jax.process_index() == 0 and not export_finished(directory / "export"):
            raise RuntimeError(f"training {what} in {directory} ended without a finished export "
                               f"({directory / 'export'} has no completion marker).")
    return str(directory / "export")


def captioner_config(config) -> tuple[Any, ml_collections.ConfigDict]:
    """(module, resolved config) of the embedded MLLM that `config.mllm_config` names (an
    experiments/captioner.py config), its base CLIP resolved to a directory."""
    module = experiment_module(config.mllm_config.partition(":")[0])
    captioner = load_config_file(config.mllm_config)
    if captioner.get("method") != "captioner":
        raise ConfigError(f"mllm_config {config.mllm_config!r} trains method {captioner.get('method')!r}; the "
                          "embedded MLLM must be a captioner (experiments/captioner.py).")
    if config.get("data_dir") is not None:
        captioner.data_dir = config.data_dir
    if config.get("cache_dir"):
        captioner.cache_dir = config.cache_dir
    return module, resolve_captioner_clip(captioner)


def resolve_captioner_clip(captioner: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A captioner config with clip_dir set: its own, or the cached base CLIP of its clip_config."""
    if not captioner.clip_dir:
        captioner.clip_dir = base_model_dir(captioner, None)
    return captioner


def captioner_dir(config) -> str:
    """The embedded MLLM's export: `config.mllm.model_dir` when set, else the captioner that
    `config.mllm_config` names, trained once per resolved config into the shared cache."""
    if config.mllm.model_dir:
        return str(require_path(config.mllm.model_dir, "mllm.model_dir", field="mllm.model_dir",
                                containing=("captioner.json",)))
    from vlm_jax.mllm.training import CaptionerMethod  # noqa: PLC0415

    module, captioner = captioner_config(config)
    return cached_model_dir(captioner, CaptionerMethod(), module=module, cache_dir=config.get("cache_dir"),
                            what="the embedded MLLM")


def build_memory_stage(build_config, model_dir: str, directory: epath.PathLike) -> str:
    """Embeds the corpus of a `memory_config()` section with the frozen model (resumable)."""
    from vlm_jax.memory.build import build_memory  # noqa: PLC0415

    prepare_embedded(build_config.data)
    build_memory(build_config, model_dir, None, None, directory)
    return str(directory)


def pairs_build_config(data, embed: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The memory-builder section that stores a training source's (image, text) pairs unaugmented."""
    from vlm_jax.memory.build import memory_config  # noqa: PLC0415

    build = memory_config()
    for key, value in data.to_dict().items():
        if key in build.data:
            build.data[key] = tuple(value) if isinstance(value, list) else value
    build.data.update(shuffle=False, augment="none")
    build.update(shard_size=int(embed["shard_size"]), batch_size=int(embed["batch_size"]), dtype=embed["dtype"],
                 progress=bool(embed["progress"]))
    return build


def store_evals(evals, model_dir: str, root: epath.Path, embed: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Stores every eval set's embeddings by the frozen model under `root/<name>`; returns the eval
    specs reading them (`stored_dir` set)."""
    from vlm_jax.evaluate import compositional, stored, suite  # noqa: PLC0415
    from vlm_jax.weights import load_pretrained  # noqa: PLC0415

    pretrained = load_pretrained(model_dir)
    specs = ml_collections.ConfigDict()
    for name, spec in evals.items():
        spec = suite.eval_spec(**spec.to_dict())
        if spec.type in compositional.TYPES:  # scored from pixels and texts of their own files each time
            specs[name] = spec
            continue
        prepare_embedded(spec.data)
        class_names, templates = suite.class_names_and_templates(spec) if spec.type == "zero_shot" else ((), ())
        stored.store_eval_embeddings(spec, pretrained, root / name, embed, class_names, templates)
        spec.stored_dir = str(root / name)
        specs[name] = spec
    return specs


def frozen_clip_stages(config, workdir: epath.Path, steps: Stages, memory_dir: str = "") -> dict[str, Any]:
    """The stages of a method on a frozen CLIP (RECO, RAR): the base model, its memory of
    `config.memory` (unless a built `memory_dir` is given), every
    `config.train_data` source's pairs (embeddings.train) and the eval sets (embeddings.eval)
    embedded once. Returns {"clip_dir", "memory_dir", "train_dirs", "evals"}."""
    clip_dir = steps.run("clip", lambda: base_model_dir(config, workdir))
    memory_dir = memory_dir or steps.run("memory", lambda: build_memory_stage(
        config.memory, clip_dir, workdir / "memory"))
    train_dirs = ()
    if config.embeddings.train:
        train_dirs = steps.run("train_embeddings", lambda: tuple(build_memory_stage(
            pairs_build_config(data, config.embeddings), clip_dir, workdir / "train_embeddings" / name)
            for name, data in config.train_data.items()))
    evals = config.evals
    if config.embeddings.eval:
        evals = steps.run("eval_embeddings", lambda: store_evals(
            config.evals, clip_dir, workdir / "eval_embeddings", config.embeddings))
    return {"clip_dir": clip_dir, "memory_dir": memory_dir, "train_dirs": train_dirs, "evals": evals}


FROZEN_CLIP_EMBEDDINGS = {"train": True, "eval": True, "shard_size": 4096, "batch_size": 256, "dtype": "float32",
                          "progress": True}


def check_frozen_clip_config(config, **sections: Any) -> None:
    """Checks every field of a frozen-CLIP experiment (`frozen_clip_stages`) and the method's `sections`."""
    from vlm_jax.data.pipeline import default_config  # noqa: PLC0415
    from vlm_jax.memory.build import memory_config  # noqa: PLC0415

    check_fields(config, experiment_schema(memory=memory_config(), embeddings=FROZEN_CLIP_EMBEDDINGS,
                                           train_data=MapOf(default_config()), train_weights=MapOf(None), **sections))
    unknown = sorted(set(config.train_weights) - set(config.train_data))
    if unknown:
        raise ConfigError(f"train_weights names {unknown}, which are not train_data sources {list(config.train_data)}.")


def check_frozen_clip_paths(config) -> None:
    """Checks, before any stage runs, the paths a frozen-CLIP experiment names: clip_dir (a directory
    with config.json), else clip_config (a plain-CLIP experiment whose own config passes
    `ClipMethod.check_config`), and the files of the memory, train_data and eval data sections."""
    from vlm_jax.methods.clip import ClipMethod  # noqa: PLC0415

    if config.clip_dir:
        require_path(config.clip_dir, "clip_dir", field="clip_dir", containing=("config.json",))
    elif not config.clip_config:
        raise ConfigError(NO_BASE_MODEL)
    else:
        ClipMethod().check_config(base_model_config(config)[1])
    require_data_files(config.memory.data, "memory.data")
    for name, data in config.train_data.items():
        require_data_files(data, f"train_data.{name}")
    require_eval_files(config.evals)


def train_weights(config) -> tuple[float, ...]:
    """Sampling weight of each `train_data` source in order (): in proportion to size)."""
    if not config.train_weights:
        return ()
    return tuple(float(config.train_weights.get(name, 0.0)) for name in config.train_data)


def frozen_clip_run(config, variant, context: Mapping[str, Any], *, method: str, pred: str) -> ml_collections.ConfigDict:
    """The trainer config of one run on the frozen CLIP: the variant's config, the base model, the
    eval specs scoring view `pred` (on the stored eval embeddings when there are any), and
    `config.data` from the one `train_data` source when pairs are not stored."""
    run = ml_collections.ConfigDict(variant.to_dict())
    run.task, run.method, run.clip_dir = "train", method, context["clip_dir"]
    if not context["train_dirs"]:
        if len(config.train_data) != 1:
            raise ConfigError(f"training on pixels reads one source, but train_data names {list(config.train_data)}; "
                              "keep one or set embeddings.train=True.")
        run.data = next(iter(config.train_data.values()))
    run.evals = ml_collections.ConfigDict({name: {**spec.to_dict(), "pred": pred}
                                           for name, spec in context["evals"].items()})
    return run


def baseline(evals, model_dir: str, pred: str = "clip") -> dict[str, float]:
    """The frozen model's metrics on `evals` (the view `pred` of a plain CLIP), once per experiment."""
    from vlm_jax.evaluate import suite  # noqa: PLC0415
    from vlm_jax.weights import load_pretrained  # noqa: PLC0415

    pretrained = load_pretrained(model_dir)
    specs = {name: {**spec.to_dict(), "pred": pred} for name, spec in evals.items()}
    evaluators = suite.build_evaluators(specs, pretrained.preprocess, pretrained.tokenizer)
    return suite.run_evaluators(evaluators, pretrained.model)


def variant_configs(config, base: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Each variant's config: `base` with its overrides; an override of a missing field is an error."""
    if not config.variants:
        raise ConfigError("config.variants is empty; name at least the method itself, e.g. variants.reco = {}.")
    return {name: merged(base, overrides, f"variants.{name}") for name, overrides in config.variants.items()}


def summarize(baseline_metrics: Mapping[str, float], runs: Mapping[str, Sequence[Mapping[str, float]]],
              metrics: Sequence[str]) -> dict[str, float]:
    """Flat results: "baseline/<metric>" (nan where the baseline has no such metric), "<variant>/<metric>"
    (mean over seeds), ".../std" (sample std; nan for one seed, where it is undefined), ".../min", ".../max",
    ".../seed_<i>"."""
    results = {f"baseline/{metric}": float(baseline_metrics.get(metric, float("nan"))) for metric in metrics}
    for variant, variant_runs in runs.items():
        for metric in metrics:
            # A metric a row lacks (an evaluator only some rows run) is nan, shown as "-".
            values = np.asarray([run.get(metric, np.nan) for run in variant_runs], np.float64)
            results[f"{variant}/{metric}"] = float(values.mean())
            results[f"{variant}/{metric}/std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            results[f"{variant}/{metric}/min"] = float(values.min())
            results[f"{variant}/{metric}/max"] = float(values.max())
            for index, value in enumerate(values):
                results[f"{variant}/{metric}/seed_{index}"] = float(value)
    return results


def skip_counts(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The evaluators' "<eval>/evaluated", "<eval>/skipped[/<reason>]" counts of `metrics`, keys
    prefixed "<prefix>/" (the same eval data gives every seed of a variant the same counts)."""
    return {f"{prefix}/{key}": float(value) for key, value in metrics.items()
            if key.endswith(("/evaluated", "/skipped")) or "/skipped/" in key}


def format_table(results: Mapping[str, float], rows: Mapping[str, str], columns: Sequence[Sequence[str]],
                 seeds: int) -> str:
    """A plain-text table of `results` (percent; variant rows: mean ± std over seeds, the mean alone where
    the std is undefined: a baseline, or a row of one seed)."""
    width = max(len(label) for label in rows.values()) + 2
    lines = [" " * width + "".join(f"{label:>16}" for _, label in columns)]
    for row, label in rows.items():
        cells = []
        for metric, _ in columns:
            mean = 100 * results[f"{row}/{metric}"]
            std = results.get(f"{row}/{metric}/std")
            if np.isnan(mean):
                cells.append(f"{'-':>16}")
            else:
                cells.append(f"{mean:>16.1f}" if std is None or np.isnan(std) else f"{f'{mean:.1f} ± {100 * std:.1f}':>16}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    lines.append(f"(in %; variant rows: mean ± sample std over {seeds} seeds)" if seeds > 1 else "(in %; one seed)")
    return "\n".join(lines)


def run_experiment(config, workdir: epath.PathLike, method, *, stages: Callable[[Stages], Mapping[str, Any]],
                   run_config: Callable[[ml_collections.ConfigDict, Mapping[str, Any]], ml_collections.ConfigDict],
                   baseline_metrics: Callable[[Mapping[str, Any]], Mapping[str, float]],
                   run: Callable[[ml_collections.ConfigDict, epath.Path], dict[str, float]] | None = None,
                   counted: Sequence[str] = ()) -> dict[str, float]:
    """Runs the stages, the baseline once, every variant for `config.seeds` seeds; writes the table.

    stages(Stages) -> context (paths the stages made); run_config(variant config, context) -> the
    config of one run; baseline_metrics(context) -> the frozen views' metrics (a metric it lacks is
    "-" in the table); run(run config, run dir) -> the run's metrics (default: the shared trainer
    with `method`; a method that trains nothing per run, RAR, evaluates here); counted: prefixes of
    run metrics that count events (RAR's "fallback/"): summed over seeds per variant into
    "<variant>/<metric>" and the non-zero ones listed under the table. Raises
    Preempted when a stage or a run stops on SIGTERM (what is done stays done; a rerun resumes).
    """
    import jax  # noqa: PLC0415

    from vlm_jax.train.metrics import write_experiment_events  # noqa: PLC0415
    from vlm_jax.train.trainer import train  # noqa: PLC0415

    workdir = epath.Path(workdir)
    if int(config.seeds) < 1:
        raise ConfigError(f"config.seeds must be >= 1, got {config.seeds}.")
    variants = variant_configs(config, config)
    began, steps = time.perf_counter(), Stages()
    context = stages(steps)  # Preempted from a stage ends the experiment (main exits 3; a rerun resumes)
    configs = {name: run_config(variant, context) for name, variant in variants.items()}
    metrics = [metric for metric, _ in config.table]
    frozen = steps.run("baseline", lambda: dict(baseline_metrics(context)))
    # Rows run in table order: `row_order` when given, else the method itself (the variant that
    # overrides nothing) first, its ablations under it.
    listed = [variant for variant in config.get("row_order", ()) if variant in configs]
    order = listed + sorted((variant for variant in configs if variant not in listed),
                            key=lambda variant: bool(config.variants[variant].to_dict()))
    runs: dict[str, list[dict[str, float]]] = {}
    for variant in order:
        variant_config = configs[variant]
        runs[variant] = []
        for index in range(int(config.seeds)):
            run_dir = workdir / "runs" / variant / f"seed_{index}"
            if (run_dir / "results.json").exists():
                runs[variant].append(json.loads((run_dir / "results.json").read_text()))
                continue
            one = ml_collections.ConfigDict(variant_config.to_dict())
            one.seed = int(config.seed) + index
            started = time.perf_counter()
            result = train(one, run_dir, method) if run is None else dict(run(one, run_dir))
            if "preempted_at_step" in result:
                raise Preempted(f"stopped at step {int(result['preempted_at_step'])} of the run in {run_dir}")
            result["time/run_s"] = time.perf_counter() - started
            write_json(run_dir / "results.json", result)
            runs[variant].append(result)
            console.say(f"{variant} seed {index} ({console.duration(result['time/run_s'])}): "
                        + ", ".join(f"{m}={result[m]:.4f}" for m in metrics if m in result))
    timings = {**steps.timings, "time/runs_s": float(sum(r.get("time/run_s", 0.0) for rs in runs.values() for r in rs)),
               "time/total_s": time.perf_counter() - began}
    skipped = {**skip_counts("baseline", frozen),
               **{key: value for variant, variant_runs in runs.items() if variant_runs
                  for key, value in skip_counts(variant, variant_runs[0]).items()}}
    counts = {f"{variant}/{key}": float(sum(run.get(key, 0.0) for run in variant_runs))
              for variant, variant_runs in runs.items() for key in variant_runs[0] if key.startswith(tuple(counted))}
    results = {**summarize(frozen, runs, metrics), **skipped, **counts, **timings}
    labels = config.get("variant_labels") or {}
    rows = {"baseline": str(config.get("baseline_label", "baseline")),
            **{variant: str(labels.get(variant, variant)) for variant in order}}
    table = format_table(results, rows, [tuple(column) for column in config.table], int(config.seeds))
    footnote = skip_footnote(skipped)
    table = f"{table}\n{footnote}" if footnote else table
    for variant in order if counts else ():
        listed = [f"{key.split('/', 1)[1]} {value:g}" for key, value in counts.items()
                  if key.startswith(f"{variant}/") and value]  # zeros too are in results.json
        table += f"\n{rows[variant].strip()}, summed over seeds: " + ", ".join(listed)
    print(table, flush=True)
    if jax.process_index() == 0:
        write_experiment_events(workdir, {"baseline": [frozen], **runs}, timings)
    (workdir / "results.txt").write_text(table + "\n" + json.dumps(timings, indent=1) + "\n")
    write_json(workdir / "results.json", results)
    return results
