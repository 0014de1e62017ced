"""The shared experiment runner: variants x seeds, stages, the baseline once, resume, preemption, the table."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from vlm_jax.config_lib import ConfigError
from vlm_jax.methods import runner
from vlm_jax.train import cache, trainer
from vlm_jax.weights import atomic

CLIP_EXPERIMENT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "clip.py"


def experiment(**fields):
    config = ml_collections.ConfigDict({
        "seed": 10, "seeds": 2, "lr": 1.0, "model": {"width": 8},
        "variants": {"base": {}, "wide": {"model": {"width": 32}}, "fast": {"lr": 3.0}},
        "variant_labels": {"wide": "  wider"}, "baseline_label": "frozen", "table": (("m", "metric"),),
    })
    config.update(fields)
    return config


class FakeTraining:
    """Stands in for `trainer.train`: records each run's config, returns a metric from it."""

    def __init__(self, preempt_at=None):
        self.runs, self.preempt_at = [], preempt_at

    def __call__(self, config, workdir, method):
        self.runs.append((str(workdir), config.to_dict()))
        if self.preempt_at is not None and len(self.runs) == self.preempt_at:
            return {"preempted_at_step": 2.0}
        return {"m": 0.1 * config.lr + 0.001 * config.model.width + 0.01 * (config.seed - 10)}


def run(config, workdir, monkeypatch, training, calls):
    monkeypatch.setattr(trainer, "train", training)

    def stages(steps):
        calls["stages"] += 1
        return {"prefix": steps.run("prepare", lambda: "prepared")}

    def run_config(variant, context):
        run = ml_collections.ConfigDict(variant.to_dict())
        run.context = context["prefix"]
        return run

    def baseline(context):
        calls["baseline"] += 1
        return {"m": 0.05}

    return runner.run_experiment(config, workdir, object(), stages=stages, run_config=run_config,
                                 baseline_metrics=baseline)


def test_every_variant_and_seed_trains_once_and_the_baseline_is_evaluated_once(tmp_path, monkeypatch):
    training, calls = FakeTraining(), {"stages": 0, "baseline": 0}
    results = run(experiment(), tmp_path, monkeypatch, training, calls)
    assert calls == {"stages": 1, "baseline": 1}
    assert sorted(workdir.split("runs/")[1] for workdir, _ in training.runs) == [
        f"{variant}/seed_{seed}" for variant in ("base", "fast", "wide") for seed in (0, 1)]
    configs = {workdir.split("runs/")[1]: config for workdir, config in training.runs}
    assert configs["wide/seed_1"]["model"]["width"] == 32 and configs["wide/seed_1"]["seed"] == 11
    assert configs["fast/seed_0"]["lr"] == 3.0 and configs["fast/seed_0"]["context"] == "prepared"
    assert results["baseline/m"] == 0.05
    assert results["wide/m"] == pytest.approx(0.1 + 0.032 + 0.005)
    assert results["wide/m/std"] == pytest.approx(0.01 / 2**0.5)
    assert "time/prepare_s" in results and "time/baseline_s" in results and "time/total_s" in results
    table = (tmp_path / "results.txt").read_text()
    assert "frozen" in table and "  wider" in table and "fast" in table and "metric" in table
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)


def test_a_rerun_reads_finished_runs_back_and_trains_only_what_is_missing(tmp_path, monkeypatch):
    calls = {"stages": 0, "baseline": 0}
    interrupted = FakeTraining(preempt_at=3)
    with pytest.raises(runner.Preempted, match="stopped at step 2 of the run in"):
        run(experiment(), tmp_path, monkeypatch, interrupted, calls)
    assert not (tmp_path / "results.json").exists()
    resumed = FakeTraining()
    results = run(experiment(), tmp_path, monkeypatch, resumed, calls)
    finished = {workdir for workdir, _ in interrupted.runs[:2]}
    assert len(resumed.runs) == 4 and not finished & {workdir for workdir, _ in resumed.runs}
    assert results["base/m/seed_1"] == pytest.approx(0.1 + 0.008 + 0.01)


