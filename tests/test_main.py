"""The entry point: configs, overrides, one-line errors, and the zero-shot task end to end."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from vlm_jax import config_lib
from vlm_jax.main import TASKS, default_workdir, resolve_task

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
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

