"""Evaluators built from a config section, for the eval tasks and the trainer's periodic eval hooks.

`config.evals` maps a name to one evaluator spec; metrics come back prefixed with `<name>/`:

    config.evals.cars = dict(
        type="zero_shot",             # "zero_shot" | "retrieval" | a compositional type (below)
        data=dict(dataset="cars", split="test", data_dir=None),   # pipeline.default_config() fields
        classes="",                   # registry name giving class names and templates ("": data.dataset)
        templates=(),                 # override the registry's prompt templates ("{}" = class name)
        subsets="",                   # "frequency": per common/rare/novel top-1 (datasets that define it)
        batch_size=256,
        max_examples=0,               # evaluate on the first N examples only (0: all)
        pred="clip",                  # the view it scores: one of the method's views ("clip", "reco", ...)
        stored_dir="",                # read embeddings stored there (`evaluate.stored`) instead of pixels
    )
    config.evals.shapes_retrieval = dict(
        type="retrieval",
        data=dict(source="tfds", tfds_name="shapes_world/default", split="eval_retrieval",
                  text_keys=("dense_caption",), texts_per_example=1),
    )

Compositional and long-caption benchmarks (`evaluate.compositional`) read the files each benchmark
publishes from `path`, images from `image_dir` ("": where the benchmark ships them beside its files):

    config.evals.sugarcrepe = dict(type="sugarcrepe", path="/data/sugarcrepe",   # the 7 JSON files
                                   image_dir="/data/coco/val2017", categories=())  # (): every file
    config.evals.vg_relation = dict(type="aro_relation", path="/data/aro")        # + images/
    config.evals.vg_attribution = dict(type="aro_attribution", path="/data/aro")
    config.evals.coco_order = dict(type="coco_order", path="/data/coco/coco_karpathy_test.json", seed=0)
    config.evals.flickr_order = dict(type="flickr30k_order", path="/data/flickr30k/flickr30k_test.json")
    config.evals.winoground = dict(type="winoground", path="/data/winoground")    # examples.jsonl + images/
    config.evals.docci = dict(type="long_retrieval", path="/data/docci", data=dict(split="test"))
    config.evals.shapes_compositional = dict(
        type="shapes_compositional",
        data=dict(tfds_name="shapes_world/default", split="eval_compositional"),
    )

`path` is the benchmark's folder or its one file (SugarCrepe: the folder); `categories` picks
SugarCrepe files or Shapes World negative kinds; `seed` seeds the Order shuffles; `max_examples`,
`batch_size` and `pred` mean what they mean above (`stored_dir` does not apply). A missing `path` is a
one-line ConfigError (`config_lib.require_eval_files`) before anything runs. Metrics: sugarcrepe
`<category>`, `mean`, `add`, `replace`, `swap`; aro_relation `macro`, `micro`, `relations`;
aro_attribution `macro`, `micro`, `pairs`; coco_order and flickr30k_order `accuracy`; winoground
`text`, `image`, `group`; long_retrieval `{image,text}_retrieval_recall@{1,5,10}`, `context_length`,
`truncated`; shapes_compositional `<kind>`, `mean`.

Every process evaluates the whole eval set (eval sets are small next to training data), so metrics
are identical on all processes of a multi-host job. Besides its scores each evaluator reports
`<name>/evaluated`, `<name>/skipped` and `<name>/skipped/<reason>` (inputs skipped as bad), and an
evaluator that skipped any logs a warning; `common.skip_footnote(metrics)` is the table footnote.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vlm_jax.config_lib import ConfigError, check_fields
from vlm_jax.data import datasets, pipeline
from vlm_jax.evaluate import compositional, stored
from vlm_jax.evaluate.common import Evaluator, get_evaluator, skip_footnote
from vlm_jax.evaluate.views import View, pixel_view, stored_view


def eval_spec(**overrides: Any) -> ml_collections.ConfigDict:
    """One evaluator spec with every field and its default (see the module docstring)."""
    spec = ml_collections.ConfigDict(
        {
            "type": "zero_shot",
            "data": pipeline.default_config(),
            "classes": "",
            "templates": (),
            "subsets": "",
            "batch_size": 256,
            "max_examples": 0,
            "pred": "clip",
            "stored_dir": "",
            "path": "",
            "image_dir": "",
            "categories": (),
            "seed": 0,
        }
    )
    spec.data.shuffle = False
    check_fields(overrides, spec, "eval spec")
    data_overrides = dict(overrides.pop("data", {}))
    spec.update(overrides)
    for key, value in data_overrides.items():
        # Assignment (unlike update) accepts a FieldReference, e.g. a config-wide data_dir.
        setattr(spec.data, key, value)
    return spec


def _registry_entry(name: str) -> datasets.DatasetEntry:
    try:
        return datasets.get(name)
    except KeyError as error:
        raise ConfigError(str(error.args[0])) from None


def _class_subsets(entry: datasets.DatasetEntry, kind: str, tfds_name: str) -> dict[str, np.ndarray] | None:
    if not kind:
        return None
    module = importlib.import_module(entry.builder_module) if entry.builder_module else None
    if kind != "frequency" or module is None or not hasattr(module, "frequency_ids"):
        raise ConfigError(f"subsets={kind!r} is not defined for dataset {entry.name!r}; use subsets=''.")
    builder_config = tfds_name.split("/", 1)[1].split(":")[0] if "/" in tfds_name else "default"
    return {name: ids for name, ids in module.frequency_ids(builder_config).items() if len(ids)}


def _register_builder(tfds_name: str) -> None:
    """Imports the module of an embedded TFDS builder (e.g. shapes_world) so TFDS knows its name."""
    base = tfds_name.split("/")[0].split(":")[0]
    for entry in datasets.REGISTRY.values():
        if entry.builder_module and entry.tfds_name and entry.tfds_name.split("/")[0] == base:
            importlib.import_module(entry.builder_module)


def _batches(spec, preprocess, tokenizer) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    if spec.stored_dir:
        return stored.stored_batches(spec.stored_dir, spec)
    _register_builder(spec.data.tfds_name)
    source = pipeline.make_source(spec.data)
    if spec.max_examples:
        source = stored.Head(source, spec.max_examples)

    def batches():
        return pipeline.make_eval_iterator(
            spec.data, preprocess, tokenizer, spec.batch_size, process_index=0, process_count=1, source=source
        )

    return batches


# (model, inputs) -> {view name: View}; `inputs(encoder)` is the view of an encoder's towers on the
# spec's source (pixels and tokens), or of the stored embeddings (the encoder is then not run).
Views = Callable[[Any, Callable[[Any], View]], Mapping[str, View]]


class SpecEvaluator:
    """One spec's evaluator bound to its view: `run(model)` scores `views(model, inputs)[spec.pred]`,
    metrics prefixed with `<name>/`."""

    def __init__(self, name: str, spec, evaluator: Evaluator, inputs: Callable[[Any], View], views: Views):
        self.name, self.spec, self.evaluator, self.inputs, self.views = name, spec, evaluator, inputs, views

    def run(self, model) -> dict[str, float]:
        offered = self.views(model, self.inputs)
        if self.spec.pred not in offered:
            raise ConfigError(f"evals.{self.name}.pred={self.spec.pred!r} is not a view of this method; "
                              f"expected one of {sorted(offered)}.")
        metrics = {f"{self.name}/{key}": value for key, value in self.evaluator.run(offered[self.spec.pred]).items()}
        footnote = skip_footnote(metrics)
        if footnote:
            logging.warning("Evaluation skipped bad inputs (set data.on_bad_input='raise' to stop at the first):\n%s",
                            footnote)
        return metrics


def clip_views(model, inputs: Callable[[Any], View]) -> dict[str, View]:
    """The views of a plain two-tower model: "clip", its own towers."""
    return {"clip": inputs(model)}


def class_names_and_templates(spec) -> tuple[list[str], Any]:
    """A zero-shot spec's class names and templates (the registry's, or the spec's own)."""
    entry = _registry_entry(spec.classes or spec.data.dataset)
    return entry.class_names(data_dir=spec.data.data_dir), list(spec.templates) or entry.templates


