"""The entry point: configs, overrides, one-line errors, exit codes, preemption, gs:// preflight, and
the zero-shot task end to end."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from vlm_jax import config_lib
from vlm_jax import main as main_module
from vlm_jax.errors import EXIT_BUG, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError
from vlm_jax.main import TASKS, default_workdir, resolve_task

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, cwd=REPO, timeout=600, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_parse_arg_reads_preset_and_typed_options():
    arg = config_lib.parse_arg("cars,smoke=true,steps=7", presets=("shapes", "cars"), default="shapes",
                               smoke=False, steps=100)
    assert (arg.preset, arg.smoke, arg.steps) == ("cars", True, 7)
    assert config_lib.parse_arg(None, presets=("shapes",), default="shapes", smoke=False).preset == "shapes"
    assert config_lib.parse_arg("smoke=1", presets=("shapes",), default="shapes", smoke=False).smoke is True


@pytest.mark.parametrize("bad", ["nope", "shapes,smok=1", "shapes,smoke"])
def test_parse_arg_rejects_unknown_presets_and_options(bad):
    with pytest.raises(config_lib.ConfigError):
        config_lib.parse_arg(bad, presets=("shapes",), default="shapes", smoke=False)


def test_default_workdir_names_experiment_and_argument():
    assert default_workdir("experiments/reco.py") == "workdirs/reco"
    assert default_workdir("experiments/clip.py:cc12m_b16,smoke=True") == "workdirs/clip_cc12m_b16_smoke=True"


def test_every_registered_task_imports():
    for name in TASKS:
        assert callable(resolve_task(name))
    with pytest.raises(config_lib.ConfigError, match="not a known task"):
        resolve_task("no_such_task")


def test_require_path_errors_name_the_field(tmp_path):
    assert config_lib.require_path(str(tmp_path), "x", field="a.b") == tmp_path
    with pytest.raises(config_lib.ConfigError, match=r"--config\.a\.b"):
        config_lib.require_path(str(tmp_path / "missing"), "x", field="a.b")
    with pytest.raises(config_lib.ConfigError, match="not set"):
        config_lib.require_path("", "x", field="a.b")


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\n```[a-z]*\n(.+)\n", readme).group(1)
    assert command.startswith("python -m pytest")
    assert "test-command" in (REPO / ".ci" / "run").read_text()


def test_misspelt_override_is_a_one_line_error(tmp_path):
    result = run_main("--config=experiments/zero_shot.py", "--config.evals.shapes.batch_sise=8",
                      f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "batch_sise" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    result = run_main("--config=experiments/zero_shot.py:cars", f"--config.clip_dir={tmp_path}/nope",
                      f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the pretrained CLIP directory '{tmp_path}/nope' does not exist; fix --config.clip_dir."
    )


ABSL_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def output_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not absl log records (main's own output: errors, preemption)."""
    return [line for line in stderr.splitlines() if not ABSL_LOG_LINE.match(line)]


def _tokenizer_dir(tmp_path) -> str:
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("{}")
    return str(directory)


@pytest.mark.parametrize("case", ["lit_b16_without_clip_dir", "missing_tokenizer_dir", "missing_data_glob",
                                  "clip_dir_without_config_json"])
def test_a_bad_path_is_one_error_line_and_exit_2_before_any_data_is_built(tmp_path, case):
    cases = {
        "lit_b16_without_clip_dir": (["--config=experiments/clip.py:lit_b16,smoke=True"],
                                     "error: clip_dir is not set, but optim.trainable freezes ^vision_model/"),
        "missing_tokenizer_dir": (["--config=experiments/clip.py:cc3m_b16,smoke=True",
                                   f"--config.tokenizer_dir={tmp_path}/no_tokenizer"],
                                  f"error: tokenizer_dir '{tmp_path}/no_tokenizer' does not exist; "
                                  "fix --config.tokenizer_dir."),
        "missing_data_glob": (["--config=experiments/clip.py:cc3m_b16,smoke=True",
                               f"--config.tokenizer_dir={_tokenizer_dir(tmp_path)}",
                               f"--config.data.paths={tmp_path}/corpus/*.array_record"],
                              f"error: data.paths '{tmp_path}/corpus/*.array_record' matches no file; "
                              "fix --config.data.paths."),
        "clip_dir_without_config_json": (["--config=experiments/reco.py:shapes,smoke=True",
                                          f"--config.clip_dir={tmp_path}"],
                                         f"error: clip_dir '{tmp_path}' has no config.json; fix --config.clip_dir."),
    }
    args, expected = cases[case]
    started = time.monotonic()
    result = run_main(*args, f"--workdir={tmp_path / 'work'}", timeout=120,
                      env={"VLM_JAX_CACHE": str(tmp_path / "cache")})
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    (line,) = output_lines(result.stderr)
    assert line.startswith(expected) and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
    # Refused before anything was built: no base model in the cache, no checkpoint in the workdir.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.parametrize("debug", [["--verbosity=debug"], []])