def test_stages_are_timed_by_name_and_return_what_the_step_returns():
    steps = runner.Stages()
    assert steps.run("memory", lambda: "/dir") == "/dir"
    assert set(steps.timings) == {"time/memory_s"} and steps.timings["time/memory_s"] >= 0.0


def test_preempted_stage_stops_the_experiment_before_any_run(tmp_path, monkeypatch):
    training = FakeTraining()
    monkeypatch.setattr(trainer, "train", training)

    def stages(steps):
        raise runner.Preempted("stopped while training the base model")

    with pytest.raises(runner.Preempted, match="stopped while training the base model"):
        runner.run_experiment(experiment(), tmp_path, object(), stages=stages, run_config=None, baseline_metrics=None)
    assert not training.runs


class FakeBaseTraining:
    """Stands in for `trainer.train` of the base CLIP: stops on a preemption notice at first, then
    finishes and exports (with the completion marker) the way the trainer does."""

    def __init__(self, preempt_first: bool):
        self.calls, self.preempt_first = [], preempt_first

    def __call__(self, config, workdir, method):
        self.calls.append(workdir)
        (workdir / "checkpoints").mkdir(exist_ok=True)
        if self.preempt_first and len(self.calls) == 1:
            return {"preempted_at_step": 3.0}
        with atomic.atomic_export(workdir / "export") as staging:
            (staging / "config.json").write_text("{}")
        return {"train/loss": 1.0}


def frozen_clip_experiment(tmp_path):
    return ml_collections.ConfigDict({"clip_dir": "", "clip_config": f"{CLIP_EXPERIMENT}:shapes,smoke=True",
                                      "cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data")})


def test_a_preempted_base_model_build_raises_preempted_and_a_rerun_resumes_it_in_the_cache(tmp_path, monkeypatch):
    training = FakeBaseTraining(preempt_first=True)
    monkeypatch.setattr(trainer, "train", training)
    config = frozen_clip_experiment(tmp_path)
    with pytest.raises(runner.Preempted, match="stopped at step 3 while training the base model"):
        runner.base_model_dir(config, tmp_path / "work")
    (directory,) = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert not (directory / cache.MARKER).exists() and (directory / "checkpoints").is_dir()
    export = runner.base_model_dir(config, tmp_path / "work")
    assert export == str(directory / "export") and training.calls == [directory, directory]
    assert (directory / cache.MARKER).exists() and atomic.export_finished(export)
    assert runner.base_model_dir(config, tmp_path / "work") == export and len(training.calls) == 2


def test_a_cached_base_model_whose_export_lacks_its_marker_is_built_again(tmp_path, monkeypatch):
    training = FakeBaseTraining(preempt_first=False)
    monkeypatch.setattr(trainer, "train", training)
    config = frozen_clip_experiment(tmp_path)
    export = pathlib.Path(runner.base_model_dir(config, tmp_path / "work"))
    (export / atomic.MARKER).unlink()  # an export cut short where the store has no atomic rename
    assert runner.base_model_dir(config, tmp_path / "work") == str(export)
    assert len(training.calls) == 2 and atomic.export_finished(export)


@pytest.mark.parametrize("overrides, field", [
    ({"lrr": 1.0}, "variants.typo.lrr"),
    ({"model": {"widht": 4}}, "variants.typo.model.widht"),
])
def test_a_variant_overriding_a_missing_field_is_a_one_line_error(overrides, field):
    config = experiment()
    config.variants.typo = overrides
    with pytest.raises(ConfigError) as error:
        runner.variant_configs(config, config)
    assert str(error.value).startswith(f"{field} is not a field") and "\n" not in str(error.value)


def test_no_variants_is_an_error():
    config = experiment()
    config.variants = ml_collections.ConfigDict()
    with pytest.raises(ConfigError, match="variants is empty"):
        runner.variant_configs(config, config)


