"""RAR end to end (experiments/rar.py, `rar_task` on the shared runner): presets, misspelt fields, the
smoke run (stages, table, predictions, fallback counts, region AP), and the same predictions through
`mllm.serve` on loopback as in process."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from vlm_jax.config_lib import ConfigError, load_config_file
from vlm_jax.methods import rar

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "rar.py"


def experiment_config(argument="shapes"):
    return load_config_file(f"{EXPERIMENT}:{argument}")


@pytest.mark.parametrize("argument", ["shapes", "shapes,smoke=True", "shapes_http", "fewshot", "fewshot,dataset=dtd",
                                      "lvis"])
def test_presets_load_and_parse(argument):
    config = experiment_config(argument)
    rar.parse_rar(config.rar)
    assert config.task == "rar"
    assert list(config.variants)[0] == "rar" and not config.variants.rar.to_dict()
    if argument.startswith("shapes"):
        assert {f"shots_{n:02d}" for n in (1, 2, 8, 16)} <= set(config.variants) or "smoke" in argument
        assert config.seeds == (1 if "smoke" in argument else 3)
    assert config.serve == (argument == "shapes_http")


def test_unknown_dataset_and_preset_are_one_line_errors():
    with pytest.raises(ConfigError, match="dataset='mnist' is not one of the paper's"):
        experiment_config("fewshot,dataset=mnist")
    with pytest.raises(ConfigError, match="unknown preset"):
        experiment_config("shapes_world")


@pytest.mark.parametrize("where, change, message", [
    ("top", {"rar_mode": ("score",)}, "config.rar_mode is not a field; did you mean config.rar_modes"),
    ("rar", {"shot": 2}, "config.rar.shot is not a field; did you mean config.rar.shots"),
    ("regions", {"limt": 3}, "config.regions.limt is not a field; did you mean config.regions.limit"),
    ("mllm", {"base_ur": "x"}, "config.mllm.base_ur is not a field; did you mean config.mllm.base_url"),
    ("finetune", {"total_step": 3}, "finetune.total_step is not a field of the experiment config"),
    ("variants", {"bad": {"rar": {"kk": 3}}}, "variants.bad.rar.kk is not a field"),
])
def test_misspelt_fields_stop_before_any_work(tmp_path, where, change, message):
    config = experiment_config("shapes,smoke=True")
    with config.unlocked():
        if where == "top":
            config.update(change)
        elif where == "finetune":
            config.finetune.update(change)
            config.finetune.total_steps = 2
        elif where == "variants":
            config.variants.update(change)
        else:
            config[where].update(change)
    config.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=message):
        rar.rar_task(config, tmp_path / "work")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work" / "memory").exists()


def _smoke(tmp_path, workdir: str, **changes):
    config = experiment_config("shapes,smoke=True")
    config.cache_dir = str(tmp_path / "cache")
    config.data_dir = str(tmp_path / "tfds")
    for key, value in changes.items():
        config[key] = value
    return rar.rar_task(config, tmp_path / workdir), tmp_path / workdir


@pytest.mark.slow
def test_smoke_run_and_the_same_predictions_over_http(tmp_path, capsys):
    results, workdir = _smoke(tmp_path, "embedded")
    table = capsys.readouterr().out
    for row in ("CLIP zero-shot (frozen)", "4-shot, k=5", "1-shot", "4-shot, k=10", "zero-shot (names)",
                "Region recognition with given boxes"):
        assert row in table
    for key in ("baseline/knn_top1", "rar/knn_top1", "rar/recall", "rar/rar_top1", "rar/rar_score_top1",
                "rar/fallback_rate", "regions/clip/AP", "regions/rar/AP", "regions/fallback/answers"):
        assert key in results and np.isfinite(results[key]), key
    assert np.isnan(results["baseline/rar_top1"])
    run = json.loads((workdir / "runs" / "rar" / "seed_0" / "results.json").read_text())
    assert run["fallback/answers"] == 256.0 and 0 <= run["fallback/answers_with_fallback"] <= 256
    predictions = np.load(workdir / "runs" / "rar" / "seed_0" / "predictions.npz")
    assert predictions["candidates"].shape == (256, 5) and predictions["ranked"].shape == (256, 5)
    # Every ranking is a permutation of its candidates.
    assert (np.sort(predictions["ranked"], 1) == np.sort(predictions["candidates"], 1)).all()
    assert results["rar/recall"] >= results["rar/knn_top1"]
    assert (workdir / "ranking_data" / "ranking.jsonl").exists()  # a link to its cached directory
    assert (workdir / "ranking_data").resolve().parent == (tmp_path / "cache").resolve()

    # shapes_http's settings: the model served on loopback, png images, ranking by generation.
    http_results, http_workdir = _smoke(tmp_path, "http", serve=True, rar_modes=("generate",), mllm={
        **experiment_config("shapes,smoke=True").mllm.to_dict(), "image_format": "png", "max_side": 1024,
        "concurrency": 64})
    for variant in ("rar", "shots_01", "shots_04_k10", "zero_shot"):
        embedded = np.load(workdir / "runs" / variant / "seed_0" / "predictions.npz")
        served = np.load(http_workdir / "runs" / variant / "seed_0" / "predictions.npz")
        assert set(served.files) == {"labels", "candidates", "ranked"}
        for name in served.files:
            assert np.array_equal(embedded[name], served[name]), (variant, name)
    assert http_results["regions/rar/AP"] == results["regions/rar/AP"]


def test_an_unprepared_dataset_and_a_missing_endpoint_are_one_line_errors_before_any_work(tmp_path):
    config = experiment_config("fewshot")
    config.data_dir = str(tmp_path / "empty_tfds")
    with pytest.raises(ConfigError, match=r"memory.data: cannot open 'caltech101' split 'train' .*prepare the dataset"):
        rar.rar_task(config, tmp_path / "work")
    config = experiment_config("lvis")
    config.data_dir = str(tmp_path / "empty_tfds")
    with pytest.raises(ConfigError, match=r"regions.annotations is not set"):
        rar.rar_task(config, tmp_path / "work")
    config = experiment_config("shapes,smoke=True")
    config.mllm.backend = "openai"
    with pytest.raises(ConfigError, match=r"needs --config.mllm.base_url"):
        rar.rar_task(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()
