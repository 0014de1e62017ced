"""The workdir: one run at a time (LOCK), a write probe before any work, and the config history."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from vlm_jax import main
from vlm_jax.errors import UserError
from vlm_jax.train import workdir

REPO = Path(__file__).resolve().parents[1]


def _write_lock(directory: Path, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "command": "python -m vlm_jax.main --config=x.py", **fields}
    (directory / workdir.LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_workdir_fails_at_once_naming_the_first(tmp_path):
    with workdir.WorkdirLock(tmp_path, command="first run"):
        holder = json.loads((tmp_path / "LOCK").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "first run" and holder["started"]
        started = time.perf_counter()
        with pytest.raises(workdir.WorkdirBusyError) as busy:
            workdir.WorkdirLock(tmp_path, command="second run").acquire()
        assert time.perf_counter() - started < 1
    message = str(busy.value)
    assert "\n" not in message
    for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", f"since {holder['started']}", "first run"):
        assert part in message
    assert not (tmp_path / "LOCK").exists()


RACER = """
import pathlib, sys, time
from vlm_jax.train import workdir
work, signals = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(signals / f"ready.{sys.argv[3]}").touch()
while not (signals / "go").exists():
    time.sleep(0.01)
try:
    lock = workdir.WorkdirLock(work).acquire()
except workdir.WorkdirBusyError:
    print("busy")
    sys.exit(0)
print("won")
sys.stdout.flush()
while not (signals / "done").exists():
    time.sleep(0.01)
