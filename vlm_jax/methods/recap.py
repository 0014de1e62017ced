"""Recaptioned-data CLIP: "Learning Visual Composition through Improved Semantic Guidance" (Stone et al.;
CVPR 2025), with the caption mixture of Recap-DataComp-1B (Li et al.).

A standard two-tower CLIP; the change is the data.
1. Recaption. An MLLM rewrites every training image's caption: grounded (the image with its alt-text
   and page title in the prompt), ungrounded (the image alone), or LaCLIP-style text-only rewriting
   (`vlm_jax.mllm.recaption`; resumable, quality-filtered, keyed by example id).
2. Train on the recaptions. Each example's caption is its original with probability `recap.p` and its
   recaption otherwise (p = 0.8: Recap-DataComp's default, which keeps zero-shot classification; p = 0:
   recaptions only, Stone et al.). Long recaptions: a random subset of their sentences per step
   (`data.sentence_sampling`) and a text context past the pretrained one, its positions stretched by
   Long-CLIP's rule (`text_context_length`); optionally a frozen pretrained text tower with its last N
   blocks trainable (`text_trainable_layers`) and a hard-negative fine-tune (`data.hard_negatives`:
   each caption's swapped-attribute negative joins the batch).
3. Evaluate composition with the public benchmarks' files (`vlm_jax.evaluate.compositional`:
   SugarCrepe, ARO, Winoground, long-caption retrieval; Shapes World's hard negatives by kind), next to
   zero-shot classification and retrieval.

Every row of the experiment trains with the same budget; where `recap.init` is "base", each starts from
the same base CLIP (the Shapes World default: the weak-caption CLIP of experiments/clip.py).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging
from etils import epath

from vlm_jax.config_lib import ConfigError, check_fields, require_data_files, require_eval_files, require_path
from vlm_jax.data import captions, pipeline
from vlm_jax.methods import runner
from vlm_jax.methods.clip import ClipMethod, model_config_dict
from vlm_jax.models.clip import CLIPConfig
from vlm_jax.mllm import recaption as recaption_lib
from vlm_jax.mllm.config import mllm_config

INITS = ("base", "scratch")


def recap_config() -> ml_collections.ConfigDict:
    """`config.recap`: how a run mixes originals and recaptions."""
    return ml_collections.ConfigDict({
        "p": 0.8,  # chance that an example's caption is its original (data.text_keys); else its recaption
        "recaption_key": "recaption",  # the field RecaptionedSource adds to each record
        "recaptions_dir": "",  # recaptions written earlier ("": the experiment's recaption stage makes them)
        "init": "base",  # "base": every row starts from the base CLIP; "scratch": from `model`
        "examples": 0,  # train on the first N records of `data` only (the recaptioned ones); 0: all
    })


class RecapMethod(ClipMethod):
    """CLIP trained on a per-example mixture of original captions and recaptions (the trainer's method
    "recap"). Fields besides ClipMethod's: `recap` (`recap_config`); `recap.recaptions_dir` holds the
    recaption pipeline's output, read once into memory (id -> text)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.fallbacks = 0

    def check_config(self, config) -> None:
        super().check_config(config)
        check_fields(config.recap, recap_config(), "recap")
        if not 0.0 <= float(config.recap.p) <= 1.0:
            raise ConfigError(f"recap.p must be in [0, 1], got {config.recap.p}.")
        if float(config.recap.p) < 1.0:
            require_path(config.recap.recaptions_dir, "the recaptions", field="recap.recaptions_dir",
                         containing=(recaption_lib.SUMMARY_FILE,))

    def train_source(self, config):
        data, source = super().train_source(config)
        p = float(config.recap.p)
        if config.recap.examples:
            source = pipeline.Head(source if source is not None else pipeline.make_source(data), int(config.recap.examples))
        if p >= 1.0:
            return data, source
        base = source if source is not None else pipeline.make_source(data)
        source = recaption_lib.RecaptionedSource(
            base, recaption_lib.read_recaptions(config.recap.recaptions_dir), id_key=data.id_key,
            key=config.recap.recaption_key, fallback_key=data.text_keys[0])
        self.fallbacks = source.fallbacks
        if source.fallbacks:
            logging.warning("%d of %d training records have no kept recaption; they train on %s instead.",
                            source.fallbacks, len(source), data.text_keys[0])
        data = ml_collections.ConfigDict(data.to_dict())
        weights = data.text_weights or (1.0,) * len(data.text_keys)
        total = sum(weights)
        data.text_keys = (*data.text_keys, config.recap.recaption_key)
        data.text_weights = (*(p * weight / total for weight in weights), 1.0 - p)
        return data, source


