"""Head export/import: a params subtree and its config round-trip; mismatches and corrupt files fail
in one sentence naming the file; an interrupted export leaves nothing that looks finished."""

import dataclasses
import types

import jax
import numpy as np
import pytest
from flax import nnx

from vlm_jax.errors import UserError
from vlm_jax.models.clip import CLIP, tiny
from vlm_jax.models.fusion import Fusion, FusionConfig
from vlm_jax.weights import atomic, heads
from vlm_jax.weights.hf_clip import CheckpointMismatchError


class FusedClip(nnx.Module):
    """A frozen CLIP with one trained head on top, the shape of RECO's model."""

    def __init__(self, fusion_config: FusionConfig, seed: int):
        self.clip = CLIP(tiny(), rngs=nnx.Rngs(seed))
        self.image_fusion = Fusion(fusion_config, rngs=nnx.Rngs(seed + 1))


def outside_clip(name: str) -> bool:
    return not name.startswith("clip/")


def make_model(seed: int, **fusion_fields) -> FusedClip:
    fields = dict(embed_dim=32, width=16, heads=2, zero_init_output=False) | fusion_fields
    return FusedClip(FusionConfig(**fields), seed)


def params_of(model, include):
    return {name: np.asarray(variable[...]) for name, (_, variable) in heads.select_params(model, include).items()}


def test_head_round_trips_into_a_model_built_from_its_saved_config(tmp_path):
    trained = make_model(seed=0)
    written = heads.save_head(trained, tmp_path, dataclasses.asdict(trained.image_fusion.config),
                              include=outside_clip)
    assert written and all(name.startswith("image_fusion/") for name in written)
    assert sorted(tmp_path.iterdir()) == [tmp_path / atomic.MARKER, tmp_path / heads.CONFIG_FILE,
                                          tmp_path / heads.WEIGHTS_FILE]
    assert atomic.export_finished(tmp_path)

    config = FusionConfig(**heads.read_head_config(tmp_path))
    assert config == trained.image_fusion.config
    fresh = FusedClip(config, seed=5)
    clip_before = params_of(fresh, "clip/")
    assert heads.load_head(fresh, tmp_path, include=outside_clip) == written

    expected = params_of(trained, outside_clip)
    loaded = params_of(fresh, outside_clip)
    assert loaded.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
    # The CLIP outside the head is left as it was.
    for name, value in params_of(fresh, "clip/").items():
        np.testing.assert_array_equal(value, clip_before[name], err_msg=name)
    query = jax.random.normal(jax.random.key(0), (2, 32))
    retrieved = jax.random.normal(jax.random.key(1), (2, 3, 32))
    np.testing.assert_array_equal(np.asarray(fresh.image_fusion(query, retrieved)),
                                  np.asarray(trained.image_fusion(query, retrieved)))


def test_a_path_prefix_selects_the_same_head_as_a_predicate(tmp_path):
    model = make_model(seed=0)
    assert heads.select_params(model, "image_fusion/").keys() == heads.select_params(model, outside_clip).keys()


def test_a_selector_matching_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="matches no param"):
        heads.save_head(make_model(seed=0), tmp_path, {}, include="text_fusion/")


def test_mis_shaped_head_names_each_param_in_one_sentence(tmp_path):
    heads.save_head(make_model(seed=0), tmp_path, {}, include=outside_clip)
    shapes = r"shape mismatch \(\d+\): image_fusion/.*\(file \(32, 16\), model \(32, 24\)\)"
    with pytest.raises(CheckpointMismatchError, match=shapes) as error:
        heads.load_head(make_model(seed=1, width=24, heads=2), tmp_path, include=outside_clip)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    assert message.startswith(f"checkpoint {tmp_path / heads.WEIGHTS_FILE} does not match the model it is loaded "
                              "into: first difference image_fusion/")


def test_missing_and_unexpected_names_are_reported(tmp_path):
    heads.save_head(make_model(seed=0), tmp_path, {}, include=outside_clip)
    deeper = make_model(seed=1, depth=2)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): image_fusion/layers/1/"):
        heads.load_head(deeper, tmp_path, include=outside_clip)
    # A model without the head's params: every saved name is unexpected.
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(\d+\): image_fusion/"):
        heads.load_head(CLIP(tiny(), rngs=nnx.Rngs(0)), tmp_path)


def test_load_without_a_selector_fills_exactly_the_saved_names(tmp_path):
    trained = make_model(seed=0)
    heads.save_head(trained, tmp_path, {}, include="image_fusion/out_proj/")
    fresh = make_model(seed=3)
    assert heads.load_head(fresh, tmp_path) == ["image_fusion/out_proj/bias", "image_fusion/out_proj/kernel"]
    np.testing.assert_array_equal(np.asarray(fresh.image_fusion.out_proj.kernel[...]),
                                  np.asarray(trained.image_fusion.out_proj.kernel[...]))


def test_an_export_interrupted_midway_leaves_no_finished_looking_directory(tmp_path, monkeypatch):
    target = tmp_path / "export"
    written = []

    def fail_after_the_weights(*args, **kwargs):  # head.json is written after head.safetensors
        written.extend(path.name for path in tmp_path.glob("export.tmp-*/*"))
        raise OSError("disk full")

    monkeypatch.setattr(heads, "json", types.SimpleNamespace(dumps=fail_after_the_weights))
    with pytest.raises(OSError, match="disk full"):
        heads.save_head(make_model(seed=0), target, {}, include=outside_clip)
    assert written == [heads.WEIGHTS_FILE]
    assert not target.exists() and not atomic.export_finished(target)
    assert list(tmp_path.iterdir()) == []  # the staging directory is removed too


def test_a_second_export_replaces_the_first_whole(tmp_path):
    target = tmp_path / "export"
    heads.save_head(make_model(seed=0), target, {"seed": 0}, include=outside_clip)
    heads.save_head(make_model(seed=1), target, {"seed": 1}, include="image_fusion/out_proj/")
    assert heads.read_head_config(target) == {"seed": 1} and atomic.export_finished(target)
    fresh = make_model(seed=3)
    assert heads.load_head(fresh, target) == ["image_fusion/out_proj/bias", "image_fusion/out_proj/kernel"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


def test_a_corrupt_head_file_is_a_one_line_user_error_naming_it(tmp_path):
    heads.save_head(make_model(seed=0), tmp_path, {}, include=outside_clip)
    weights = tmp_path / heads.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=f"cannot read the weights file {weights}") as error:
        heads.load_head(make_model(seed=1), tmp_path, include=outside_clip)
    assert "\n" not in str(error.value)
    (tmp_path / heads.CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{tmp_path / heads.CONFIG_FILE} is not valid JSON"):
        heads.read_head_config(tmp_path)


def test_staging_left_by_a_killed_writer_is_removed_by_the_next_export(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"export.tmp-{int(dead.stdout)}"
    leftover.mkdir()
    (leftover / heads.WEIGHTS_FILE).write_bytes(b"half")
    heads.save_head(make_model(seed=0), tmp_path / "export", {}, include=outside_clip)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