def test_summary_gives_mean_sample_std_and_range_over_seeds_and_the_table_shows_them():
    runs = {"reco": [{"m": value} for value in (0.5, 0.6, 0.7)], "mean": [{"m": 0.3}]}
    results = runner.summarize({"m": 0.2}, runs, ["m"])
    assert results["baseline/m"] == 0.2
    assert results["reco/m"] == pytest.approx(0.6) and results["reco/m/std"] == pytest.approx(0.1)
    assert (results["reco/m/min"], results["reco/m/max"], results["reco/m/seed_2"]) == (0.5, 0.7, 0.7)
    assert np.isnan(results["mean/m/std"])  # one seed: undefined, not zero
    table = runner.format_table(results, {"baseline": "CLIP", "reco": "RECO", "mean": "mean"}, [("m", "metric")], 3)
    lines = table.splitlines()
    assert lines[1].startswith("CLIP") and lines[1].rstrip().endswith("20.0")  # the baseline row has no ± std
    assert "60.0 ± 10.0" in lines[2] and lines[3].rstrip().endswith("30.0") and "±" not in lines[3]
    assert lines[-1] == "(in %; variant rows: mean ± sample std over 3 seeds)"
    one_seed = runner.format_table(runner.summarize({}, {"reco": [{"m": 0.5}]}, ["m"]), {"reco": "RECO"},
                                   [("m", "metric")], 1).splitlines()
    assert one_seed[1].rstrip().endswith("50.0") and "±" not in one_seed[1] and one_seed[-1] == "(in %; one seed)"


def test_evaluator_skip_counts_reach_results_json_and_the_table_footnote(tmp_path, monkeypatch, capsys):
    class SkippingTraining(FakeTraining):
        def __call__(self, config, workdir, method):
            return {**super().__call__(config, workdir, method), "shapes/evaluated": 4.0, "shapes/skipped": 5.0,
                    "shapes/skipped/corrupt_image": 5.0}

    calls = {"stages": 0, "baseline": 0}
    results = run(experiment(), tmp_path, monkeypatch, SkippingTraining(), calls)
    assert results["base/shapes/skipped"] == 5.0 and results["base/shapes/skipped/corrupt_image"] == 5.0
    assert results["base/shapes/evaluated"] == 4.0 and "baseline/shapes/skipped" not in results
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["wide/shapes/skipped"] == 5.0
    footnote = "* base/shapes: 5 of 9 inputs skipped (corrupt_image 5)"
    assert footnote in (tmp_path / "results.txt").read_text() and footnote in capsys.readouterr().out


def test_a_run_function_replaces_training_and_counted_metrics_are_summed_over_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "train", lambda *args: pytest.fail("the trainer must not run"))
    seen = []

    def evaluate(config, run_dir):
        seen.append((pathlib.Path(run_dir).relative_to(tmp_path).as_posix(), config.seed))
        return {"m": 0.01 * config.seed, "other": 0.2, "fallback/unparseable": float(config.seed - 9), "fallback/duplicate": 0.0}

    config = experiment(table=(("m", "metric"), ("other", "other")))
    results = runner.run_experiment(config, tmp_path, None, stages=lambda steps: {}, run_config=lambda v, c: v,
                                    baseline_metrics=lambda context: {"m": 0.5}, run=evaluate, counted=("fallback/",))
    assert sorted(seen) == sorted((f"runs/{variant}/seed_{i}", 10 + i) for variant in ("base", "wide", "fast")
                                  for i in range(2))
    assert results["base/fallback/unparseable"] == 3.0 and results["base/fallback/duplicate"] == 0.0
    assert results["baseline/m"] == 0.5 and results["baseline/other"] != results["baseline/other"]  # nan
    out = capsys.readouterr().out
    table = (tmp_path / "results.txt").read_text()
    assert table.split("\n{")[0] in out  # printed below the run lines
    assert table.splitlines()[1].split()[-1] == "-"  # the baseline has no "other"
    assert "base, summed over seeds: fallback/unparseable 3" in table and "duplicate" not in table