def recaption_stage(config, model_dir: str, directory: epath.Path) -> str:
    """Runs the recaption pipeline over `config.recaption.data` with `config.mllm` (embedded: the
    captioner export `model_dir`) into `directory`, resuming what a killed run wrote."""
    pipeline.prepare_embedded(config.recaption.data)
    section = {**config.mllm.to_dict(), **({"model_dir": model_dir} if model_dir else {})}
    return recaption_lib.recaption_dir(config.recaption, section, directory)


def _run_config(config, variant, context) -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict(variant.to_dict())
    run.task, run.method = "train", "recap"
    if run.recap.init not in INITS:
        raise ConfigError(f"recap.init={run.recap.init!r} is not one of {list(INITS)}.")
    run.clip_dir = context["clip_dir"] if run.recap.init == "base" else ""
    run.recap.recaptions_dir = context["recaptions_dir"]
    for name in [name for name in run if name in EXPERIMENT_ONLY]:
        del run[name]
    return run


# Fields of the experiment that its runs do not read.
EXPERIMENT_ONLY = ("clip_config", "cache_dir", "mllm", "mllm_config", "recaption", "seeds", "variants",
                   "variant_labels", "table", "row_order", "baseline_label", "preset")


def check_recap_experiment(config) -> None:
    """Every field of the experiment, variants included, and the paths it names, before any work."""
    check_fields(config, runner.experiment_schema(
        recap=recap_config(), recaption=recaption_lib.recaption_config(), mllm=mllm_config(), mllm_config="",
        model=model_config_dict(CLIPConfig()), tokenizer_dir="", loss="softmax", label_smoothing=0.0,
        named_caption_weight=0.0, text_context_length=0, text_trainable_layers=-1))
    recaption_lib.check_recaption_config(ml_collections.ConfigDict({
        name: config[name] for name in ("recaption", "mllm", "mllm_config", "data_dir", "cache_dir")}))
    for name, variant in runner.variant_configs(config, config).items():
        check_fields(variant.recap, recap_config(), f"variants.{name}.recap")
        if not 0.0 <= float(variant.recap.p) <= 1.0:
            raise ConfigError(f"variants.{name}.recap.p must be in [0, 1], got {variant.recap.p}.")
        captions.check_negative_kinds(variant.data.hard_negatives)
    require_data_files(config.data, "data")
    require_data_files(config.recaption.data, "recaption.data")
    require_eval_files(config.evals)


def recap_task(config, workdir) -> dict[str, float]:
    """The `recap` task (experiments/recap.py): the base CLIP and the embedded MLLM (both cached), the
    corpus recaptioned once into <workdir>/recaptions, then every row x seed trained on its caption
    mixture with the same budget, and one table of composition, retrieval and zero-shot accuracy."""
    workdir = epath.Path(workdir)
    check_recap_experiment(config)

    def stages(steps):
        needs_base = config.recap.init == "base" or any(
            variant.recap.init == "base" for variant in runner.variant_configs(config, config).values())
        clip_dir = steps.run("clip", lambda: runner.base_model_dir(config, workdir)) if needs_base else ""
        recaptions_dir = config.recap.recaptions_dir
        if not recaptions_dir:
            model_dir = steps.run("mllm", lambda: runner.captioner_dir(config)) if config.mllm.backend == "embedded" \
                else ""
            recaptions_dir = steps.run("recaption", lambda: recaption_stage(config, model_dir, workdir / "recaptions"))
        return {"clip_dir": clip_dir, "recaptions_dir": recaptions_dir}

    from vlm_jax.train.trainer import train  # noqa: PLC0415

    return runner.run_experiment(
        config, workdir, None, stages=stages,
        run_config=lambda variant, context: _run_config(config, variant, context),
        baseline_metrics=lambda context: runner.baseline(config.evals, context["clip_dir"]) if context["clip_dir"]
        else {},
        run=lambda run, run_dir: train(run, run_dir, RecapMethod()))
