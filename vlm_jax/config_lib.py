"""Helpers shared by the experiment configs in `experiments/` (big_vision's `configs/common.py` role)."""

from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath


class ConfigError(ValueError):
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


def require_path(path: str | None, what: str, *, field: str) -> epath.Path:
    """Returns `path` as an epath.Path, or raises a one-line ConfigError if it is unset or missing."""
    if not path:
        raise ConfigError(f"{what} is not set; pass --config.{field}=PATH.")
    resolved = epath.Path(path)
    if not resolved.exists():
        raise ConfigError(f"{what} {str(resolved)!r} does not exist; fix --config.{field}.")
    return resolved
