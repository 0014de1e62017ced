"""The method registry: one module per method, chosen by `config.method` and imported only when chosen.

A method may offer `check_config(config)`, raising a one-line ConfigError for a path or field that
would fail later (a missing clip_dir, tokenizer or data glob); `train_task` calls it before the
trainer builds anything.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from etils import epath

from vlm_jax.config_lib import ConfigError
from vlm_jax.errors import Preempted

if TYPE_CHECKING:
    from vlm_jax.train.trainer import Method

# Method name (config.method) -> "module:class".
METHODS = {
    "clip": "vlm_jax.methods.clip:ClipMethod",
    "reco": "vlm_jax.methods.reco:RecoMethod",
    "captioner": "vlm_jax.mllm.training:CaptionerMethod",  # the embedded MLLM (experiments/captioner.py)
    "recap": "vlm_jax.methods.recap:RecapMethod",  # CLIP on a caption/recaption mixture (experiments/recap.py)
    "grain": "vlm_jax.methods.grain_clip:GrainMethod",  # region queries over image tokens (experiments/grain_clip.py)
}


def get_method(name: str) -> Method:
    """A new instance of the method registered as `name` in `METHODS`."""
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r} is not a known method; expected one of {sorted(METHODS)}.")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def train_task(config, workdir: epath.Path) -> dict[str, float]:
    """The `train` task of `vlm_jax.main`: checks the config, trains `config.method` in `workdir`;
    raises Preempted when the trainer stopped on SIGTERM (its checkpoint resumes the run)."""
    from vlm_jax.train.trainer import train  # noqa: PLC0415 - keeps `import vlm_jax.methods.clip` light

    method = get_method(config.method)
    if hasattr(method, "check_config"):
        method.check_config(config)
    metrics = train(config, workdir, method)
    if "preempted_at_step" in metrics:
        raise Preempted(f"stopped at step {int(metrics['preempted_at_step'])} in {workdir}")
    return metrics


def captioner_task(config, workdir: epath.Path) -> dict[str, float]:
    """The `captioner` task (experiments/captioner.py): the base CLIP resolved to a directory (the
    cached CLIP of `clip_config` when clip_dir is empty), then the `train` task (method "captioner")."""
    from vlm_jax.methods.runner import resolve_captioner_clip  # noqa: PLC0415

    return train_task(resolve_captioner_clip(config), workdir)
