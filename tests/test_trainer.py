"""The shared training loop: mesh parity, exact resume, two processes, NaN stop, frozen params.

Most tests train the tiny CLIP through `ClipMethod` on an in-memory random image-text set
(`ArrayClipMethod`), so they need no dataset build; the resume tests run the real Shapes World
smoke experiment through `python -m vlm_jax.main` and kill it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from vlm_jax.errors import EXIT_PREEMPTED, UserError
from vlm_jax.methods.clip import ClipMethod, model_config_dict
from vlm_jax.models.clip import CLIP, tiny
from vlm_jax.train import sharding, trainer
from vlm_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 64
PARAMS_FILE = "params.npz"


class ArrayClipMethod(ClipMethod):
    """ClipMethod on a fixed random set of 64 (image, caption ids) pairs, held in memory.

    Batch s holds rows [s*B, (s+1)*B) of a seeded shuffle; process p of P reads the p-th block of
    B/P of them, so the global batch is the same for any process count. Rows of batches at index
    >= `nan_from_batch` have NaN images. Export writes the trained params to params.npz.
    """

    def __init__(self, nan_from_batch: int | None = None):
        super().__init__()
        self.nan_from_batch = nan_from_batch
        self.exported = False

    def model_config(self, config):
        return tiny()

    def train_iterator(self, config, process_index, process_count):
        rng = np.random.default_rng(0)
        images = rng.normal(size=(NUM_EXAMPLES, 32, 32, 3)).astype(np.float32)
        ids = rng.integers(1, 990, size=(NUM_EXAMPLES, 16)).astype(np.int32)
        ids[:, -1] = 999  # tiny()'s eos id: EOT pooling reads the last position
        batch_size = config.global_batch_size
        local = batch_size // process_count
        nan_from = self.nan_from_batch

        def to_batch(position_and_rows):
            position, rows = position_and_rows
            rows = rows[process_index * local:(process_index + 1) * local]
            batch = {"image": images[rows].copy(), "text_ids": ids[rows]}
            if nan_from is not None and position >= nan_from:
                batch["image"][:] = np.nan
            return batch

        batches = grain.MapDataset.range(NUM_EXAMPLES).shuffle(seed=config.seed).repeat(None).batch(batch_size)
        return iter(batches.map_with_index(lambda position, rows: to_batch((position, rows))).to_iter_dataset())

    def evaluators(self, config):
        return {}

    def export(self, model, workdir):
        self.exported = True
        flat = {"/".join(map(str, path)): np.asarray(value[...])
                for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        np.savez(Path(workdir) / PARAMS_FILE, **flat)


def array_config(**overrides):
    """Trainer + ClipMethod config for `ArrayClipMethod`: 3 AdamW steps at global batch 16."""
    config = trainer.trainer_config()
    config.method = "clip"
    config.model = model_config_dict(tiny())
    config.clip_dir = ""
    config.loss = "softmax"
    config.label_smoothing = 0.0
    config.global_batch_size = 16
    config.total_steps = 3
    config.log_every = 1
    config.progress = False
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 0
    config.checkpoint.save_interval_steps = 100
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def train_arrays(workdir, method=None, **overrides) -> dict[str, np.ndarray]:
    """Trains `ArrayClipMethod` in `workdir`; returns its final params {path: array}."""
    trainer.train(array_config(**overrides), workdir, method or ArrayClipMethod())
    with np.load(Path(workdir) / PARAMS_FILE) as params:
        return dict(params)


def initial_params() -> dict[str, np.ndarray]:
    """The trainer's initial params for seed 0 (a jitted init, which may differ from an eager one
    in the last bit: XLA fuses the initializers' arithmetic)."""
    model = sharding.create_sharded_model(lambda: CLIP(tiny(), rngs=nnx.Rngs(0)), sharding.make_mesh())
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _run_python(code: str, *args: str, devices: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_trainer as m; {code}"
    return subprocess.run([sys.executable, "-c", command, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------------------------
# (1) Parity of sharded layouts with one device
# --------------------------------------------------------------------------------------------------


def _train_on_meshes(root: str) -> None:
    for name, mesh in (("fsdp", (("data", 4), ("fsdp", 2), ("tensor", 1))),
                       ("tensor", (("data", 2), ("fsdp", 1), ("tensor", 4)))):
        train_arrays(os.path.join(root, name), **{"sharding.mesh": mesh})


@pytest.mark.slow
def test_sharded_meshes_train_to_the_params_of_one_device(tmp_path):
    """3 AdamW steps with (data=4, fsdp=2) and (data=2, tensor=4) on 8 CPU devices equal one device.

    Not bitwise: sharding changes the order of floating-point sums (the loss's all-gathers, the
    psum of gradients over data shards, tensor-parallel partial matmuls), so gradients differ in the
    last bits, and Adam's g / sqrt(v) passes those on. 1e-5 is ~100x the float32 step noise we see
    and far below the size of one update (lr 1e-3), so a wrong sharding still fails.
    """
    result = _run_python("m._train_on_meshes(sys.argv[1])", str(tmp_path), devices=8)
    assert result.returncode == 0, result.stderr[-5000:]
    reference = train_arrays(tmp_path / "one_device")
    initial = initial_params()
    for name in ("fsdp", "tensor"):
        with np.load(tmp_path / name / PARAMS_FILE) as sharded:
            assert set(sharded) == set(reference)
            for key in reference:
                np.testing.assert_allclose(sharded[key], reference[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}")
    moved = max(float(np.max(np.abs(reference[key] - initial[key]))) for key in reference)
    assert moved > 1e-4  # the runs trained: params moved by far more than the tolerance


# --------------------------------------------------------------------------------------------------
# (2) Resume after SIGKILL, clean stop on SIGTERM
# --------------------------------------------------------------------------------------------------

SMOKE_OVERRIDES = ("--config.total_steps=40", "--config.checkpoint.save_interval_steps=8",
                   "--config.log_every=1", "--config.optim.warmup_steps=4")


def _main_command(data_dir: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "vlm_jax.main", "--config=experiments/clip.py:shapes,smoke=True",
            f"--config.data_dir={data_dir}", f"--workdir={workdir}", *SMOKE_OVERRIDES]


def _run_until(data_dir: Path, workdir: Path, *, signum: int, after_step: int) -> tuple[int, str]:
    """Starts the smoke experiment, sends `signum` once metrics.jsonl shows step > after_step, and
    returns (exit code, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen(_main_command(data_dir, workdir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        records = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] > after_step:
            process.send_signal(signum)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _export_tensors(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(workdir / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def shapes_data_and_reference(tmp_path_factory):
    """Shapes World test data and an uninterrupted smoke run's exported params."""
    root = tmp_path_factory.mktemp("resume")
    data_dir, workdir = root / "data", root / "uninterrupted"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(_main_command(data_dir, workdir), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return data_dir, _export_tensors(workdir)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(shapes_data_and_reference, tmp_path):
    data_dir, reference = shapes_data_and_reference
    workdir = tmp_path / "killed"
    returncode, _ = _run_until(data_dir, workdir, signum=signal.SIGKILL, after_step=12)
    assert returncode == -signal.SIGKILL
    assert not (workdir / "results.json").exists()
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 40

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    resumed = subprocess.run(_main_command(data_dir, workdir), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    # Library INFO lines go to the run's log file, not the console; warnings reach both.
    assert f"Restored checkpoint step {max(saved)}" in (workdir / "log.txt").read_text()
    assert f"Restored checkpoint step {max(saved)}" not in resumed.stderr
    assert "Taking over the lock of a run that is gone" in resumed.stderr  # the killed run's LOCK
    history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert [record["resumed_from_step"] for record in history] == [None, max(saved)]
    steps = [record["step"] for record in read_metrics(workdir) if "train/loss" in record]
    assert steps == list(range(1, 41))  # lines of the killed steps after the checkpoint were replaced
    tensors = _export_tensors(workdir)
    assert set(tensors) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(shapes_data_and_reference, tmp_path):
    data_dir, _ = shapes_data_and_reference
    workdir = tmp_path / "terminated"
    returncode, stderr = _run_until(data_dir, workdir, signum=signal.SIGTERM, after_step=5)
    assert returncode == EXIT_PREEMPTED, stderr[-3000:]  # saved; the same command resumes
    assert not (workdir / "results.json").exists()
    stopped = int(next(line for line in stderr.splitlines()
                       if "Stopped on a preemption notice" in line).split("saving step ")[1].split(";")[0])
    assert 5 < stopped < 40
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped


# --------------------------------------------------------------------------------------------------
# (3) Two processes
# --------------------------------------------------------------------------------------------------


def _two_process_worker(process_id: str, port: str, workdir: str) -> None:
    config = {
        "distributed.coordinator_address": f"127.0.0.1:{port}",
        "distributed.num_processes": 2,
        "distributed.process_id": int(process_id),
        "distributed.cpu_collectives": "gloo",
    }
    # Only process 0 exports; the workdir is shared, so ask the method rather than the file system.
    method = ArrayClipMethod()
    trainer.train(array_config(**config), workdir, method)
    assert method.exported == (int(process_id) == 0)
    print("DONE", jax.process_index(), jax.process_count(), jax.device_count())


@pytest.mark.slow
def test_two_processes_train_together_and_match_one_process(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    command = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_trainer as m; "
               "m._two_process_worker(*sys.argv[1:])")
    workers = [subprocess.Popen([sys.executable, "-c", command, str(i), str(port), str(tmp_path / "two")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for index, worker in enumerate(workers):
        stdout, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-5000:]
        assert f"DONE {index} 2 2" in stdout
    with np.load(tmp_path / "two" / PARAMS_FILE) as two:
        two = dict(two)
    one = train_arrays(tmp_path / "one")
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["train/step"] == 3


# --------------------------------------------------------------------------------------------------
# (4) Non-finite loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """NaN images from the 3rd batch on: step 3's loss is NaN. Checkpoints every 2 steps; step 3 is
    found one step late (the host checks step s after dispatching s+1), still before step 4's save."""
    method = ArrayClipMethod(nan_from_batch=2)
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 3: loss = nan.*last good checkpoint is step 2") as stop:
        trainer.train(array_config(**{"total_steps": 6, "log_every": 100, "checkpoint.save_interval_steps": 2,
                                      "checkpoint.async_save": False}), tmp_path, method)
    # A user error (exit 2) in one line that says how to resume from the good step.
    assert isinstance(stop.value, UserError)
    assert "\n" not in str(stop.value)
    assert "lower optim.learning_rate" in str(stop.value) and "checkpoint.restore_step=2" in str(stop.value)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2]
    assert not (tmp_path / "results.json").exists()
    # Resuming trains on from step 2 with finite params (and hits the same bad batch again).
    with pytest.raises(trainer.NonFiniteLossError, match="step 3"):
        trainer.train(array_config(total_steps=6, log_every=100), tmp_path, ArrayClipMethod(nan_from_batch=2))


# --------------------------------------------------------------------------------------------------
# (5) Freezing
# --------------------------------------------------------------------------------------------------


def test_frozen_vision_tower_stays_bitwise_and_has_no_optimizer_state(tmp_path):
    import orbax.checkpoint as ocp

    policy = ((r"^vision_model/", False), (r"^visual_projection/", False), (r".*", True))
    trained = train_arrays(tmp_path, **{"optim.trainable": policy, "total_steps": 2})
    initial = initial_params()
    frozen = [key for key in initial if key.startswith(("vision_model/", "visual_projection/"))]
    assert len(frozen) > 10
    for key in initial:
        if key in frozen:
            np.testing.assert_array_equal(trained[key], initial[key], err_msg=key)
        else:
            assert not np.array_equal(trained[key], initial[key]), f"{key} did not train"

    metadata = ocp.PyTreeCheckpointer().metadata(tmp_path / "checkpoints" / "2" / "state").item_metadata.tree
    opt_paths = ["/".join(map(str, (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)))
                 for path, _ in jax.tree_util.tree_flatten_with_path(metadata["opt_state"])[0]]
    assert any("text_model" in path for path in opt_paths)
    assert not any("vision_model" in path or "visual_projection" in path for path in opt_paths), opt_paths
    param_paths = [str(path) for path, _ in jax.tree_util.tree_flatten_with_path(metadata["params"])[0]]
    assert not any("vision_model" in path for path in param_paths)


def test_unknown_method_is_a_config_error():
    from vlm_jax.config_lib import ConfigError
    from vlm_jax.methods import get_method

    with pytest.raises(ConfigError, match="not a known method"):
        get_method("nope")


# --------------------------------------------------------------------------------------------------
# (6) The workdir: one run at a time, unwritable paths, config changes, unreadable checkpoints
# --------------------------------------------------------------------------------------------------

CONTENDER = """
import sys, time, ml_collections
from vlm_jax import main
from vlm_jax.errors import UserError
started = time.perf_counter()
try:
    main.run(ml_collections.ConfigDict({"task": "train", "method": "clip"}), sys.argv[1])
except UserError as error:
    print(f"{time.perf_counter() - started:.3f}|{error}")
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_second_run_into_a_busy_workdir_fails_at_once_and_the_first_finishes_cleanly(tmp_path):
    from vlm_jax.train import workdir

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with workdir.WorkdirLock(tmp_path, command="the first run"):  # what main.run holds around the task
        contender = subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        trainer.train(array_config(), tmp_path, ArrayClipMethod())
        stdout, stderr = contender.communicate(timeout=120)
    assert contender.returncode == 2, stderr[-3000:]
    seconds, message = stdout.strip().split("|", 1)
    assert float(seconds) < 5
    assert f"pid {os.getpid()}" in message and f"host {socket.gethostname()}" in message and "the first run" in message
    steps = [record["step"] for record in read_metrics(tmp_path) if "train/loss" in record]
    assert steps == [1, 2, 3]
    assert json.loads((tmp_path / "results.json").read_text())["train/step"] == 3
    assert len(workdir.read_history(tmp_path)) == 1
    assert not (tmp_path / "LOCK").exists()


def test_an_unwritable_checkpoint_directory_fails_in_one_line_within_10_s(tmp_path, unwritable):
    checkpoints = unwritable(tmp_path / "checkpoints")
    started = time.perf_counter()
    with pytest.raises(UserError, match="cannot write the checkpoint directory") as failure:
        trainer.train(array_config(), tmp_path, ArrayClipMethod())
    assert time.perf_counter() - started < 10
    assert str(checkpoints) in str(failure.value) and "\n" not in str(failure.value)


def test_resuming_with_a_changed_model_refuses_before_any_work_and_keeps_config_json(tmp_path):
    from vlm_jax.train import workdir

    workdir.record_config(tmp_path, array_config())
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # a previous run's checkpoint step
    before = (tmp_path / "config.json").read_text()
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"changes the model .*model\.embed_dim.*allow_config_change=True"):
        trainer.train(array_config(**{"model.embed_dim": 16}), tmp_path, ArrayClipMethod())
    assert time.perf_counter() - started < 10
    assert (tmp_path / "config.json").read_text() == before
    assert len(workdir.read_history(tmp_path)) == 1


class ShapedArrayClipMethod(ArrayClipMethod):
    """ArrayClipMethod whose projection width follows config.model.embed_dim."""

    def model_config(self, config):
        import dataclasses

        return dataclasses.replace(tiny(), embed_dim=int(config.model.embed_dim))


def _config_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "config differs" in r.getMessage()]


@pytest.mark.slow
def test_config_changes_on_resume_warn_once_refuse_a_model_change_and_record_only_accepted_starts(tmp_path, caplog):
    from vlm_jax.train import workdir

    trainer.train(array_config(total_steps=2), tmp_path, ShapedArrayClipMethod())
    recorded = (tmp_path / "config.json").read_text()
    # Allowed, a change of shapes still cannot restore: a mismatch naming the parameters, nothing recorded.
    with pytest.raises(UserError, match=r"does not match .*params/visual_projection/kernel/value: saved \(64, 32\), "
                                        r"config \(64, 16\)") as mismatch:
        trainer.train(array_config(**{"total_steps": 2, "model.embed_dim": 16, "checkpoint.allow_config_change": True}),
                      tmp_path, ShapedArrayClipMethod())
    assert "could not be read" not in str(mismatch.value)
    assert (tmp_path / "config.json").read_text() == recorded
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer.train(array_config(**{"total_steps": 2, "optim.learning_rate": 2e-3}), tmp_path,
                      ShapedArrayClipMethod())
    lines = _config_warnings(caplog)
    assert len(lines) == 1 and "optim.learning_rate: 0.001 -> 0.002" in lines[0], lines
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 2e-3
    history = workdir.read_history(tmp_path)
    assert [record["resumed_from_step"] for record in history] == [None, 2]


def _largest_array_file(step_dir: Path) -> Path:
    files = [path for path in (step_dir / "state").rglob("*") if path.is_file() and path.parent.name == "d"]
    return max(files, key=lambda path: path.stat().st_size)


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_resumes_from_the_previous_step_to_the_same_params(tmp_path, caplog):
    from vlm_jax.train import workdir

    overrides = {"total_steps": 4, "checkpoint.save_interval_steps": 2, "checkpoint.async_save": False}
    reference = train_arrays(tmp_path, **overrides)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 4]
    chunk = _largest_array_file(tmp_path / "checkpoints" / "4")
    os.truncate(chunk, chunk.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        resumed = train_arrays(tmp_path, **overrides)
    skipped = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(skipped) == 1 and "step 4" in skipped[0] and str(tmp_path / "checkpoints" / "4") in skipped[0]
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert [record["step"] for record in read_metrics(tmp_path) if "train/loss" in record] == [1, 2, 3, 4]
    assert [record["resumed_from_step"] for record in workdir.read_history(tmp_path)] == [None, 2]
    with pytest.raises(UserError, match=r"restore_step=9 is not in .*steps \[1, 2, 4\]"):
        trainer.train(array_config(**overrides, **{"checkpoint.restore_step": 9}), tmp_path, ArrayClipMethod())


class BadRecordsArrayClipMethod(ArrayClipMethod):
    """ArrayClipMethod through the pipeline's skip-and-batch step, with every 5th record corrupt."""

    def train_iterator(self, config, process_index, process_count):
        from vlm_jax.data.bad_input import BadInput, SkipAndBatchIterDataset

        rng = np.random.default_rng(0)
        images = rng.normal(size=(NUM_EXAMPLES, 32, 32, 3)).astype(np.float32)
        ids = rng.integers(1, 990, size=(NUM_EXAMPLES, 16)).astype(np.int32)
        ids[:, -1] = 999

        def decode(row):
            if row % 5 == 0:
                return BadInput("corrupt_image", int(row), "unreadable test image")
            return {"image": images[row], "text_ids": ids[row]}

        examples = grain.MapDataset.range(NUM_EXAMPLES).shuffle(seed=config.seed).repeat(None).map(decode)
        local = config.global_batch_size // process_count
        return iter(SkipAndBatchIterDataset(examples.to_iter_dataset(), local, drop_remainder=True,
                                            pad_remainder=False))


@pytest.mark.slow
def test_bad_input_totals_after_a_resume_equal_an_uninterrupted_run(tmp_path):
    def skipped(workdir):
        return [record["data/skipped_corrupt_image"] for record in read_metrics(workdir) if "train/loss" in record]

    trainer.train(array_config(total_steps=4), tmp_path / "straight", BadRecordsArrayClipMethod())
    trainer.train(array_config(total_steps=2), tmp_path / "resumed", BadRecordsArrayClipMethod())  # stops at 2
    halfway = skipped(tmp_path / "resumed")[-1]
    assert halfway > 0
    trainer.train(array_config(total_steps=4), tmp_path / "resumed", BadRecordsArrayClipMethod())
    assert skipped(tmp_path / "resumed") == skipped(tmp_path / "straight")
    assert skipped(tmp_path / "straight")[-1] > halfway
    for name in ("straight", "resumed"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["data/skipped_corrupt_image"] == skipped(tmp_path / "straight")[-1]
