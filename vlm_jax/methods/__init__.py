"""The method registry: one module per method, chosen by `config.method` and imported only when chosen."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from etils import epath

from vlm_jax.config_lib import ConfigError

if TYPE_CHECKING:
    from vlm_jax.train.trainer import Method

# Method name (config.method) -> "module:class".
METHODS = {
    "clip": "vlm_jax.methods.clip:ClipMethod",
    "reco": "vlm_jax.methods.reco:RecoMethod",
}


def get_method(name: str) -> Method:
    """A new instance of the method registered as `name` in `METHODS`."""
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r} is not a known method; expected one of {sorted(METHODS)}.")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def train_task(config, workdir: epath.Path) -> dict[str, float]:
    """The `train` task of `vlm_jax.main`: trains `config.method` in `workdir`."""
    from vlm_jax.train.trainer import train  # noqa: PLC0415 - keeps `import vlm_jax.methods.clip` light

    return train(config, workdir, get_method(config.method))
