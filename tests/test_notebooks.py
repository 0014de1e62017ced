"""The Colab notebooks (notebooks/*.ipynb, written by notebooks/build.py): committed stripped and up
to date with their source, badges and install cells on the project's repository, the setup cell's
install decisions, and every notebook executed top to bottom in smoke mode."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Wall-clock limit of one notebook in smoke mode, kernel start included. Each takes 30-125 s of CPU
# (the first to need them also trains the smoke base CLIP or captioner into the shared cache); 300 s
# was reached on two cores at a load average of 9.
TIME_LIMIT_S = 420


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()
NAMES = tuple(build.NOTEBOOKS)


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def unstripped(notebook: nbformat.NotebookNode) -> list[str]:
    """What a committed notebook must not hold: outputs, execution counts, widget state, cell metadata."""
    problems = ["widget state in the metadata"] if "widgets" in notebook.metadata else []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and cell.outputs:
            problems.append(f"cell {number} has outputs")
        if cell.cell_type == "code" and cell.execution_count is not None:
            problems.append(f"cell {number} has an execution count")
        if cell.metadata:
            problems.append(f"cell {number} has metadata {sorted(cell.metadata)}")
    return problems


# --------------------------------------------------------------------------------------------------
# The committed files


def test_the_notebooks_in_the_folder_are_the_ones_build_py_writes():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    assert set(NAMES) == {"quickstart", "reco", "rar", "recap", "grain"}


@pytest.mark.parametrize("name", NAMES)
def test_build_py_regenerates_the_committed_notebook_byte_for_byte(name):
    assert (NOTEBOOKS / f"{name}.ipynb").read_text() == build.notebook(name), (
        f"notebooks/{name}.ipynb is out of date; run python notebooks/build.py")


def test_build_py_check_names_a_stale_notebook(tmp_path, monkeypatch, capsys):
    for name in NAMES:
        (tmp_path / f"{name}.ipynb").write_text(build.notebook(name))
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.main(["--check"]) == 0
    (tmp_path / "rar.ipynb").write_text(build.notebook("rar").replace("CLIP+kNN", "CLIP"))
    assert build.main(["--check"]) == 1
    assert "out of date: rar.ipynb" in capsys.readouterr().err


def test_every_notebook_is_committed_without_outputs_execution_counts_or_widget_state():
    for name in NAMES:
        notebook = read(name)
        assert unstripped(notebook) == [], name
        assert notebook.metadata.kernelspec.name == "python3"
    # The check itself sees what an executed notebook carries.
    executed = read("reco")
    executed.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    code = next(cell for cell in executed.cells if cell.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="[CpuDevice(id=0)]\n")]
    code.execution_count = 1
    assert unstripped(executed) == ["widget state in the metadata", "cell 1 has outputs",
                                    "cell 1 has an execution count"]


def test_badges_and_install_cells_name_the_project_repository():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Repository"] == build.REPOSITORY
    colab = build.REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    for name in NAMES:
        notebook = read(name)
        title = notebook.cells[0]
        assert title.cell_type == "markdown" and title.source.startswith("# ")
        assert re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]*)\)", title.source) == [
            f"{colab}/blob/main/notebooks/{name}.ipynb"]
        setup = notebook.cells[1].source
        assert f'REPOSITORY = "{build.REPOSITORY}"' in setup
        assert "@ git+{REPOSITORY}" in setup and '"git", "clone", "-q", "--depth=1", REPOSITORY' in setup
        # No other repository anywhere in the notebook.
        text = "\n".join(cell.source for cell in notebook.cells)
        assert set(re.findall(r"github\.com/[\w.-]+/[\w.-]+", text)) == {f"github.com/{build.GITHUB_PATH}"}, name


# --------------------------------------------------------------------------------------------------
# The setup cell: what it installs where


def _run_setup(monkeypatch, cwd, *, colab=False, installed=True, environment=None, nvidia_smi=None):
    """Executes the setup cell in `cwd` with Colab, the installed package, the environment and
    nvidia-smi (None: absent; else its exit code) as given; returns (its commands, its REPO)."""
    commands = []
    real_find_spec = importlib.util.find_spec

    def find_spec(module, *args):
        if module == "google.colab":
            return object() if colab else None
        if module == "vlm_jax" and not installed:
            return None
        return real_find_spec(module, *args)

    def run(command, **kwargs):
        commands.append(list(command))
        code = nvidia_smi if command == ["nvidia-smi"] else 0
        return subprocess.CompletedProcess(command, code, b"", b"")

    for key in ("COLAB_TPU_ADDR", "TPU_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (environment or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi" if nvidia_smi is not None else None)
    monkeypatch.chdir(cwd)
    namespace = {}
    exec(compile(read("quickstart").cells[1].source, "setup", "exec"), namespace)
    return [command for command in commands if command != ["nvidia-smi"]], namespace["REPO"]


def _pip(extra: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", f"vlm_jax{extra} @ git+{build.REPOSITORY}"]


def test_setup_in_a_checkout_installs_nothing_and_finds_the_experiments_beside_the_notebooks(monkeypatch):
    commands, repo = _run_setup(monkeypatch, NOTEBOOKS)
    assert commands == [] and repo == ROOT


def test_setup_without_the_package_installs_it_with_the_cpu_extra(monkeypatch):
    commands, repo = _run_setup(monkeypatch, NOTEBOOKS, installed=False, nvidia_smi=9)
    assert commands == [_pip("")] and repo == ROOT


@pytest.mark.parametrize("runtime, environment, nvidia_smi, extra", [
    ("tpu", {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, None, "[tpu]"),
    ("tpu_vm", {"TPU_NAME": "local"}, 0, "[tpu]"),
    ("gpu", {}, 0, "[cuda]"),
    ("cpu", {}, None, ""),
])
def test_setup_in_colab_installs_the_runtimes_extra_and_clones_the_repository(monkeypatch, tmp_path, runtime,
                                                                              environment, nvidia_smi, extra):
    commands, repo = _run_setup(monkeypatch, tmp_path, colab=True, environment=environment, nvidia_smi=nvidia_smi)
    assert repo == tmp_path.resolve() / "vlm_jax"
    assert commands == [_pip(extra), ["git", "clone", "-q", "--depth=1", build.REPOSITORY, str(repo)]]
    # A second run of the cell finds the clone.
    (repo / "experiments").mkdir(parents=True)
    commands, _ = _run_setup(monkeypatch, tmp_path, colab=True, environment=environment, nvidia_smi=nvidia_smi)
    assert commands == [_pip(extra)]


# --------------------------------------------------------------------------------------------------
# Executed top to bottom


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory) -> pathlib.Path:
    """The model cache, TFDS data_dir and JAX compilation cache every notebook of this test run shares,
    across pytest-xdist workers too: the smoke base CLIP and captioner are trained once (the cache serializes builders),
    and Shapes World's test config is built here, once, under a lock (two kernels building it into
    one data_dir at the same time would collide)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the basetemp of this run, above each worker's own
    shared = root / "notebooks_shared"
    shared.mkdir(exist_ok=True)
    with open(shared / "prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from vlm_jax.data import shapes_world

        shapes_world.prepare(shared / "tfds", "test")
    return shared


def _outputs(cell, kind: str) -> str:
    """A code cell's stream text (kind "stream") or the MIME types it displayed (kind "mime")."""
    if kind == "stream":
        return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")
    return " ".join(mime for output in cell.outputs for mime in output.get("data", {}))


def _check_outputs(name: str, notebook: nbformat.NotebookNode, workdirs: pathlib.Path) -> None:
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "[CpuDevice(id=0)" in _outputs(code[0], "stream")
    assert "preset 'shapes,smoke=True'" in _outputs(code[1], "stream")
    figures = [cell for cell in code if "plt.show()" in cell.source]
    assert figures and all("image/png" in _outputs(cell, "mime") for cell in figures)
    table = _outputs(code[-1] if name == "quickstart" else next(cell for cell in code if cell.source == build.TABLE),
                     "stream")
    assert "(in %; one seed)" in table and "time/total_s" in table
    experiment = {"quickstart": "quickstart_smoke/reco", "grain": "grain_clip_smoke"}.get(name, f"{name}_smoke")
    assert (workdirs / experiment / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, shared_dirs, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    environment = {key: value for key, value in os.environ.items() if key != "CLIP_DIR"}
    # JAX's persistent compilation cache: notebooks that train the same models (quickstart and reco, the
    # rows of one experiment) compile each step once.
    environment.update(CI="true", VLM_JAX_SMOKE="1", JAX_PLATFORMS="cpu", VLM_JAX_CACHE=str(shared_dirs / "cache"),
                       TFDS_DATA_DIR=str(shared_dirs / "tfds"), VLM_JAX_NOTEBOOK_WORKDIRS=str(tmp_path / "workdirs"),
                       JAX_COMPILATION_CACHE_DIR=str(shared_dirs / "jax_cache"))
    notebook = read(name)
    started = time.monotonic()
    # Each cell may take what is left of the notebook's limit.
    client = NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
                            timeout_func=lambda cell: max(1, int(started + TIME_LIMIT_S - time.monotonic())))
    try:
        client.execute(env=environment)
    except (CellExecutionError, CellTimeoutError) as error:
        pytest.fail(f"notebooks/{name}.ipynb: {error}", pytrace=False)
    elapsed = time.monotonic() - started
    print(f"notebooks/{name}.ipynb ran in {elapsed:.0f} s")
    _check_outputs(name, notebook, tmp_path / "workdirs")
