"""Evaluators built from a config section, for the eval tasks and the trainer's periodic eval hooks.

`config.evals` maps a name to one evaluator spec; metrics come back prefixed with `<name>/`:

    config.evals.cars = dict(
        type="zero_shot",             # a registered evaluator: "zero_shot" | "retrieval"
        data=dict(dataset="cars", split="test", data_dir=None),   # pipeline.default_config() fields
        classes="",                   # registry name giving class names and templates ("": data.dataset)
        templates=(),                 # override the registry's prompt templates ("{}" = class name)
        subsets="",                   # "frequency": per common/rare/novel top-1 (datasets that define it)
        batch_size=256,
        max_examples=0,               # evaluate on the first N examples only (0: all)
    )
    config.evals.shapes_retrieval = dict(
        type="retrieval",
        data=dict(source="tfds", tfds_name="shapes_world/default", split="eval_retrieval",
                  text_keys=("dense_caption",), texts_per_example=1),
    )

Every process evaluates the whole eval set (eval sets are small next to training data), so metrics
are identical on all processes of a multi-host job.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config_lib import ConfigError
from vlm_jax.data import datasets, pipeline
from vlm_jax.evaluate.common import Evaluator, get_evaluator


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
        }
    )
    spec.data.shuffle = False
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
    _register_builder(spec.data.tfds_name)
    source = pipeline.make_source(spec.data)
    if spec.max_examples:
        source = _Head(source, spec.max_examples)

    def batches():
        return pipeline.make_eval_iterator(
            spec.data, preprocess, tokenizer, spec.batch_size, process_index=0, process_count=1, source=source
        )

    return batches


class _Head:
    """The first `count` records of a random-access source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.source[index]


class _Prefixed:
    """Runs an evaluator and puts `<name>/` in front of its metric names."""

    def __init__(self, name: str, evaluator: Evaluator):
        self.name, self.evaluator = name, evaluator

    def run(self, model) -> dict[str, float]:
        return {f"{self.name}/{key}": value for key, value in self.evaluator.run(model).items()}


def build_evaluator(name: str, spec: Mapping[str, Any], preprocess, tokenizer) -> Evaluator:
    """The evaluator one spec describes; its metrics are prefixed with `<name>/`."""
    spec = eval_spec(**(spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)))
    batches = _batches(spec, preprocess, tokenizer)
    if spec.type == "zero_shot":
        entry = _registry_entry(spec.classes or spec.data.dataset)
        if not spec.data.label_key:
            spec.data.label_key = entry.label_key
        evaluator = get_evaluator(
            "zero_shot",
            data=batches,
            tokenizer=tokenizer,
            class_names=entry.class_names(data_dir=spec.data.data_dir),
            templates=list(spec.templates) or entry.templates,
            batch_size=spec.batch_size,
            subsets=_class_subsets(entry, spec.subsets, spec.data.tfds_name or entry.tfds_name or ""),
        )
    elif spec.type == "retrieval":
        if not spec.data.text_keys or not spec.data.texts_per_example:
            raise ConfigError(f"evals.{name}: retrieval needs data.text_keys and data.texts_per_example.")
        evaluator = get_evaluator("retrieval", data=batches, batch_size=spec.batch_size)
    else:
        raise ConfigError(f"evals.{name}.type={spec.type!r} is not one of 'zero_shot', 'retrieval'.")
    return _Prefixed(name, evaluator)


def build_evaluators(evals: Mapping[str, Any], preprocess, tokenizer) -> dict[str, Evaluator]:
    """{name: evaluator} for every spec in a `config.evals` section."""
    return {name: build_evaluator(name, spec, preprocess, tokenizer) for name, spec in evals.items()}


def run_evaluators(evaluators: Mapping[str, Evaluator], model) -> dict[str, float]:
    """Runs every evaluator on `model` and merges their metrics."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators.values():
        metrics.update(evaluator.run(model))
    return metrics
