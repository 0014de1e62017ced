"""Recaptioned-data CLIP (experiments/recap.py, `recap_task`): presets, misspelt fields before any work,
the caption mixture a run trains on, and the smoke run end to end (recaptions, every row, the table)."""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from vlm_jax.config_lib import ConfigError, load_config_file
from vlm_jax.data import pipeline
from vlm_jax.data.bad_input import Fetched
from vlm_jax.methods import recap
from vlm_jax.mllm import recaption as recaption_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "recap.py"
ROWS = ("weak", "recap", "mix", "oracle", "hardneg")


def experiment_config(argument="shapes"):
    return load_config_file(f"{EXPERIMENT}:{argument}")


@pytest.mark.parametrize("argument", ["shapes", "shapes,smoke=True", "shapes,seeds=3,hard_negatives=True",
                                      "datacomp_b16", "longclip_b16"])
def test_presets_load_with_every_row(argument):
    config = experiment_config(argument)
    assert config.task == "recap" and config.method == "recap"
    rows = (ROWS if "smoke" in argument or "hard_negatives" in argument else ROWS[:4]) if argument.startswith(
        "shapes") else tuple(row for row in ROWS if row != "oracle")
    assert set(config.variants) == set(rows) and tuple(config.row_order) == ROWS
    assert config.variants.recap.recap.p == 0.0 and config.variants.mix.recap.p == 0.8
    assert config.seeds == (3 if "seeds=3" in argument else 1)
    if argument == "longclip_b16":
        assert (config.text_context_length, config.text_trainable_layers) == (248, 4)
        assert config.data.sentence_sampling and config.recap.init == "base"
    if argument == "datacomp_b16":
        assert config.recap.init == "scratch" and config.model.text.context_length == 128
        assert config.recaption.mode == "grounded" and config.mllm.backend == "openai"


@pytest.mark.parametrize("where, change, message", [
    ("top", {"text_trainable_layer": 2}, "config.text_trainable_layer is not a field"),
    ("recap", {"q": 0.5}, "config.recap.q is not a field"),
    ("recaption", {"mod": "grounded"}, "recaption.mod is not a field"),
    ("mllm", {"base_ur": "x"}, "config.mllm.base_ur is not a field; did you mean config.mllm.base_url"),
    ("variants", {"bad": {"recap": {"pp": 0.1}}}, "variants.bad.recap.pp is not a field"),
    ("variants", {"bad": {"data": {"hard_negative": ("swap_attribute",)}}}, "variants.bad.data.hard_negative"),
    ("variants", {"bad": {"recap": {"p": 1.5}}}, r"variants.bad.recap.p must be in \[0, 1\]"),
])
def test_misspelt_fields_stop_before_any_work(tmp_path, where, change, message):
    config = experiment_config("shapes,smoke=True")
    with config.unlocked():
        if where == "top":
            config.update(change)
        elif where == "variants":
            config.variants.update(change)
        else:
            config[where].update(change)
    config.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=message):
        recap.recap_task(config, tmp_path / "work")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work").exists()