def class_subsets(spec) -> dict[str, np.ndarray]:
    """A zero-shot spec's class subsets by name (e.g. Shapes World's frequency classes); {} for none."""
    entry = _registry_entry(spec.classes or spec.data.dataset)
    return _class_subsets(entry, spec.subsets, spec.data.tfds_name or entry.tfds_name or "") or {}


def build_evaluator(name: str, spec: Mapping[str, Any], preprocess, tokenizer, views: Views = clip_views) -> SpecEvaluator:
    """The evaluator one spec describes, scoring the view `spec.pred` of the model it runs on."""
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    check_fields(spec, eval_spec(), f"evals.{name}")
    spec = eval_spec(**spec)
    if spec.type in compositional.TYPES:
        evaluator = compositional.build(name, spec, preprocess, tokenizer)
        inputs = lambda encoder: pixel_view(encoder, tokenizer, int(spec.batch_size))  # noqa: E731
        return SpecEvaluator(name, spec, evaluator, inputs, views)
    if spec.type not in ("zero_shot", "retrieval"):
        raise ConfigError(f"evals.{name}.type={spec.type!r} is not one of "
                          f"{['zero_shot', 'retrieval', *compositional.TYPES]}.")
    batches = _batches(spec, preprocess, tokenizer)
    if spec.type == "zero_shot":
        entry = _registry_entry(spec.classes or spec.data.dataset)
        if not spec.data.label_key:
            spec.data.label_key = entry.label_key
        class_names, templates = class_names_and_templates(spec)
        evaluator = get_evaluator(
            "zero_shot", data=batches, class_names=class_names, templates=templates,
            subsets=_class_subsets(entry, spec.subsets, spec.data.tfds_name or entry.tfds_name or ""),
        )
    else:
        if not spec.stored_dir and (not spec.data.text_keys or not spec.data.texts_per_example):
            raise ConfigError(f"evals.{name}: retrieval needs data.text_keys and data.texts_per_example.")
        evaluator = get_evaluator("retrieval", data=batches)
    if spec.stored_dir:
        prompts = stored.stored_prompts(spec.stored_dir)
        inputs = lambda encoder: stored_view(prompts)  # noqa: E731 - the stored source needs no encoder
    else:
        inputs = lambda encoder: pixel_view(encoder, tokenizer, int(spec.batch_size))  # noqa: E731
    return SpecEvaluator(name, spec, evaluator, inputs, views)


def build_evaluators(evals: Mapping[str, Any], preprocess, tokenizer, views: Views = clip_views) -> dict[str, SpecEvaluator]:
    """{name: evaluator} for every spec in a `config.evals` section."""
    return {name: build_evaluator(name, spec, preprocess, tokenizer, views) for name, spec in evals.items()}


def run_evaluators(evaluators: Mapping[str, Evaluator], model) -> dict[str, float]:
    """Runs every evaluator on `model` and merges their metrics."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators.values():
        metrics.update(evaluator.run(model))
    return metrics