lock.release()
"""


def test_of_several_starts_racing_for_one_workdir_exactly_one_wins(tmp_path):
    work, signals = tmp_path / "work", tmp_path / "signals"
    signals.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(work), str(signals), str(index)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(4)]
    deadline = time.time() + 120
    while len(list(signals.glob("ready.*"))) < len(racers) and time.time() < deadline:
        time.sleep(0.05)
    (signals / "go").touch()
    outcomes = []
    for racer in racers:
        line = racer.stdout.readline().strip()
        outcomes.append(line)
        if line == "won":
            assert (work / "LOCK").exists()
    (signals / "done").touch()
    for racer in racers:
        racer.communicate(timeout=60)
        assert racer.returncode == 0
    assert sorted(outcomes) == ["busy", "busy", "busy", "won"], outcomes
    assert not (work / "LOCK").exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), workdir.WorkdirLock(tmp_path):
        assert (tmp_path / "LOCK").exists()
        raise RuntimeError("boom")
    assert not (tmp_path / "LOCK").exists()
    with workdir.WorkdirLock(tmp_path):
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level("WARNING"), workdir.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    taken = [message for message in _warnings(caplog) if "Taking over the lock" in message]
    assert len(taken) == 1 and f"pid {dead}" in taken[0]
    assert not (tmp_path / "LOCK").exists()


def test_an_empty_lock_left_by_a_writer_that_died_is_taken_over(tmp_path, caplog):
    (tmp_path / "LOCK").write_text("")
    with caplog.at_level("WARNING"), workdir.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    assert any("Taking over the lock" in message for message in _warnings(caplog))


def test_a_lock_of_a_live_other_process_or_another_host_refuses_and_stays(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=other.pid)
        before = (tmp_path / "LOCK").read_text()
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {other.pid}, since 2026-01-01"):
            workdir.WorkdirLock(tmp_path).acquire()
        assert (tmp_path / "LOCK").read_text() == before
    finally:
        other.kill()
        other.wait()
    # A dead pid on another host cannot be checked, so it still refuses.
    _write_lock(tmp_path, pid=_dead_pid(), host="another-host")
    with pytest.raises(workdir.WorkdirBusyError, match="host another-host"):
        workdir.WorkdirLock(tmp_path).acquire()


def test_only_process_0_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir, "_process_index", lambda: 1)
    _write_lock(tmp_path)  # held by "process 0" (this test process)
    with workdir.WorkdirLock(tmp_path):
        pass
    assert (tmp_path / "LOCK").exists()


# --------------------------------------------------------------------------------------------------
# Write probe
# --------------------------------------------------------------------------------------------------


def test_an_unwritable_directory_is_one_line_naming_it(tmp_path, unwritable):
    target = unwritable(tmp_path / "checkpoints")
    with pytest.raises(UserError, match="cannot write the checkpoint directory") as failure:
        workdir.check_writable(target, "the checkpoint directory")
    assert str(target) in str(failure.value) and "\n" not in str(failure.value)
    workdir.check_writable(tmp_path / "new" / "nested", "the workdir")
    assert sorted(os.listdir(tmp_path / "new" / "nested")) == []


# --------------------------------------------------------------------------------------------------
# Config history
# --------------------------------------------------------------------------------------------------


def _config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"task": "train", "optim": {"learning_rate": 1e-3, "betas": (0.9, 0.98)},
                                        "model": {"width": 64, "depth": 2}})
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def test_config_changes_are_dotted_paths_with_old_and_new_values():
    old = workdir.resolved_config(_config())
    new = workdir.resolved_config(_config(**{"optim.learning_rate": 2e-3, "model.width": 32}))
    assert workdir.config_changes(old, new) == [("model.width", 64, 32), ("optim.learning_rate", 1e-3, 2e-3)]
    assert workdir.config_changes(old, workdir.resolved_config(_config())) == []  # tuples compare as lists


def test_a_changed_config_warns_once_and_a_changed_model_refuses(tmp_path, caplog):
    workdir.record_config(tmp_path, _config())
    with caplog.at_level("WARNING"):
        changes = workdir.check_config_change(tmp_path, _config(**{"optim.learning_rate": 2e-3}),
                                              refuse_model_change=True)
    assert [path for path, _, _ in changes] == ["optim.learning_rate"]
    lines = [message for message in _warnings(caplog) if "config differs" in message]
    assert len(lines) == 1 and "optim.learning_rate: 0.001 -> 0.002" in lines[0]
    with pytest.raises(UserError, match=r"changes the model .*\(model\.width\).*allow_config_change=True"):
        workdir.check_config_change(tmp_path, _config(**{"model.width": 32}), refuse_model_change=True)
    assert workdir.check_config_change(tmp_path, _config(**{"model.width": 32}), refuse_model_change=False)


def test_every_start_appends_one_history_line_and_config_json_holds_the_latest(tmp_path):
    workdir.record_config(tmp_path, _config())
    workdir.record_config(tmp_path, _config(**{"optim.learning_rate": 2e-3}), resumed_from=4)
    history = workdir.read_history(tmp_path)
    assert [record["resumed_from_step"] for record in history] == [None, 4]
    assert [record["config"]["optim"]["learning_rate"] for record in history] == [1e-3, 2e-3]
    assert all(record["host"] == socket.gethostname() and record["time"] for record in history)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 2e-3
    assert not (tmp_path / "config.json.partial").exists()


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def test_main_run_holds_the_lock_around_the_task_and_records_a_non_trainer_config(tmp_path, monkeypatch):
    seen = {}

    def task(config, directory):
        seen["holder"] = json.loads((Path(directory) / "LOCK").read_text())
        with pytest.raises(workdir.WorkdirBusyError):
            main.run(config, str(directory))
        return {"done": 1.0}

    monkeypatch.setattr(main, "resolve_task", lambda name: task)
    config = ml_collections.ConfigDict({"task": "reco", "seed": 0})
    assert main.run(config, str(tmp_path)) == {"done": 1.0}
    assert seen["holder"]["pid"] == os.getpid()
    assert not (tmp_path / "LOCK").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {"task": "reco", "seed": 0}
    assert len(workdir.read_history(tmp_path)) == 1

    def failing(config, directory):
        raise RuntimeError("task failed")

    monkeypatch.setattr(main, "resolve_task", lambda name: failing)
    with pytest.raises(RuntimeError, match="task failed"):
        main.run(config, str(tmp_path))
    assert not (tmp_path / "LOCK").exists()
    assert len(workdir.read_history(tmp_path)) == 2


def test_main_run_into_an_unwritable_workdir_is_one_line_at_once(tmp_path, monkeypatch, unwritable):
    target = unwritable(tmp_path / "work")
    monkeypatch.setattr(main, "resolve_task", lambda name: pytest.fail)
    started = time.perf_counter()
    with pytest.raises(UserError, match="cannot write the workdir") as failure:
        main.run(ml_collections.ConfigDict({"task": "train"}), str(target))
    assert time.perf_counter() - started < 10
    assert str(target) in str(failure.value)


@pytest.mark.slow
def test_the_cli_into_a_busy_workdir_exits_2_with_one_line_naming_the_other_run(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with workdir.WorkdirLock(tmp_path / "busy", command="the first run"):
        result = subprocess.run(
            [sys.executable, "-m", "vlm_jax.main", "--config=experiments/clip.py:shapes,smoke=True",
             f"--workdir={tmp_path / 'busy'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"pid {os.getpid()}" in lines[0] and "the first run" in lines[0]
    assert not (tmp_path / "busy" / "config.json").exists()
