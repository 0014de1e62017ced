"""experiments/clip.py: every preset builds, its model traces abstractly, and the smoke preset runs
end to end through `vlm_jax.main`, exporting a directory that load_pretrained and transformers read."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from vlm_jax import config_lib
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

REPO = Path(__file__).resolve().parents[1]


def _experiment():
    spec = importlib.util.spec_from_file_location("experiments_clip", REPO / "experiments" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["shapes", "cc3m_b16", "cc12m_b16", "lit_b16"])
@pytest.mark.parametrize("smoke", [False, True])
def test_every_preset_builds_and_its_model_traces_abstractly(preset, smoke):
    config = _experiment().get_config(f"{preset},smoke={smoke}")
    assert config.task == "train" and config.method == "clip"
    assert config.optim.total_steps == config.total_steps
    fields = config.model.to_dict()
    model_config = CLIPConfig(vision=VisionConfig(**fields.pop("vision")), text=TextConfig(**fields.pop("text")),
                              **fields)
    model = nnx.eval_shape(lambda: CLIP(model_config, rngs=nnx.Rngs(0)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    if preset == "shapes":
        assert config.data.text_keys == ("weak_caption",)  # the baseline never trains on dense captions


def test_total_steps_override_moves_the_schedule_and_typos_fail():
    config = _experiment().get_config("shapes")
    config.total_steps = 77
    assert config.optim.total_steps == 77
    config.lock()  # as vlm_jax.main locks it
    with pytest.raises(AttributeError):
        config.totl_steps = 1
    with pytest.raises(config_lib.ConfigError):
        _experiment().get_config("shapes,smok=1")


@pytest.mark.slow
def test_smoke_preset_trains_end_to_end_and_exports_for_load_pretrained_and_transformers(tmp_path):
    import torch
    import transformers

    from vlm_jax.weights import load_pretrained

    workdir = tmp_path / "work"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "--config=experiments/clip.py:shapes,smoke=True",
         f"--config.data_dir={tmp_path / 'data'}", f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]

    results = json.loads((workdir / "results.json").read_text())
    for key in ("shapes/top1", "shapes/top1_common", "shapes/top1_rare", "shapes/top1_novel",
                "shapes_by_description/top1_novel", "shapes_by_description/top1_common",
                "shapes_retrieval/image_retrieval_recall@1", "shapes_retrieval/text_retrieval_recall@1",
                "train/loss", "train/steps_per_sec", "train/step"):
        assert key in results, key
    assert results["train/step"] == 6 and np.isfinite(results["train/loss"])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 7))
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["method"] == "clip"

    pretrained = load_pretrained(workdir / "export")
    texts = ["a photo of a red star", "a blue circle"]
    ids = pretrained.tokenizer(texts)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours_text = np.asarray(pretrained.model.encode_text(ids))
    ours_image = np.asarray(pretrained.model.encode_image(pixels))

    reference = transformers.CLIPModel.from_pretrained(workdir / "export").eval()
    with torch.no_grad():
        theirs_text = reference.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
        theirs_image = reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    theirs_text = getattr(theirs_text, "pooler_output", theirs_text)
    theirs_image = getattr(theirs_image, "pooler_output", theirs_image)
    np.testing.assert_allclose(ours_text, theirs_text.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_image, theirs_image.numpy(), rtol=1e-4, atol=1e-4)


def test_dataset_version_names_the_shapes_world_build_and_generator():
    experiment = _experiment()
    from vlm_jax.data.shapes_world import world

    assert experiment.dataset_version(experiment.get_config("shapes")) == f"shapes_world/default@generator-{world.GENERATOR_VERSION}"
    assert experiment.dataset_version(experiment.get_config("shapes,smoke=True")).startswith("shapes_world/test@")


def _check(config) -> str:
    """The one-line ConfigError `ClipMethod.check_config` raises for `config`."""
    from vlm_jax.methods.clip import ClipMethod

    with pytest.raises(config_lib.ConfigError) as error:
        ClipMethod().check_config(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_config_checks_name_the_field_and_path_before_anything_is_built(tmp_path):
    experiment = _experiment()
    from vlm_jax.methods.clip import ClipMethod

    ClipMethod().check_config(experiment.get_config("shapes,smoke=True"))  # Shapes World: nothing to point at
    assert _check(experiment.get_config("lit_b16")).startswith(
        "clip_dir is not set, but optim.trainable freezes ^vision_model/, ^visual_projection/")
    config = experiment.get_config("lit_b16")
    config.clip_dir = str(tmp_path)
    assert _check(config) == f"clip_dir '{tmp_path}' has no config.json; fix --config.clip_dir."
    (tmp_path / "config.json").write_text("{}")
    assert _check(config).startswith(f"clip_dir '{tmp_path}' has no tokenizer.json or spiece.model and "
                                     "tokenizer_dir is not set")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert _check(config) == "data.paths is not set; pass --config.data.paths=GLOB."
    config.data.paths = f"{tmp_path}/*.array_record,{tmp_path}/more/*.array_record"
    (tmp_path / "a.array_record").write_bytes(b"")
    assert _check(config) == (f"data.paths '{tmp_path}/more/*.array_record' matches no file; "
                              "fix --config.data.paths.")
    config.data.paths = f"{tmp_path}/*.array_record"
    ClipMethod().check_config(config)
    config = experiment.get_config("cc12m_b16")
    assert _check(config).startswith("tokenizer_dir is not set")
    config.tokenizer_dir = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    assert _check(config) == f"tokenizer_dir '{tmp_path}/empty' has no tokenizer.json or spiece.model; " \
                             "fix --config.tokenizer_dir."
