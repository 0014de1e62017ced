"""RECO end to end (experiments/reco.py, `reco_task` on the shared runner): presets, run configs,
misspelt fields and missing paths, training on stored pairs, stored-embedding evaluation, the smoke
run, and SIGTERM during the base model's training."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pytest
from flax import nnx

from vlm_jax.config_lib import ConfigError, load_config_file
from vlm_jax.methods import reco, runner
from vlm_jax.train.metrics import read_metrics, tensorboard_tag
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, tiny, vit_b32

ROOT = pathlib.Path(__file__).resolve().parents[1]
# An absl log record on stderr; main's own output (errors, preemption) is every other line.
ABSL_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
EXPERIMENT = ROOT / "experiments" / "reco.py"
ARGUMENTS = ("shapes", "shapes,smoke=True", "shapes,backend=scann", "cc12m_b32", "cc12m_b32,smoke=True",
             "cc12m_b32,backend=scann", "cc12m_b32,backend=approx")
CONTEXT = {"clip_dir": "/c", "memory_dir": "/m",
           "train_dirs": ("/w/train_embeddings/memory", "/w/train_embeddings/pretrain")}


def experiment_config(argument="shapes"):
    return load_config_file(f"{EXPERIMENT}:{argument}")


def run_configs(config, context=None) -> dict[str, ml_collections.ConfigDict]:
    """{variant: the trainer config of its runs}: `reco_task` up to the runner, with the stages'
    outputs given by `context` (default: CONTEXT and the config's evals, stored)."""
    if context is None:
        evals = ml_collections.ConfigDict({name: {**spec.to_dict(), "stored_dir": f"/w/eval_embeddings/{name}"}
                                           for name, spec in config.evals.items()})
        context = {**CONTEXT, "evals": evals}

    def run_experiment(config, workdir, method, *, stages, run_config, baseline_metrics):
        assert isinstance(method, reco.RecoMethod)
        return {name: run_config(variant, context) for name, variant in runner.variant_configs(config, config).items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_experiment", run_experiment)
        patch.setattr(runner, "check_frozen_clip_paths", lambda config: None)  # presets leave paths to the user
        return reco.reco_task(config, "/w")


def _clip_config(config) -> CLIPConfig:
    """The frozen CLIP a preset runs on: the Shapes World CLIP of its clip_config, or ViT-B/32 (one
    layer per tower keeps the trace cheap; the fusion sees only its embed_dim)."""
    if not config.clip_config:
        config = vit_b32()
        return config.replace(vision=dataclasses.replace(config.vision, depth=1),
                              text=dataclasses.replace(config.text, depth=1))
    fields = load_config_file(config.clip_config).model.to_dict()
    return CLIPConfig(vision=VisionConfig(**fields.pop("vision")), text=TextConfig(**fields.pop("text")), **fields)


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_every_preset_builds_and_every_variant_traces_abstractly(argument):
    config = experiment_config(argument)
    assert config.task == "reco" and config.method == "reco"
    runs = run_configs(config)
    assert set(runs) == {"reco", "crossmodal", "mean"}
    clip_config = _clip_config(config)
    for variant, run in runs.items():
        reco_config = reco.parse_reco(run.reco)
        model = nnx.eval_shape(lambda: reco.RECO(CLIP(clip_config, rngs=nnx.Rngs(0)), reco_config, rngs=nnx.Rngs(1)))
        fusion_params = sum(int(np.prod(variable.get_value().shape))
                            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[0] != "clip")
        if variant == "mean":
            assert fusion_params == 1  # only the temperature
        elif not config.clip_config:
            # The paper: ~3.2M fusion parameters for B/32.
            assert 3.0e6 < fusion_params < 3.4e6, fusion_params
        assert run.reco.training_retrieval == "precomputed" and run.optim.trainable[0] == (r"^clip/", False)
    assert runs["crossmodal"].reco.search == "crossmodal" and runs["mean"].reco.fusion == "mean"


def test_a_misspelt_option_or_backend_is_an_error():
    with pytest.raises(ConfigError, match="backend"):
        experiment_config("shapes,backend=faiss")
    with pytest.raises(ConfigError, match="not one of"):
        experiment_config("shapes,seeds=2")


def test_run_config_applies_nested_variant_overrides_and_points_at_the_stored_embeddings():
    config = experiment_config("shapes")
    config.variants.wide = {"reco": {"k": 4, "fusion_config": {"width": 96}}, "optim": {"learning_rate": 1e-3}}
    run = run_configs(config)["wide"]
    assert (run.task, run.method, run.clip_dir, run.reco.memory_dir) == ("train", "reco", "/c", "/m")
    assert run.reco.k == 4 and run.reco.fusion_config.width == 96 and run.reco.fusion_config.heads == 4
    assert run.optim.learning_rate == 1e-3 and run.optim.trainable == config.optim.trainable
    assert run.reco.train_embeddings_dirs == CONTEXT["train_dirs"]
    assert run.reco.training_retrieval == "precomputed"
    weights = dict(zip(config.train_data, run.reco.train_weights))  # one weight per directory, in train_data order
    assert weights == {"pretrain": 0.75, "memory": 0.25}
    assert {name: (spec.pred, spec.stored_dir) for name, spec in run.evals.items()} == {
        name: ("reco", f"/w/eval_embeddings/{name}") for name in config.evals}
    assert config.reco.k == 16 and config.reco.memory_dir == ""  # the experiment config itself is untouched
    config.train_weights = ml_collections.ConfigDict({"pretrain": 3.0})
    weighted = run_configs(config)["reco"]
    assert dict(zip(config.train_data, weighted.reco.train_weights)) == {"pretrain": 3.0, "memory": 0.0}


def test_pixel_training_reads_its_one_source_and_refuses_several():
    config = experiment_config("shapes,smoke=True")
    context = {**CONTEXT, "train_dirs": (), "evals": config.evals}
    with pytest.raises(ConfigError, match="embeddings.train=True"):
        run_configs(config, context)
    del config.train_data["memory"]
    config.train_weights = ml_collections.ConfigDict()
    run = run_configs(config, context)["reco"]
    assert run.data.split == "pretrain" and run.reco.train_embeddings_dirs == ()


def one_line_config_error(config) -> str:
    with pytest.raises(ConfigError) as error:
        run_configs(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_misspelt_field_at_the_top_or_in_a_section_or_in_train_weights_is_a_one_line_error():
    config = experiment_config("shapes,smoke=True")
    config.seedz = 1
    assert one_line_config_error(config) == "config.seedz is not a field; did you mean config.seed?"
    config = experiment_config("shapes,smoke=True")
    config.reco.fusion_config.widht = 64
    assert one_line_config_error(config) == (
        "config.reco.fusion_config.widht is not a field; did you mean config.reco.fusion_config.width?")
    config = experiment_config("shapes,smoke=True")
    config.train_data.pretrain.splt = "x"
    assert one_line_config_error(config).startswith("config.train_data.pretrain.splt is not a field")
    config = experiment_config("shapes,smoke=True")
    config.train_weights.pretrian = 1.0
    assert "pretrian" in one_line_config_error(config)


def test_paths_are_checked_before_any_stage_runs_with_the_field_and_path_named(tmp_path, monkeypatch):
    def fails(config) -> str:
        with pytest.raises(ConfigError) as error:
            reco.reco_task(config, tmp_path / "work")
        assert "\n" not in str(error.value)
        return str(error.value)

    def no_experiment(*args, **kwargs):
        raise AssertionError("the experiment ran although its config names a missing path")

    monkeypatch.setattr(runner, "run_experiment", no_experiment)
    config = experiment_config("shapes,smoke=True")
    config.clip_dir = str(tmp_path / "missing")
    assert fails(config) == f"clip_dir '{tmp_path}/missing' does not exist; fix --config.clip_dir."
    config.clip_dir = str(tmp_path)
    assert fails(config) == f"clip_dir '{tmp_path}' has no config.json; fix --config.clip_dir."
    config = experiment_config("shapes,smoke=True")
    config.reco.memory_dir = str(tmp_path / "memory")
    assert fails(config) == f"reco.memory_dir '{tmp_path}/memory' does not exist; fix --config.reco.memory_dir."
    config = experiment_config("shapes,smoke=True")
    config.clip_config = str(ROOT / "experiments" / "clip.py") + ":lit_b16"
    assert fails(config).startswith("clip_dir is not set, but optim.trainable freezes")  # the base model's own check
    config = experiment_config("cc12m_b32")
    assert fails(config).startswith("neither clip_dir nor clip_config is set")
    (tmp_path / "config.json").write_text("{}")
    config.clip_dir = str(tmp_path)
    assert fails(config) == "memory.data.paths is not set; pass --config.memory.data.paths=GLOB."
    (tmp_path / "laion.array_record").write_bytes(b"")
    config.memory.data.paths = str(tmp_path / "*.array_record")
    config.train_data.cc12m.paths = str(tmp_path / "cc12m" / "*.array_record")
    assert fails(config) == (f"train_data.cc12m.paths '{tmp_path}/cc12m/*.array_record' matches no file; "
                             "fix --config.train_data.cc12m.paths.")


def test_a_misspelt_field_inside_a_variant_is_one_error_line_from_main(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from vlm_jax.config_lib import load_config_file\n\n\n"
        "def get_config(arg=None):\n"
        f"    config = load_config_file({str(EXPERIMENT) + ':shapes,smoke=True'!r})\n"
        "    config.variants.wide = {'reco': {'fusion_config': {'widht': 64}}}\n"
        "    return config\n")
    result = subprocess.run([sys.executable, "-m", "vlm_jax.main", f"--config={config_file}",
                             f"--workdir={tmp_path / 'work'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                              "VLM_JAX_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in result.stderr.strip().splitlines() if not ABSL_LOG_LINE.match(line)] == [
        "error: variants.wide.reco.fusion_config.widht is not a field of the experiment config; "
        "did you mean variants.wide.reco.fusion_config.width?"]
    # Refused before any stage ran: no base model in the cache, no memory in the workdir.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work" / "memory").exists()


# --------------------------------------------------------------------------------------------------
# Training on stored pairs


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def fake_store(images, texts, *, split="memory"):
    """A stand-in for `vlm_jax.memory.store.Memory` with the fields the method reads."""
    rows = len(images)
    indices = np.arange(rows)
    fields = {"image_embeddings": _unit(images), "text_embeddings": _unit(texts)}
    return types.SimpleNamespace(
        **fields, rows=fields.__getitem__, num_rows=rows, indices=indices, ids=indices.astype(str),
        manifest={"config": {"data": {"source": "tfds", "tfds_name": "shapes_world/test", "split": split}}})


def method_with(stores: dict) -> reco.RecoMethod:
    method = reco.RecoMethod()
    for directory, store in stores.items():
        method._cache[("memory", directory)] = store
    return method


def train_config(**reco_fields):
    config = ml_collections.ConfigDict(dict(global_batch_size=8, seed=3, reco=reco.reco_config()))
    config.reco.update({"memory_dir": "memory", "train_embeddings_dirs": ("train",), "k": 3,
                        "training_retrieval": "precomputed", **reco_fields})
    return config


def test_stored_pairs_iterator_adds_the_neighbour_ids_and_resumes_exactly():
    rng = np.random.default_rng(0)
    memory = fake_store(rng.normal(size=(40, 16)), rng.normal(size=(40, 16)))
    train = fake_store(rng.normal(size=(32, 16)), rng.normal(size=(32, 16)), split="pretrain")
    method = method_with({"memory": memory, "train": train})
    iterator = method.train_iterator(train_config(), 0, 1)
    batch = next(iterator)
    rows = batch["index"]
    np.testing.assert_allclose(batch["image_embedding"], train.image_embeddings[rows])
    np.testing.assert_allclose(batch["text_embedding"], train.text_embeddings[rows])
    # Uni-modal search: an image's neighbours are the nearest memory images (it receives their texts).
    expected = np.argsort(-(train.image_embeddings[rows] @ memory.image_embeddings.T), axis=1)[:, :3]
    np.testing.assert_array_equal(batch["neighbours_image"], expected)
    expected = np.argsort(-(train.text_embeddings[rows] @ memory.text_embeddings.T), axis=1)[:, :3]
    np.testing.assert_array_equal(batch["neighbours_text"], expected)
    state = iterator.get_state()
    following = [next(iterator)["index"] for _ in range(6)]  # past the 4-batch epoch: a reshuffled repeat
    resumed = method.train_iterator(train_config(), 0, 1)
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["index"] for _ in range(6)], following)
    halves = [next(method.train_iterator(train_config(), p, 2))["index"] for p in range(2)]
    assert len(halves[0]) == 4 and not set(halves[0]) & set(halves[1])


def test_train_weights_set_how_often_each_source_is_drawn_and_exclusion_is_per_source():
    rng = np.random.default_rng(3)
    memory = fake_store(rng.normal(size=(32, 16)), rng.normal(size=(32, 16)))
    pretrain = fake_store(rng.normal(size=(64, 16)), rng.normal(size=(64, 16)), split="pretrain")
    method = method_with({"memory": memory, "pretrain": pretrain})
    config = train_config(train_embeddings_dirs=("memory", "pretrain"), train_weights=(1.0, 3.0))
    iterator = method.train_iterator(config, 0, 1)
    sources = np.concatenate([next(iterator)["source"] for _ in range(40)])
    assert 0.18 < np.mean(sources == 0) < 0.32  # a quarter from the memory source
    batch = next(iterator)
    from_memory = batch["source"] == 0
    # Memory pairs never retrieve themselves; pretrain pairs (another source, positional ids) may
    # retrieve any row. Each example's ids are those of its own source's row.
    assert not (batch["neighbours_image"][from_memory] == batch["index"][from_memory, None]).any()
    stores = (memory, pretrain)
    for row, source, ids in zip(batch["index"], batch["source"], batch["neighbours_text"]):
        query = stores[source].text_embeddings[row]
        scores = memory.text_embeddings @ query
        if source == 0:
            scores[row] = -np.inf
        np.testing.assert_array_equal(ids, np.argsort(-scores)[:3])
    unweighted = method.train_iterator(train_config(train_embeddings_dirs=("memory", "pretrain")), 0, 1)
    sources = np.concatenate([next(unweighted)["source"] for _ in range(24)])
    assert 0.23 < np.mean(sources == 0) < 0.43  # no weights: in proportion to size (a third)
    only_pretrain = method.train_iterator(train_config(train_embeddings_dirs=("memory", "pretrain"),
                                                       train_weights=(0.0, 1.0)), 0, 1)
    assert all((next(only_pretrain)["source"] == 1).all() for _ in range(5))


# --------------------------------------------------------------------------------------------------
# Stored-embedding evaluation equals evaluation on pixels


@pytest.mark.slow
def test_evaluation_on_stored_embeddings_equals_the_evaluators_on_pixels_for_both_views(tmp_path):
    from vlm_jax.data import shapes_world
    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.evaluate import suite
    from vlm_jax.weights import save_pretrained

    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"))
    clip_config = tiny()
    clip_config = clip_config.replace(
        vision=dataclasses.replace(clip_config.vision, depth=1),
        text=dataclasses.replace(clip_config.text, depth=1, vocab_size=tokenizer.vocab_size,
                                 context_length=tokenizer.context_length, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id))
    clip_dir = str(tmp_path / "clip")
    save_pretrained(CLIP(clip_config, rngs=nnx.Rngs(0)), clip_dir, tokenizer=tokenizer,
                    preprocess=PreprocessSpec.clip(image_size=32))
    config = experiment_config("shapes,smoke=True")
    config.embeddings.progress = False
    config.memory.progress = False
    memory_dir = runner.build_memory_stage(config.memory, clip_dir, tmp_path / "memory")
    stored_evals = runner.store_evals(config.evals, clip_dir, tmp_path / "eval", config.embeddings)
    run = ml_collections.ConfigDict(dict(clip_dir=clip_dir, dtype="float32", reco=config.reco.to_dict()))
    run.reco.memory_dir = memory_dir
    run.reco.fusion_config.zero_init_output = False  # a fusion that changes the embeddings
    method = reco.RecoMethod()
    model = method.create_model(run, nnx.Rngs(1))

    def evaluate(pred, stored):
        with run.unlocked():
            run.evals = {name: {**spec.to_dict(), "pred": pred, "stored_dir": spec.stored_dir if stored else ""}
                         for name, spec in stored_evals.items()}
        return suite.run_evaluators(method.evaluators(run), model)

    metrics = {(pred, stored): evaluate(pred, stored) for pred in ("clip", "reco") for stored in (True, False)}
    assert "shapes/top1" in metrics["reco", True]
    assert any(metrics["reco", True][key] != value for key, value in metrics["clip", True].items())
    for pred in ("clip", "reco"):
        on_pixels = metrics[pred, False]
        assert set(metrics[pred, True]) == set(on_pixels)
        for key, value in on_pixels.items():
            assert metrics[pred, True][key] == pytest.approx(value, abs=1e-6), (pred, key)


# --------------------------------------------------------------------------------------------------
# The smoke run, end to end


def _memory_files(directory: pathlib.Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in sorted(directory.rglob("shard_*"))}


def _check_the_console_plots_and_events(workdir: pathlib.Path, run: subprocess.CompletedProcess, config) -> None:
    """The quiet console: no library INFO line on either stream, the stages one line each, the
    output ending with the table and where results.json, the plots and the log are; library INFO
    lines in log.txt instead; PNGs written; TensorBoard events for the table's rows and every run."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer  # noqa: PLC0415

    console = run.stdout.splitlines() + run.stderr.splitlines()
    assert not [line for line in console if ABSL_LOG_LINE.match(line) and line.startswith("I")], console[:20]
    for stage in ("clip", "memory", "train_embeddings", "eval_embeddings", "baseline"):
        assert sum(line.startswith(f"{stage}: ") for line in run.stdout.splitlines()) == 1, stage
    lines = run.stdout.rstrip().splitlines()
    (table_end,) = [i for i, line in enumerate(lines) if line == "(in %; one seed)"]  # the smoke preset: 1 seed
    tail = lines[table_end + 1:]
    assert [line.split(":")[0] for line in tail[:3]] == ["results", "plots", "log"], tail
    assert tail[0] == f"results: {workdir / 'results.json'}" and tail[2] == f"log:     {workdir / 'log.txt'}"
    pngs = sorted((workdir / "plots").glob("*.png"))
    assert pngs and all(path.stat().st_size > 1000 for path in pngs)
    assert all(path.name in tail[1] for path in pngs)
    log = (workdir / "log.txt").read_text()
    assert "checkpoint_manager.py" in log and "memory: " in log  # orbax's INFO and our stage lines

    events = EventMultiplexer().AddRunsFromDirectory(str(workdir)).Reload()
    runs = {name.replace("\\", "/"): name for name in events.Runs()}
    expected = {"tb/baseline", "tb/stages", *(f"tb/{v}" for v in config.variants),
                *(f"runs/{v}/seed_0/tb" for v in config.variants)}
    assert expected <= set(runs), sorted(runs)
    results = json.loads((workdir / "results.json").read_text())
    for metric, _ in config.table:
        (event,) = events.Scalars(runs["tb/reco"], tensorboard_tag(f"results/{metric}"))
        assert event.value == pytest.approx(results[f"reco/{metric}"], rel=1e-6)
    (stage,) = events.Scalars(runs["tb/stages"], "time/memory_s")
    assert stage.value == pytest.approx(results["time/memory_s"], rel=1e-6)
    losses = [record["train/loss"] for record in read_metrics(workdir / "runs" / "reco" / "seed_0")
              if "train/loss" in record]
    assert [event.value for event in events.Scalars(runs["runs/reco/seed_0/tb"], "train/loss")] == \
        pytest.approx(losses, rel=1e-6)


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_a_rerun_resumes_the_memory_build(tmp_path):
    command = [sys.executable, "-m", "vlm_jax.main", "--config=experiments/reco.py:shapes,smoke=True",
               f"--workdir={tmp_path}"]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "VLM_JAX_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    config = experiment_config("shapes,smoke=True")
    for metric, label in config.table:
        assert label in first.stdout
        for row in ("baseline", "reco", "crossmodal", "mean"):
            assert 0.0 <= results[f"{row}/{metric}"] <= 1.0
        assert f"reco/{metric}/std" in results and f"baseline/{metric}/std" not in results
    for label in (config.baseline_label, *config.variant_labels.values()):
        assert label in first.stdout
    _check_the_console_plots_and_events(tmp_path, first, config)
    assert {"time/clip_s", "time/memory_s", "time/train_embeddings_s", "time/eval_embeddings_s",
            "time/baseline_s", "time/runs_s", "time/total_s"} <= set(results)
    # The base CLIP is trained once into the cache, with its resolved config beside it.
    assert (tmp_path / "config.json").exists() and len(list((tmp_path / "cache").glob("*/COMPLETE.json"))) == 1
    assert len(list((tmp_path / "cache").glob("*/config.json"))) == 1
    for variant in config.variants:
        run_dir = tmp_path / "runs" / variant / "seed_0"
        run = json.loads((run_dir / "config.json").read_text())
        assert run["task"] == "train" and run["reco"]["memory_dir"] == str(tmp_path / "memory")
        assert (run_dir / "export" / "head.safetensors").exists()

    # An interrupted memory build: the last shard never finished.
    memory = tmp_path / "memory"
    last = sorted(path.name for path in memory.glob("shard_*.json"))[-1].split(".")[0]
    (memory / "complete.json").unlink()
    (memory / f"{last}.json").unlink()
    before = _memory_files(memory)
    embeddings_before = _memory_files(tmp_path / "train_embeddings")
    second = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cached base model at" in second.stdout
    after = _memory_files(memory)
    unchanged = {name for name in before if before[name] == after.get(name)}
    assert {name for name in before if not name.startswith(last)} <= unchanged
    assert after[f"{last}.json"] and not any(name.startswith(last) for name in unchanged)
    assert _memory_files(tmp_path / "train_embeddings") == embeddings_before
    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()


@pytest.mark.slow
def test_sigterm_while_the_base_model_trains_exits_3_and_the_same_command_resumes(tmp_path):
    command = [sys.executable, "-m", "vlm_jax.main", "--config=experiments/reco.py:shapes,smoke=True",
               f"--workdir={tmp_path / 'work'}"]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "VLM_JAX_CACHE": str(tmp_path / "cache")}
    first = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 900
        # The trainer makes the base model's checkpoint directory once its data and model are built.
        while not list((tmp_path / "cache").glob("*/checkpoints")):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the base model never started training"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 3, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if not ABSL_LOG_LINE.match(line)]
    assert line.startswith("preempted: ") and line.endswith("rerun the same command to resume.")
    (build,) = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert not (build / "COMPLETE.json").exists() and not (tmp_path / "work" / "results.json").exists()

    second = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming the unfinished cached build at {build}" in second.stdout
    assert (build / "COMPLETE.json").exists() and (build / "export" / "export_complete.json").exists()
    assert json.loads((tmp_path / "work" / "results.json").read_text())
