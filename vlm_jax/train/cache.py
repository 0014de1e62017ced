"""Build once, share everywhere: a run directory keyed by the resolved config that builds it.

    directory = cached_run(config, lambda d: train(config, workdir=d), dataset_version="shapes_world/default:1.0.0")

The key is a hash of the resolved config (JSON, sorted keys) and the dataset version, so any change
to either names a new directory under the cache root. Fields whose value equals the code's default
(`defaults`, e.g. the trainer's and the data section's defaults) are left out of it: a release that
adds a field with a default keeps every cached build, while setting any field to another value still
names a new one. The cache root is (`$VLM_JAX_CACHE`, else `$XDG_CACHE_HOME/vlm_jax`,
else `~/.cache/vlm_jax`). An exclusive `fcntl` lock per key serializes builders: a second caller
waits for the first, then finds the completion marker and reuses the result. A build that dies
(SIGKILL, preemption, an exception) leaves its directory without the marker; the next call runs
`build` again in the same directory, which resumes when the builder does (the trainer resumes from
the checkpoints in its workdir). The marker, `COMPLETE.json`, holds the key material; it is written
after `build` returns, and a caller's `finished` check (say, that the export inside has its own
completion marker) must also hold for a directory to be reused, else it is built again. A cache root
that cannot be created or written is a one-line UserError naming it.

fcntl locks are advisory and per host: a cache root shared between machines needs a file system
whose locks reach every host (local disks and NFSv4 do; most object stores do not).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from vlm_jax import console
from vlm_jax.errors import UserError
from vlm_jax.files import write_atomic

MARKER = "COMPLETE.json"
KEY_FILE = "key.json"


def default_root() -> pathlib.Path:
    """`$VLM_JAX_CACHE`, else `$XDG_CACHE_HOME/vlm_jax`, else `~/.cache/vlm_jax`."""
    if os.environ.get("VLM_JAX_CACHE"):
        return pathlib.Path(os.environ["VLM_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "vlm_jax"


def _plain(value: Any) -> Any:
    """A config (or mapping) as plain JSON data: a round trip turns tuples into lists."""
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# In `defaults`, a section {EVERY: spec} gives the defaults of each entry of a section of free names
# (evaluators, sources).
EVERY = "*"


def _without_defaults(config: Any, defaults: Any) -> Any:
    """`config` without the fields whose value equals the one at the same place in `defaults`, and
    without the sections left empty by that."""
    if not isinstance(config, dict) or not isinstance(defaults, dict):
        return config
    kept = {}
    for name, value in config.items():
        default = defaults.get(name, defaults.get(EVERY))
        if name not in defaults and EVERY not in defaults:
            kept[name] = value
        elif value != default:
            pruned = _without_defaults(value, default)
            if pruned != {} or value == {}:
                kept[name] = pruned
    return kept


def key_material(config: Any, dataset_version: str, defaults: Any = None) -> dict[str, Any]:
    """What the key hashes: the resolved config as plain JSON data, less the fields at their value in
    `defaults` (a config of the code's defaults, or None), and the dataset version."""
    resolved = _plain(config if hasattr(config, "to_dict") else dict(config))
    if defaults is not None:
        resolved = _without_defaults(resolved, _plain(defaults))
    return {"config": resolved, "dataset_version": str(dataset_version)}


def cache_key(config: Any, dataset_version: str, defaults: Any = None) -> str:
    """16 hex digits of the sha256 of `key_material` as sorted JSON."""
    text = json.dumps(key_material(config, dataset_version, defaults), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
    # Written whole or not at all, so a reader never sees half a marker.
    write_atomic(str(path), lambda file: file.write(json.dumps(value, indent=1, sort_keys=True) + "\n"), binary=False)


def _lock(path: pathlib.Path, timeout: float):
    """An open file holding an exclusive flock on `path`; a UserError after `timeout` seconds."""
    handle = open(path, "a+")  # noqa: SIM115 - closed by the caller, which holds the lock until then
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise UserError(
                    f"waited {timeout:.0f} s for the lock {path} held by another build of the same run; "
                    "wait for it to finish, or remove the lock file if no such process is alive."
                ) from None
            if not announced:
                console.say(f"Another process is building {path.with_suffix('')}; waiting for it.")
                announced = True
            time.sleep(0.2)


def cached_run(
    config: Any,
    build: Callable[[pathlib.Path], Any],
    *,
    root: str | os.PathLike | None = None,
    dataset_version: str = "",
    lock_timeout: float = 6 * 3600.0,
    finished: Callable[[pathlib.Path], bool] | None = None,
    defaults: Any = None,
) -> pathlib.Path:
    """The directory of the completed run of `config`, running `build(directory)` only if needed.

    Args:
      config: the resolved config (an ml_collections ConfigDict or a mapping of JSON-able values).
      build: called with the run directory (created, maybe holding an unfinished earlier build) and
        expected to leave a finished run there; its return value is ignored.
      root: cache root (default `default_root()`).
      dataset_version: names the data the run reads, so rebuilt data gets a new directory.
      lock_timeout: seconds to wait for another process building the same key.
      finished: what else a completed directory must satisfy to be reused (None: nothing); one that
        fails it is built again in place.
      defaults: the code's default config; fields of `config` at these values are not in the key.
    Returns:
      <root>/<cache_key>, holding COMPLETE.json.
    """
    root = pathlib.Path(root).expanduser() if root is not None else default_root()
    key = cache_key(config, dataset_version, defaults)
    directory = root / key

    def complete() -> bool:
        return (directory / MARKER).exists() and (finished is None or finished(directory))

    try:
        root.mkdir(parents=True, exist_ok=True)
        if complete():
            console.say(f"reusing cached base model at {directory}")
            return directory
        handle = _lock(root / f"{key}.lock", lock_timeout)
    except PermissionError as error:
        raise UserError(f"the cache root {root} is not writable ({error.filename or root}: permission denied); "
                        "set --config.cache_dir or VLM_JAX_CACHE to a writable directory.") from None
    try:
        if complete():  # another process finished it while this one waited
            console.say(f"reusing cached base model at {directory}")
            return directory
        material = key_material(config, dataset_version, defaults)
        if directory.exists():
            console.say(f"resuming the unfinished cached build at {directory}")
            # A marker without what `finished` asks for is stale: remove it before building again.
            (directory / MARKER).unlink(missing_ok=True)
        else:
            console.say(f"building the cached run at {directory}")
            directory.mkdir()
            _write_json(directory / KEY_FILE, material)
        started = time.time()
        build(directory)
        _write_json(directory / MARKER, {**material, "key": key, "build_seconds": time.time() - started,
                                         "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return directory
    finally:
        handle.close()
