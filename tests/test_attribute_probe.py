"""benchmarks/attribute_probe.py: the attribute targets are the main object's, and the probe tells an
image embedding that encodes shape from a shape-blind one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import attribute_probe  # noqa: E402


@pytest.fixture(scope="module")
def test_build():
    import tensorflow_datasets as tfds

    from vlm_jax.data import shapes_world

    shapes_world.prepare(None, "test")
    source = tfds.data_source("shapes_world/test", split="eval_classification")
    return attribute_probe.attribute_targets(source)


def test_targets_are_the_attributes_of_each_images_entity(test_build):
    import tensorflow_datasets as tfds

    from vlm_jax.data.shapes_world import world

    images, targets = test_build
    labels = [int(r["label"]) for r in tfds.data_source("shapes_world/test", split="eval_classification")]
    assert len(images) == len(labels) and set(targets) == {"shape", "colour", "pattern", "size", "quadrant"}
    records = tfds.data_source("shapes_world/test", split="eval_classification")
    for record, quadrant in zip(records, targets["quadrant"]):
        main = int(np.argmax(record["regions"]["is_main"]))
        ymin, xmin, ymax, xmax = record["regions"]["bbox"][main]
        assert quadrant == {(False, False): 0, (False, True): 1, (True, False): 2, (True, True): 3}[
            (ymin + ymax >= 1.0, xmin + xmax >= 1.0)]
    for label, shape, colour, pattern in zip(labels, targets["shape"], targets["colour"], targets["pattern"]):
        assert world.entity_attributes(label) == (world.SHAPES[shape], world.COLOURS[colour], world.PATTERNS[pattern])
    assert set(targets["size"].tolist()) == {0, 1}


def _embedding(targets, attributes, seed=0):
    """float32 [N, 64]: one-hot codes of `attributes`, randomly rotated, plus noise (a stand-in embedding)."""
    rng = np.random.default_rng(seed)
    codes = np.concatenate([np.eye(8)[targets[name]] for name in attributes], axis=1)
    return (codes @ rng.normal(size=(codes.shape[1], 64)) + 0.3 * rng.normal(size=(len(codes), 64))).astype(np.float32)


def test_probe_finds_shape_only_in_an_embedding_that_encodes_it(test_build):
    _, targets = test_build
    seeing = attribute_probe.probe_attributes(_embedding(targets, ("shape", "colour", "pattern")), targets)
    blind = attribute_probe.probe_attributes(_embedding(targets, ("colour", "pattern")), targets)
    assert min(seeing["shape"], seeing["colour"], seeing["pattern"]) >= 0.9, seeing
    assert blind["colour"] >= 0.9 and blind["pattern"] >= 0.9, blind
    assert blind["shape"] < 0.3, blind  # chance is 1/8: the premise check fails for a shape-blind model


@pytest.mark.slow
def test_benchmark_prints_one_row_per_clip_directory(tmp_path):
    import dataclasses

    from flax import nnx

    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.models.clip import CLIP, tiny
    from vlm_jax.weights import save_pretrained

    base = tiny()
    for stem in ("patch", "conv"):
        config = base.replace(vision=dataclasses.replace(base.vision, stem=stem, stem_channels=(8, 16, 32)))
        save_pretrained(CLIP(config, rngs=nnx.Rngs(0)), tmp_path / stem, preprocess=PreprocessSpec.clip(32))
    result = subprocess.run(
        [sys.executable, "benchmarks/attribute_probe.py", "--tfds_name=shapes_world/test", "--max_examples=64",
         "--probe_steps=20", f"--model_dir=patch={tmp_path / 'patch'}", f"--model_dir=conv={tmp_path / 'conv'}",
         f"--json={tmp_path / 'probe.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                                                      "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert [line.split()[0] for line in lines[3:]] == ["chance", "patch", "conv"]
