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

Classification by description (`evaluate.descriptions`, GRAIN's zero-shot rule) takes the
zero-shot fields and its own; the region evaluator reads boxes and region descriptions:

    config.evals.cars_descriptions = dict(
        type="descriptions",
        data=dict(dataset="cars", split="test"),
        descriptors="/data/descriptors/cars.json",   # {class name: [descriptors]} | "builder" | "mllm:<path>" | ""
        region_weight=0.0,            # (1 - w) * global + w * region score; > 0 needs a view with regions
        among="",                     # a subset name: a closed set of its classes (with subsets="frequency":
                                      # "novel" scores novel images among the novel classes only)
        descriptor_prompt="",         # "mllm:<path>": the question per class ("{}" = class name; "": the default)
        mllm=dict(backend="openai", base_url="http://localhost:8000/v1", model="..."),   # mllm_config() fields
    )
    config.evals.shapes_regions = dict(
        type="regions",               # boxes "boxes", "box_mask" and descriptions "region_texts" [B, R]
        data=dict(tfds_name="shapes_world/default", split="eval_retrieval", regions_key="regions"),
    )

`descriptors`: a JSON file's path; "builder" for Shapes World (each entity's description, "is a
striped red star"; "builder:attributes": one descriptor per colour, pattern and shape); "mllm:<path>" the file at path, written first (text-only requests to `mllm`,
which must be an OpenAI-compatible text endpoint) when it is not there; "" no descriptors (each class
scored by its templates alone, the mean of their similarities). Metrics: descriptions `top1`, `top5`,
`mean_per_class_recall`, `top1_<subset>` (and `top1_global` when region_weight > 0); regions
`mean_iou`, `recall@0.5`, `description_accuracy`, `regions` (boxes scored). Region scores need the
model's region queries, so `regions` and `region_weight` > 0 cannot read stored embeddings
(`stored_dir`); descriptions with region_weight 0 can (`class_names_and_texts` gives the prompts to store).

`path` is the benchmark's folder or its one file (SugarCrepe: the folder); `categories` picks
SugarCrepe files or Shapes World negative kinds; `seed` seeds the Order shuffles; `max_examples`,
`batch_size` and `pred` mean what they mean above (`stored_dir` does not apply). A missing `path` is a
one-line ConfigError (`config_lib.require_eval_files`) before anything runs (as is a missing descriptor
file). Metrics: sugarcrepe `<category>`, `mean`, `add`, `replace`, `swap`; aro_relation `macro`, `micro`, `relations`;
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
from etils import epath

from vlm_jax.config_lib import ConfigError, check_fields
from vlm_jax.data import datasets, pipeline
from vlm_jax.evaluate import compositional, descriptions, region_boxes, stored  # noqa: F401 - registers evaluators
from vlm_jax.evaluate.common import Evaluator, get_evaluator, skip_footnote
from vlm_jax.evaluate.views import View, pixel_view, stored_view
from vlm_jax.mllm.config import mllm_config

TYPES = ("zero_shot", "retrieval", "descriptions", "regions")


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
            "descriptors": "",
            "region_weight": 0.0,
            "among": "",
            "descriptor_prompt": "",
            "mllm": mllm_config(),
        }
    )
    spec.data.shuffle = False
    check_fields(overrides, spec, "eval spec")
    overrides = dict(overrides)
    sections = {name: dict(overrides.pop(name, None) or {}) for name in ("data", "mllm")}
    spec.update(overrides)
    for name, section in sections.items():
        for key, value in section.items():
            # Assignment (unlike update) accepts a FieldReference, e.g. a config-wide data_dir.
            setattr(spec[name], key, value)
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
        source = pipeline.Head(source, spec.max_examples)

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


def class_descriptors(name: str, spec, entry: datasets.DatasetEntry, class_names: list[str]) -> Any:
    """A descriptions spec's descriptors per class (see the module docstring for `descriptors`)."""
    source = str(spec.descriptors)
    if not source:
        # No descriptors: every class scored by its templates alone ("a photo of a {}." as written).
        return None
    if source in ("builder", "builder:attributes"):
        if entry.builder_module != "vlm_jax.data.shapes_world":
            raise ConfigError(f"evals.{name}.descriptors={source!r} is defined for Shapes World only, not "
                              f"{entry.name!r}; give a descriptor file.")
        return descriptions.shapes_world_descriptors(class_names, "attributes" if source.endswith(":attributes")
                                                     else "description")
    path = source
    if source.startswith("mllm:"):
        path = source[len("mllm:"):]
        if not path:
            raise ConfigError(f"evals.{name}.descriptors='mllm:' names no file; use 'mllm:<path>'.")
        if not epath.Path(path).exists():
            from vlm_jax.mllm import make_backend  # noqa: PLC0415

            if spec.mllm.backend != "openai":
                raise ConfigError(f"evals.{name}.descriptors={source!r}: writing descriptors takes text-only "
                                  f"requests; set evals.{name}.mllm.backend='openai' (an OpenAI-compatible endpoint).")
            logging.info("Writing descriptors of %d classes to %s.", len(class_names), path)
            descriptions.write_descriptors(class_names, make_backend(spec.mllm), path,
                                           spec.descriptor_prompt or descriptions.DEFAULT_PROMPT)
    try:
        return descriptions.read_descriptors(path, class_names)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"evals.{name}.descriptors: {error}") from None