def test_debug_mode_also_prints_the_traceback_of_a_user_error(tmp_path, debug):
    result = run_main("--config=experiments/clip.py:lit_b16,smoke=True", f"--workdir={tmp_path}", *debug,
                      timeout=120, env={} if debug else {"VLM_JAX_DEBUG": "1"})
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback (most recent call last)" in result.stderr and "check_config" in result.stderr
    assert output_lines(result.stderr)[-1].startswith("error: clip_dir is not set")


def test_report_maps_each_ending_to_its_exit_code_and_one_line(capsys, monkeypatch):
    monkeypatch.delenv("VLM_JAX_DEBUG", raising=False)
    assert main_module.report(UserError("a field is wrong;\n  fix it."), "/w") == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: a field is wrong; fix it.\n"
    assert main_module.report(Preempted("stopped at step 3 in /w"), "/w") == EXIT_PREEMPTED
    line = capsys.readouterr().err
    assert line.startswith("preempted: stopped at step 3 in /w; the state is saved") and line.count("\n") == 1
    assert "rerun the same command to resume" in line
    assert main_module.report(PermissionError(13, "Permission denied", "/w/config.json"), "/w") == EXIT_USER_ERROR
    assert capsys.readouterr().err == ("error: permission denied: /w/config.json; fix its permissions or choose "
                                       "another path.\n")
    assert main_module.report(KeyError("bug"), "/w") == EXIT_BUG and capsys.readouterr().err == ""


def _smoke_config(experiment, tmp_path):
    config = config_lib.load_config_file(str(REPO / "experiments" / experiment))
    if "cache_dir" in config:
        config.cache_dir = str(tmp_path / "cache")
    config.data_dir = str(tmp_path / "data")
    return config


@pytest.mark.parametrize("experiment", ["reco.py:shapes,smoke=True", "clip.py:shapes,smoke=True"])
def test_a_preempted_trainer_inside_a_task_makes_main_exit_3(tmp_path, monkeypatch, capsys, experiment):
    """RECO: the runner's base-model stage raises Preempted; train: the train task does; main exits 3."""
    from vlm_jax.train import trainer

    calls = []

    def preempted_training(config, workdir, method):
        calls.append(workdir)
        return {"preempted_at_step": 3.0}

    monkeypatch.setattr(trainer, "train", preempted_training)
    with pytest.raises(SystemExit) as stop:
        main_module.execute(_smoke_config(experiment, tmp_path), str(tmp_path / "work"))
    assert stop.value.code == EXIT_PREEMPTED and len(calls) == 1
    assert capsys.readouterr().err.startswith("preempted: stopped at step 3 ")


def test_a_bug_is_re_raised_for_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(main_module, "run", lambda config, workdir: {}["no such key"])
    with pytest.raises(KeyError):
        main_module.execute(ml_collections.ConfigDict({"task": "train"}), str(tmp_path))


def test_sigterm_outside_the_training_loop_raises_preempted():
    with pytest.raises(Preempted, match="SIGTERM"):
        with main_module.sigterm_raises_preempted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_inside_a_jax_call_waits_until_the_call_returns():
    import jax
    import jax.numpy as jnp

    def slow(x):  # the signal lands while jax runs this callback (a frame of jax's own code is below it)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        return x

    finished = []
    with pytest.raises(Preempted, match="SIGTERM"):
        with main_module.sigterm_raises_preempted():
            jax.pure_callback(slow, jax.ShapeDtypeStruct((2,), jnp.float32), jnp.ones(2, jnp.float32))
            finished.append(True)
            time.sleep(5)
    assert finished == [True]


def test_gs_paths_need_gcsfs_named_by_its_extra(monkeypatch):
    monkeypatch.setattr(main_module, "_installed", lambda module: False)
    with pytest.raises(UserError) as error:
        main_module.check_storage("gs://bucket/work")
    assert str(error.value) == ('gs://bucket/work is on Google Cloud Storage, which needs gcsfs: '
                                'pip install -e ".[gcs]" (or pip install gcsfs)')
    main_module.check_storage("/local/work", ml_collections.ConfigDict({"clip_dir": "/ckpt"}))  # nothing on gs://


def _fake_google_auth(monkeypatch, default):
    """google.auth (as gcsfs brings it) with `default` as its credential lookup, installed or not."""
    import types

    exceptions = types.SimpleNamespace(**{name: type(name, (Exception,), {}) for name in (
        "DefaultCredentialsError", "RefreshError", "TransportError")})
    requests = types.SimpleNamespace(Request=type("Request", (), {"__call__": lambda self, *a, **k: None}))
    auth = types.SimpleNamespace(default=default, exceptions=exceptions,
                                 transport=types.SimpleNamespace(requests=requests))
    google = types.SimpleNamespace(auth=auth)
    for name, module in {"google": google, "google.auth": auth, "google.auth.exceptions": exceptions,
                         "google.auth.transport": auth.transport, "google.auth.transport.requests": requests}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(main_module, "_installed", lambda module: True)
    return exceptions


