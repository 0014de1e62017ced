"""The run cache: one build per resolved config and dataset version, shared, locked, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from vlm_jax.errors import UserError
from vlm_jax.train import cache


def _config(**changes):
    config = ml_collections.ConfigDict({"model": {"width": 128, "stem": "conv"}, "total_steps": 10, "seed": 0})
    config.update(changes)
    return config


def test_same_config_reuses_one_directory_and_builds_once(tmp_path, capsys):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "export").mkdir()

    first = cache.cached_run(_config(), build, root=tmp_path, dataset_version="v1")
    capsys.readouterr()
    second = cache.cached_run(_config(), build, root=tmp_path, dataset_version="v1")
    assert first == second and calls == [first]
    assert (first / "export").is_dir()
    assert capsys.readouterr().out == f"reusing cached base model at {first}\n"  # a console line
    marker = json.loads((first / cache.MARKER).read_text())
    assert marker["config"]["model"]["stem"] == "conv" and marker["dataset_version"] == "v1"


def test_key_follows_resolved_config_not_key_order():
    reordered = ml_collections.ConfigDict({"seed": 0, "total_steps": 10, "model": {"stem": "conv", "width": 128}})
    assert cache.cache_key(_config(), "v1") == cache.cache_key(reordered, "v1")
    reference = ml_collections.FieldReference(10)
    with_reference = _config()
    with_reference.total_steps = reference
    assert cache.cache_key(_config(), "v1") == cache.cache_key(with_reference, "v1")


def test_different_config_or_dataset_version_gets_a_different_directory(tmp_path):
    built = []
    build = built.append
    base = cache.cached_run(_config(), build, root=tmp_path, dataset_version="v1")
    other_config = cache.cached_run(_config(total_steps=11), build, root=tmp_path, dataset_version="v1")
    other_data = cache.cached_run(_config(), build, root=tmp_path, dataset_version="v2")
    assert len({base, other_config, other_data}) == 3 and len(built) == 3


def test_fields_at_their_default_leave_the_key_unchanged_and_others_change_it():
    defaults = ml_collections.ConfigDict({"total_steps": 1000, "seed": 0, "data": {"augment": "none", "shuffle": True,
                                                                                   "sentence_sampling": False}})
    before = ml_collections.ConfigDict({"model": {"width": 128}, "total_steps": 10, "data": {"augment": "none"}})
    grown = ml_collections.ConfigDict({"model": {"width": 128}, "total_steps": 10, "seed": 0,
                                       "data": {"augment": "none", "shuffle": True, "sentence_sampling": False}})
    assert cache.cache_key(before, "v1", defaults) == cache.cache_key(grown, "v1", defaults)
    assert cache.cache_key(before, "v1") != cache.cache_key(grown, "v1")  # without defaults every field counts
    changed = ml_collections.ConfigDict(grown.to_dict())
    changed.data.sentence_sampling = True
    assert cache.cache_key(changed, "v1", defaults) != cache.cache_key(grown, "v1", defaults)
    assert cache.key_material(grown, "v1", defaults)["config"] == {"model": {"width": 128}, "total_steps": 10}
    # Entries of a section of free names (evaluators) against one spec's defaults.
    every = {"evals": {cache.EVERY: {"type": "zero_shot", "batch_size": 256, "path": ""}}}
    old = {"evals": {"cars": {"type": "zero_shot", "batch_size": 64}}}
    new = {"evals": {"cars": {"type": "zero_shot", "batch_size": 64, "path": ""}}}
    assert cache.cache_key(old, "v1", every) == cache.cache_key(new, "v1", every)
    assert cache.key_material(new, "v1", every)["config"] == {"evals": {"cars": {"batch_size": 64}}}


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path / "explicit"))
    assert cache.default_root() == tmp_path / "explicit"
    monkeypatch.delenv("VLM_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_root() == tmp_path / "xdg" / "vlm_jax"


_CHILD = textwrap.dedent("""
    import os, sys, time
    import ml_collections
    from vlm_jax.train import cache

    root, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    def build(directory):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {directory}\\n")
        (directory / "partial").write_text("half")
        if mode == "die":
            os.kill(os.getpid(), 9)
        time.sleep(1.5)  # long enough that the other process reaches the lock
        (directory / "export").mkdir()

    config = ml_collections.ConfigDict({"model": {"width": 128}, "total_steps": 10})
    print(cache.cached_run(config, build, root=root, dataset_version="v1"))
""")


def _child(tmp_path, mode):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "cache"), str(tmp_path / "log"), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_at_once_build_once_and_share_the_result(tmp_path):
    children = [_child(tmp_path, "ok"), _child(tmp_path, "ok")]
    outputs = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    directories = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(directories) == 1
    assert len((tmp_path / "log").read_text().splitlines()) == 1


def test_killed_build_resumes_in_the_same_directory(tmp_path):
    child = _child(tmp_path, "die")
    child.communicate(timeout=120)
    assert child.returncode == -9
    (directory,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert not (directory / cache.MARKER).exists()

    seen = []

    def resume(run_directory):
        seen.append((run_directory, (run_directory / "partial").read_text()))
        (run_directory / "export").mkdir()

    config = ml_collections.ConfigDict({"model": {"width": 128}, "total_steps": 10})
    result = cache.cached_run(config, resume, root=tmp_path / "cache", dataset_version="v1", lock_timeout=10)
    assert result == directory and seen == [(directory, "half")]
    assert (directory / cache.MARKER).exists()


def test_a_completed_directory_that_fails_the_finished_check_is_built_again_in_place(tmp_path):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "export").mkdir(exist_ok=True)
        (directory / "export" / "done").write_text("")

    def finished(directory):
        return (directory / "export" / "done").exists()

    first = cache.cached_run(_config(), build, root=tmp_path, finished=finished)
    (first / "export" / "done").unlink()  # the export inside lost its completion marker
    second = cache.cached_run(_config(), build, root=tmp_path, finished=finished)
    assert first == second and calls == [first, first] and finished(first) and (first / cache.MARKER).exists()
    cache.cached_run(_config(), build, root=tmp_path, finished=finished)
    assert len(calls) == 2


def test_an_unwritable_cache_root_is_a_one_line_user_error_naming_it(tmp_path, monkeypatch):
    root = tmp_path / "cache"

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(root), "mkdir", refuse)
    with pytest.raises(UserError) as error:
        cache.cached_run(_config(), lambda directory: None, root=root)
    message = str(error.value)
    assert message.startswith(f"the cache root {root} is not writable") and "VLM_JAX_CACHE" in message
    assert "\n" not in message
