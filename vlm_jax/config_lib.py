"""Config helpers: preset arguments, the one config-file loader, and field checks that turn a
misspelt or unknown key anywhere (sections, free-named sections, variant overrides) into one line."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import os
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from vlm_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config field or a path named by the config is wrong; the message says how to fix it."""


def parse_arg(arg: str | None, *, presets: tuple[str, ...], default: str, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config-file argument `preset[,key=value,...]`.

    `experiments/x.py:cars,smoke=True` gives {"preset": "cars", "smoke": True}. Option values are parsed
    as Python literals when they look like one (ints, floats, bools), else kept as strings; an option not
    named in `defaults` is an error, as is an unknown preset.
    """
    parts = [part for part in (arg or "").split(",") if part]
    preset = default
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {list(presets)}.")
    options = dict(defaults)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"config option {part!r} is not one of {sorted(defaults)} (form: key=value).")
        options[key] = _literal(value, like=defaults[key])
    return ml_collections.ConfigDict({"preset": preset, **options})


def _literal(text: str, *, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}.")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


def require_path(path: str | None, what: str, *, field: str, containing: tuple[str, ...] = ()) -> epath.Path:
    """Returns `path` as an epath.Path, or raises a one-line ConfigError if it is unset or missing, or
    (with `containing`) a directory holding none of those file names."""
    if not path:
        raise ConfigError(f"{what} is not set; pass --config.{field}=PATH.")
    resolved = epath.Path(path)
    try:
        if not resolved.exists():
            raise ConfigError(f"{what} {str(resolved)!r} does not exist; fix --config.{field}.")
        if containing and not any((resolved / name).exists() for name in containing):
            raise ConfigError(f"{what} {str(resolved)!r} has no {' or '.join(containing)}; fix --config.{field}.")
    except PermissionError:
        raise ConfigError(f"{what} {str(resolved)!r} is not readable (permission denied); "
                          f"fix its permissions or --config.{field}.") from None
    return resolved


def require_glob(paths: str | None, what: str, *, field: str) -> list[str]:
    """The files a comma-separated list of globs names (local or gs://), sorted per glob; a one-line
    ConfigError when it is unset or one glob matches nothing."""
    patterns = [pattern for pattern in str(paths or "").split(",") if pattern]
    if not patterns:
        raise ConfigError(f"{what} is not set; pass --config.{field}=GLOB.")
    files = []
    for pattern in patterns:
        if "://" in pattern:
            base = epath.Path(pattern)
            matches = sorted(str(match) for match in base.parent.glob(base.name))
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ConfigError(f"{what} {pattern!r} matches no file; fix --config.{field}.")
        files.extend(matches)
    return files


# Data sources that read files named by `paths` (vlm_jax.data.pipeline.default_config).
_FILE_SOURCES = ("array_record", "webdataset", "manifest")


def require_data_files(data: Any, where: str) -> None:
    """Checks, before anything is read, that the files a data section (`vlm_jax.data.pipeline`) names
    exist: its `paths` globs for file sources, its `root` for an image folder. `where` is the
    section's config path ("data", "train_data.cc12m")."""
    if not isinstance(data, (Mapping, ml_collections.ConfigDict)):
        return
    source = data.get("source", "tfds")
    if source in _FILE_SOURCES:
        require_glob(data.get("paths"), f"{where}.paths", field=f"{where}.paths")
    elif source == "image_folder":
        require_path(data.get("root"), f"{where}.root", field=f"{where}.root")


# Eval types that read a public benchmark's own files (vlm_jax.evaluate.compositional): the files its
# `path` names, or a folder holds.
BENCHMARK_FILES = {
    "sugarcrepe": ("add_obj.json", "add_att.json", "replace_obj.json", "replace_att.json", "replace_rel.json",
                   "swap_obj.json", "swap_att.json"),
    "aro_relation": ("visual_genome_relation.json",),
    "aro_attribution": ("visual_genome_attribution.json",),
    "coco_order": ("coco_karpathy_test.json",),
    "flickr30k_order": ("flickr30k_test.json",),
    "winoground": ("examples.jsonl",),
    "long_retrieval": ("docci_descriptions.jsonlines",),
}


def require_benchmark_path(spec: Any, where: str) -> epath.Path:
    """The file or folder a benchmark eval spec's `path` names (`where`: "evals.<name>"); a one-line
    ConfigError when it is unset, missing, or a folder holding none of the type's files."""
    path = require_path(spec.get("path"), f"{where}.path", field=f"{where}.path")
    if path.is_dir():  # a file path is taken as the benchmark's file, whatever its name
        require_path(str(path), f"{where}.path", field=f"{where}.path", containing=BENCHMARK_FILES[spec.get("type")])
    return path


def require_eval_files(evals: Any) -> None:
    """`require_data_files` for the data section of every eval spec (`evals.<name>.data`),
    `require_benchmark_path` for the specs that read a benchmark's files, and the descriptor file
    of a descriptions spec (`descriptors` a path)."""
    for name, spec in _as_dict(evals or {}).items():
        if not isinstance(spec, (Mapping, ml_collections.ConfigDict)):
            continue
        if "data" in spec:
            require_data_files(spec["data"], f"evals.{name}.data")
        if spec.get("type") in BENCHMARK_FILES:
            require_benchmark_path(spec, f"evals.{name}")
        descriptors = str(spec.get("descriptors", "") or "")
        if spec.get("among") and not spec.get("subsets"):
            raise ConfigError(f"evals.{name}.among={spec.get('among')!r} names a class subset, but evals.{name}.subsets "
                              "is empty; set it (e.g. 'frequency').")
        if spec.get("type") == "descriptions" and descriptors not in ("", "builder", "builder:attributes") \
                and not descriptors.startswith("mllm:"):
            # "mllm:<path>" is written on first use; a plain path must be there.
            require_path(descriptors, "the descriptor file", field=f"evals.{name}.descriptors")


class MapOf:
    """Schema of a section whose keys are free names (sources, evaluators, variants), each value
    checked against `schema` (a ConfigDict of defaults, another MapOf, or None for any value)."""

    def __init__(self, schema: Any):
        self.schema = schema


def _as_dict(section: Any) -> dict[str, Any]:
    if isinstance(section, ml_collections.ConfigDict):
        return dict(section.items())
    return dict(section)


def check_fields(config: Any, schema: Any, where: str = "config") -> None:
    """Raises a one-line ConfigError naming the first field of `config` that `schema` lacks.

    `schema` is a ConfigDict (or dict) of defaults: a nested ConfigDict/dict there is a section
    checked recursively, a `MapOf` a section of free names whose values are checked against its
    schema, and any other value a leaf (its value is not looked into).
    """
    if isinstance(schema, MapOf):
        if not isinstance(config, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(f"{where} must be a section of named entries, got {type(config).__name__}.")
        if schema.schema is not None:
            for name, value in _as_dict(config).items():
                check_fields(value, schema.schema, f"{where}.{name}")
        return
    if not isinstance(schema, (Mapping, ml_collections.ConfigDict)):
        return
    if not isinstance(config, (Mapping, ml_collections.ConfigDict)):
        raise ConfigError(f"{where} must be a section with fields {sorted(_as_dict(schema))}, got {config!r}.")
    known = _as_dict(schema)
    for key, value in _as_dict(config).items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else f"; expected one of {sorted(known)}"
            raise ConfigError(f"{where}.{key} is not a field{hint}")
        check_fields(value, known[key], f"{where}.{key}")


def merged(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
    """A copy of `config` with nested `overrides` applied; every overridden field must exist."""
    result = ml_collections.ConfigDict(config.to_dict())

    def apply(section: ml_collections.ConfigDict, values: Mapping[str, Any], path: str) -> None:
        for key, value in _as_dict(values).items():
            if key not in section:
                close = difflib.get_close_matches(key, list(section.keys()), n=1)
                hint = f"; did you mean {path}.{close[0]}?" if close else ""
                raise ConfigError(f"{path}.{key} is not a field of the experiment config{hint}")
            if isinstance(section[key], ml_collections.ConfigDict) and isinstance(
                    value, (Mapping, ml_collections.ConfigDict)):
                apply(section[key], value, f"{path}.{key}")
            else:
                try:
                    section[key] = tuple(value) if isinstance(value, list) else value
                except TypeError as error:
                    raise ConfigError(f"{path}.{key}: {error}") from None

    apply(result, overrides, where)
    return result


def typed(cls: type, section: Any, where: str) -> Any:
    """Builds the dataclass `cls` from a config section, rejecting fields it does not have (one
    line naming `where.field`); a field whose type is itself a dataclass is built recursively."""
    values = _as_dict(section) if section is not None else {}
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else f"; expected one of {sorted(fields)}"
            raise ConfigError(f"{where}.{key} is not a field{hint}")
        if dataclasses.is_dataclass(hints.get(key)) and not dataclasses.is_dataclass(value):
            value = typed(hints[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def experiment_module(path: str | epath.PathLike) -> Any:
    """The experiment config file at `path` as a module (experiments/ is a folder of files, not a
    package): the one config-file loader, used by `load_config_file` and by experiments that share
    another's snippets."""
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    spec = importlib.util.spec_from_file_location(f"experiments_{path.stem}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(argument: str) -> ml_collections.ConfigDict:
    """`path/to/experiment.py[:arg]` -> its `get_config(arg)`."""
    path, _, arg = str(argument).partition(":")
    return experiment_module(path).get_config(arg or None)


def defaults_of(cls: type) -> ml_collections.ConfigDict:
    """A dataclass's fields and defaults as a config section (nested dataclasses as sections; a None
    default as a typed placeholder, so `--config.a.b=1` can set it)."""
    hints = typing.get_type_hints(cls)
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        value = getattr(cls(), field.name)
        if dataclasses.is_dataclass(value):
            section[field.name] = defaults_of(type(value))
        elif value is None:
            kinds = [kind for kind in typing.get_args(hints[field.name]) if kind is not type(None)]
            base = typing.get_origin(kinds[0]) or kinds[0] if kinds else object
            section[field.name] = ml_collections.config_dict.placeholder(base)
        else:
            section[field.name] = value
    return section