def class_names_and_texts(spec, name: str = "") -> tuple[list[str], Any]:
    """A zero_shot or descriptions spec's class names and the prompts its classifier embeds: the
    templates (zero_shot), or per class its description texts (descriptions); what
    `stored.store_eval_embeddings` needs to store a spec's prompts."""
    class_names, templates = class_names_and_templates(spec)
    if spec.type != "descriptions":
        return class_names, templates
    entry = _registry_entry(spec.classes or spec.data.dataset)
    return class_names, descriptions.class_texts(class_names, templates,
                                                 class_descriptors(name or "spec", spec, entry, class_names))


def check_among(evals: Mapping[str, Any]) -> None:
    """One-line ConfigErrors for an `among` that names no class subset of its spec, before any work."""
    for name, spec in evals.items():
        spec = eval_spec(**(spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)))
        if spec.among:
            _among(name, spec, class_subsets(spec) if spec.type in ("zero_shot", "descriptions") else {})


def _among(name: str, spec, subsets) -> np.ndarray | None:
    if not spec.among:
        return None
    if spec.type not in ("zero_shot", "descriptions"):
        raise ConfigError(f"evals.{name}.among applies to zero_shot and descriptions specs, not {spec.type!r}.")
    if spec.among not in (subsets or {}):
        raise ConfigError(f"evals.{name}.among={spec.among!r} is not one of the class subsets "
                          f"{sorted(subsets or {})} (set `subsets`, e.g. 'frequency').")
    return subsets[spec.among]


def build_evaluator(name: str, spec: Mapping[str, Any], preprocess, tokenizer, views: Views = clip_views) -> SpecEvaluator:
    """The evaluator one spec describes, scoring the view `spec.pred` of the model it runs on."""
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    check_fields(spec, eval_spec(), f"evals.{name}")
    spec = eval_spec(**spec)
    if spec.type not in ("zero_shot", "descriptions"):
        _among(name, spec, {})  # a one-line error where `among` would mean nothing
    if spec.type in compositional.TYPES:
        evaluator = compositional.build(name, spec, preprocess, tokenizer)
        inputs = lambda encoder: pixel_view(encoder, tokenizer, int(spec.batch_size))  # noqa: E731
        return SpecEvaluator(name, spec, evaluator, inputs, views)
    if spec.type not in TYPES:
        raise ConfigError(f"evals.{name}.type={spec.type!r} is not one of {[*TYPES, *compositional.TYPES]}.")
    if spec.stored_dir and (spec.type == "regions" or float(spec.region_weight) > 0):
        raise ConfigError(f"evals.{name}: region scores read the model's region queries, which stored embeddings "
                          "lack; set stored_dir='' (or region_weight=0).")
    batches = _batches(spec, preprocess, tokenizer)
    if spec.type in ("zero_shot", "descriptions"):
        entry = _registry_entry(spec.classes or spec.data.dataset)
        if not spec.data.label_key:
            spec.data.label_key = entry.label_key
        class_names, templates = class_names_and_templates(spec)
        subsets = _class_subsets(entry, spec.subsets, spec.data.tfds_name or entry.tfds_name or "")
        if spec.type == "zero_shot":
            evaluator = get_evaluator("zero_shot", data=batches, class_names=class_names, templates=templates,
                                      subsets=subsets, among=_among(name, spec, subsets))
        else:
            evaluator = get_evaluator("descriptions", data=batches, class_names=class_names, templates=templates,
                                      descriptors=class_descriptors(name, spec, entry, class_names),
                                      subsets=subsets, region_weight=float(spec.region_weight),
                                      among=_among(name, spec, subsets))
    elif spec.type == "regions":
        evaluator = get_evaluator("regions", data=batches)
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