def test_missing_google_cloud_credentials_fail_fast_in_one_line(monkeypatch):
    def no_credentials(*args, **kwargs):
        raise exceptions.DefaultCredentialsError("Your default credentials were not found.")

    exceptions = _fake_google_auth(monkeypatch, no_credentials)
    started = time.monotonic()
    config = ml_collections.ConfigDict({"clip_dir": "gs://bucket/clip", "data": {"paths": "/local/*"}})
    with pytest.raises(UserError) as error:
        main_module.check_storage("/local/work", config)
    assert time.monotonic() - started < 5
    assert str(error.value) == ("no Google Cloud credentials for gs://bucket/clip: run `gcloud auth "
                                "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")


def test_refused_google_cloud_credentials_are_one_line_and_the_probe_does_not_wait_long(monkeypatch):
    timeouts = []

    class Credentials:
        def refresh(self, request):
            request("https://oauth2.googleapis.com/token", method="POST", timeout=120)
            raise exceptions.RefreshError("invalid_grant: Token has been expired or revoked.")

    exceptions = _fake_google_auth(monkeypatch, lambda scopes: (Credentials(), "project"))
    sys.modules["google.auth.transport.requests"].Request.__call__ = lambda self, *a, **k: timeouts.append(k["timeout"])
    with pytest.raises(UserError) as error:
        main_module.check_storage("gs://bucket/work")
    assert timeouts == [main_module.CREDENTIALS_TIMEOUT_S]
    assert str(error.value) == ("the Google Cloud credentials for gs://bucket/work were refused (invalid_grant: Token "
                                "has been expired or revoked.): run `gcloud auth application-default login` or set "
                                "GOOGLE_APPLICATION_CREDENTIALS")


def test_a_gs_workdir_without_credentials_exits_2_in_seconds(tmp_path):
    pytest.importorskip("gcsfs")
    # No credentials anywhere, and the metadata server is a closed local port: nothing leaves the machine.
    env = {"CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "GCE_METADATA_HOST": "127.0.0.1:9",
           "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_TIMEOUT": "1", "NO_GCE_CHECK": "True"}
    environment = {key: value for key, value in os.environ.items() if key != "GOOGLE_APPLICATION_CREDENTIALS"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vlm_jax.main", "--config=experiments/clip.py:shapes,smoke=True",
                             "--workdir=gs://vlm-jax-no-such-bucket/work"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**environment, "JAX_PLATFORMS": "cpu", **env})
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert output_lines(result.stderr) == [
        "error: no Google Cloud credentials for gs://vlm-jax-no-such-bucket/work: run `gcloud auth "
        "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"]
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_zero_shot_eval_task_writes_results_for_shapes_world(tmp_path):
    """A random tiny CLIP saved with the Shapes World tokenizer evaluates through `main`; the metrics in
    results.json equal the evaluators' on the same model, computed in this process."""
    import numpy as np
    from flax import nnx

    from vlm_jax.data import shapes_world
    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.evaluate import suite
    from vlm_jax.models import CLIP, tiny
    from vlm_jax.weights import save_pretrained

    sys.path.insert(0, str(REPO / "experiments"))
    import zero_shot

    data_dir, model_dir = tmp_path / "data", tmp_path / "model"
    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(data_dir, "test"))
    config = tiny(text=dataclasses.replace(tiny().text, vocab_size=tokenizer.vocab_size,
                                           context_length=tokenizer.context_length,
                                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                           bos_token_id=tokenizer.bos_id))
    model = CLIP(config, rngs=nnx.Rngs(0))
    preprocess = PreprocessSpec.clip(image_size=32)
    save_pretrained(model, model_dir, tokenizer=tokenizer, preprocess=preprocess)

    result = run_main("--config=experiments/zero_shot.py:shapes,smoke=True", f"--config.clip_dir={model_dir}",
                      f"--config.data_dir={data_dir}", f"--workdir={tmp_path / 'work'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "work" / "results.json").read_text())
    expected_keys = {"shapes/top1", "shapes/top5", "shapes/mean_per_class_recall", "shapes/top1_common",
                     "shapes/top1_rare", "shapes/top1_novel", "shapes_retrieval/image_retrieval_recall@1",
                     "shapes_retrieval/text_retrieval_recall@10"}
    assert expected_keys <= set(metrics)
    resolved = json.loads((tmp_path / "work" / "config.json").read_text())
    assert resolved["clip_dir"] == str(model_dir)

    evals = zero_shot.get_config("shapes,smoke=True")
    evals.data_dir = str(data_dir)
    direct = suite.run_evaluators(suite.build_evaluators(evals.evals, preprocess, tokenizer), model)
    for key in expected_keys:
        np.testing.assert_allclose(metrics[key], direct[key], atol=1e-6)

