"""Export and import of a model's heads: a params subtree in one safetensors file plus its config.

A head is every param whose "a/b/c" name a selector picks: a path prefix (``"fusion/"``) or a
predicate over names (``lambda name: not name.startswith("clip/")`` for everything a method trained
on top of a frozen CLIP). ``save_head`` writes

    <directory>/head.safetensors   the selected params, named "a/b/c", in their stored dtype
    <directory>/head.json          {"config": <the JSON config given>, "params": [the names]}

and ``load_head`` fills the same names of a model built from that config (``read_head_config``),
failing in one sentence (a `CheckpointMismatchError`, a UserError) that names the file and the first
differing param; a missing, unreadable or corrupt file is a UserError naming it. The export is atomic
(`vlm_jax.weights.atomic`): the directory holds the whole head, ending with export_complete.json, or
what it held before. The model is read and written on the host: pass a host-local model (the trainer
exports one on process 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from vlm_jax.errors import UserError
from vlm_jax.weights import atomic, hf_clip, safetensors_dir

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"

Selector = str | Callable[[str], bool]


def _matcher(include: Selector) -> Callable[[str], bool]:
    if isinstance(include, str):
        return lambda name: name.startswith(include)
    return include


def select_params(model: nnx.Module, include: Selector) -> dict[str, tuple[tuple, nnx.Variable]]:
    """{"a/b/c" name: (state path, Param)} of the params of `model` that `include` selects."""
    matches = _matcher(include)
    selected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if matches(name):
            selected[name] = (path, variable)
    return selected


def save_head(model: nnx.Module, directory: epath.PathLike, config: Mapping[str, Any], *,
              include: Selector) -> list[str]:
    """Writes the params `include` selects and `config` (JSON-serializable) to `directory`.

    Returns the sorted names written; raises ValueError when `include` selects nothing.
    """
    selected = select_params(model, include)
    if not selected:
        raise ValueError(f"the selector {include!r} matches no param of the model; pass a path prefix "
                         "such as 'fusion/' or a predicate over 'a/b/c' names that matches the head")
    names = sorted(selected)
    tensors = {name: np.require(np.asarray(selected[name][1][...]), requirements="C") for name in names}
    record = {"config": dict(config), "params": names}
    with atomic.atomic_export(directory, format="head") as staging:
        (staging / WEIGHTS_FILE).write_bytes(safetensors.numpy.save(tensors))
        (staging / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return names


def read_head_config(directory: epath.PathLike) -> dict[str, Any]:
    """The config `save_head` stored in `directory`, to build the model that `load_head` fills."""
    config_file = epath.Path(directory) / CONFIG_FILE
    if not config_file.exists():
        raise UserError(f"no {CONFIG_FILE} in {directory}; expected a directory written by save_head.")
    record = safetensors_dir.read_json(config_file)
    if not isinstance(record.get("config"), dict):
        raise UserError(f"{config_file} has no config section; it is corrupt: export the head again.")
    return record["config"]


def load_head(model: nnx.Module, directory: epath.PathLike, *, include: Selector | None = None) -> list[str]:
    """Fills the params of `model` from the head saved in `directory`, in place; returns the names.

    include: the params the head must cover exactly (those of the model it selects); None: exactly
    the names the file holds. Tensors are cast to each param's dtype. Raises CheckpointMismatchError
    naming the file and the first differing param (by name) and counting every missing, unexpected
    and mis-shaped one.
    """
    directory = epath.Path(directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.exists():
        raise UserError(f"no {WEIGHTS_FILE} in {directory}; expected a directory written by save_head.")
    tensors = safetensors_dir.read_file(weights_file)
    everything = select_params(model, lambda name: True)
    expected = set(select_params(model, include)) if include is not None else set(tensors)
    missing = sorted(expected - set(tensors))
    unexpected = sorted(name for name in tensors if name not in expected or name not in everything)
    mismatched = {
        name: f"{name} (file {tuple(tensors[name].shape)}, model {tuple(everything[name][1].shape)})"
        for name in sorted(expected & set(tensors) & set(everything))
        if tuple(tensors[name].shape) != tuple(everything[name][1].shape)}
    differences = sorted([*(f"{name} (missing from the file)" for name in missing), *mismatched.values()])
    differences += [f"{name} (not in the model)" for name in unexpected]
    if differences:
        raise hf_clip.mismatch_error(
            str(weights_file), against="the model it is loaded into",
            first=differences[0], missing=missing, unexpected=unexpected, mismatched=list(mismatched.values()),
            fix=f"build the model from read_head_config({str(directory)!r}) and select the same params it was "
                "saved with.")
    names = sorted(tensors)
    updates = []
    for name in names:
        path, variable = everything[name]
        updates.append((path, variable.replace(jnp.asarray(tensors[name], variable.get_value().dtype))))
    nnx.update(model, nnx.from_flat_state(updates))
    return names