def test_a_real_preset_stops_on_an_unset_benchmark_folder_before_recaptioning(tmp_path):
    config = experiment_config("datacomp_b16")
    corpus = tmp_path / "corpus-00000.array_record"
    corpus.touch()
    config.data.paths = config.recaption.data.paths = str(corpus)
    config.mllm.base_url = "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"evals\.\w+\.path is not set"):
        recap.recap_task(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def _recaptions(tmp_path, limit: int) -> str:
    """Fake recaptions of shapes_world/test's first `limit` pretrain records: "recaption of <index>"."""
    config = experiment_config("shapes,smoke=True")
    pipeline.prepare_embedded(config.recaption.data)
    source = pipeline.make_source(config.recaption.data)
    indices = iter(str(int(source[i]["index"])) for i in range(limit))

    class Numbered:
        def generate(self, images, prompts, max_tokens=64, *, schema=None):
            return [f"a recaption of image {next(indices)}" for _ in prompts]

    section = config.recaption
    section.update(limit=limit, progress=False)
    recaption_lib.recaption(section, Numbered(), tmp_path / "recaptions")
    return str(tmp_path / "recaptions")


def test_a_run_draws_original_named_and_recaption_with_the_mixture_weights(tmp_path):
    directory = _recaptions(tmp_path, limit=24)
    config = experiment_config("shapes,smoke=True")
    run = recap._run_config(config, recap.runner.variant_configs(config, config)["mix"],
                            {"clip_dir": "", "recaptions_dir": directory})
    run.recap.init, run.recap.examples = "scratch", 32
    method = recap.RecapMethod()
    data, source = method.train_source(run)
    # p = 0.8 of the original side (weak caption or its named form, half each) and 0.2 recaption.
    assert tuple(data.text_keys) == ("weak_caption", "named_caption", "recaption")
    np.testing.assert_allclose(data.text_weights, (0.4, 0.4, 0.2))
    assert len(source) == 32 and method.fallbacks == 8  # 24 of the 32 records were recaptioned
    for index in (0, 23):
        assert source[index]["recaption"] == f"a recaption of image {int(source[index]['index'])}"
    assert source[24]["recaption"] == source[24]["weak_caption"].decode()  # no recaption: the original

    data.keep_text = True
    decoder = dataclasses.replace(pipeline.make_decoder(data, method.preprocess(run), None), image_key=None)
    drawn = collections.Counter()
    for draw in range(600):
        text = decoder.random_map(Fetched(index=draw, record=source[draw % 24]), np.random.default_rng(draw))["text"]
        drawn["recaption" if text.startswith("a recaption") else "named" if text.startswith(("a photo", "a ")) and
              "zorvid" in text else "other"] += 1
    assert abs(drawn["recaption"] / 600 - 0.2) < 0.05, drawn

    weak = recap._run_config(config, recap.runner.variant_configs(config, config)["weak"],
                             {"clip_dir": "", "recaptions_dir": directory})
    weak.recap.init = "scratch"
    data, _ = recap.RecapMethod().train_source(weak)
    assert tuple(data.text_keys) == ("weak_caption", "named_caption")  # p = 1: originals only
    assert "mllm" not in weak and "variants" not in weak and weak.method == "recap"


def test_recaptions_dir_without_a_summary_is_a_one_line_error(tmp_path):
    config = experiment_config("shapes,smoke=True")
    run = recap._run_config(config, recap.runner.variant_configs(config, config)["recap"],
                            {"clip_dir": "", "recaptions_dir": str(tmp_path / "missing")})
    run.recap.init = "scratch"
    with pytest.raises(ConfigError, match="recap.recaptions_dir"):
        recap.RecapMethod().check_config(run)


@pytest.mark.slow
def test_smoke_run_recaptions_once_trains_every_row_and_prints_the_table(tmp_path, capsys):
    config = experiment_config("shapes,smoke=True")
    config.cache_dir = str(tmp_path / "cache")
    config.data_dir = str(tmp_path / "tfds")
    results = recap.recap_task(config, tmp_path / "work")
    out = capsys.readouterr().out
    table = (tmp_path / "work" / "results.txt").read_text()
    assert table.split("\n{")[0] in out  # the table printed, below the stage and run lines
    for label in config.variant_labels.values():
        assert label in table
    assert table.index("CLIP, original captions") < table.index("recaptions (p=0)") < table.index("oracle")
    for row in ROWS:
        for metric, _ in config.table:
            assert 0.0 <= results[f"{row}/{metric}"] <= 1.0, (row, metric)
    summary = json.loads((tmp_path / "work" / "recaptions" / "summary.json").read_text())
    assert summary["written"] == config.recap.examples == summary["total"]
    assert summary["kept"] + sum(summary["rejected"].values()) == summary["written"]
    # The hard-negative row trained with negatives in its batches; the others without.
    hardneg = [json.loads(line) for line in (tmp_path / "work" / "runs" / "hardneg" / "seed_0" / "metrics.jsonl")
               .read_text().splitlines()]
    assert any(record.get("train/hard_negatives", 0) > 0 for record in hardneg)
    recap_run = (tmp_path / "work" / "runs" / "recap" / "seed_0" / "metrics.jsonl").read_text()
    assert "train/hard_negatives" not in recap_run
    # A rerun reads every finished run back and recaptions nothing again.
    again = recap.recap_task(config, tmp_path / "work")
    assert again["recap/compositional/swap_attribute"] == results["recap/compositional/swap_attribute"]
