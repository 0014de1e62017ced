"""Parity of converted checkpoints with transformers (torch CPU) and checkpoint error handling.

Reference: transformers 5.x CLIPModel / SiglipModel built from tiny configs, every parameter
re-initialised with non-trivial random values (LayerNorm weights 1 + noise, biases non-zero),
saved with save_pretrained and loaded by vlm_jax.weights without torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.weights import (  # noqa: E402
    CheckpointMismatchError,
    atomic,
    load_model,
    load_pretrained,
    pretrained,
    save_pretrained,
)
from vlm_jax.weights.hf_config import from_hf_config, to_hf_config  # noqa: E402

TOLERANCE = 1e-4
BATCH = 3
TEXT_LENGTH = 12


def _reinit(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ("logit_scale", "logit_bias"):
                param.fill_(1.3 if name == "logit_scale" else -2.5)
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)


def _clip_openai_legacy():
    """OpenAI-style: quick_gelu, class token, legacy eos id 2 (pooled at argmax of ids)."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, eos_token_id=2,
                         bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)


def _clip_first_eos():
    """Current-style eos id: pooled at the first eos_token_id, which is not the largest id."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, eos_token_id=5,
                         bos_token_id=0, pad_token_id=5),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)


def _clip_other_shapes():
    """Another patch size, image size and projection width; gelu; text wider than vision."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, eos_token_id=7,
                         hidden_act="gelu"),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=3, image_size=28, patch_size=4, hidden_act="gelu"),
        projection_dim=40)


def _siglip():
    """SigLIP: MAP head, gelu_tanh, bidirectional text with last-token pooling and a head."""
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LENGTH,
                         projection_size=64),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8))


REFERENCES = {
    "clip_legacy_eos": _clip_openai_legacy,
    "clip_first_eos": _clip_first_eos,
    "clip_other_shapes": _clip_other_shapes,
    "siglip": _siglip,
}


def _hf_class(hf_config):
    return transformers.SiglipModel if hf_config.model_type == "siglip" else transformers.CLIPModel


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory):
    """{name: (directory, transformers model)} for every reference config."""
    torch.manual_seed(0)
    out = {}
    for name, make_config in REFERENCES.items():
        hf_config = make_config()
        model = _hf_class(hf_config)(hf_config).eval()
        _reinit(model)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (directory, model)
    return out


def _inputs(hf_config, seed: int = 0):
    """pixels float32 [B, S, S, 3] and ids int32 [B, L] whose EOS placement tells poolings apart."""
    rng = np.random.default_rng(seed)
    size = hf_config.vision_config.image_size
    pixels = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
    text = hf_config.text_config
    # Random ids stay below vocab_size - 1, the id that plays OpenAI's EOT in the legacy config.
    ids = rng.integers(10, text.vocab_size - 1, size=(BATCH, TEXT_LENGTH)).astype(np.int32)
    if hf_config.model_type == "siglip":
        return pixels, ids
    eos = text.eos_token_id
    for row, position in enumerate((4, 7, TEXT_LENGTH - 1)):
        if eos == 2:
            ids[row, position] = text.vocab_size - 1  # the EOT token is the largest id in OpenAI's vocab
        else:
            ids[row, position] = eos
            ids[row, position + 1:] = eos  # padding with the eos id: pooling must take the first one
    return pixels, ids


def _reference_embeddings(model, pixels, ids):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return image.pooler_output.numpy(), text.pooler_output.numpy()


def _our_embeddings(model, pixels, ids):
    return np.asarray(model.encode_image(jnp.asarray(pixels))), np.asarray(model.encode_text(jnp.asarray(ids)))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_loaded_model_matches_transformers_embeddings(reference_dirs, name):
    directory, reference = reference_dirs[name]
    pixels, ids = _inputs(reference.config)
    want_image, want_text = _reference_embeddings(reference, pixels, ids)
    model = load_model(directory)
    got_image, got_text = _our_embeddings(model, pixels, ids)
    assert got_image.shape == want_image.shape and got_text.shape == want_text.shape
    assert np.abs(want_image).max() > 0.1 and np.abs(want_text).max() > 0.1
    np.testing.assert_allclose(got_image, want_image, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(got_text, want_text, atol=TOLERANCE, rtol=0)
    assert float(model.logit_scale[...]) == pytest.approx(1.3)
    if model.logit_bias is not None:
        assert float(model.logit_bias[...]) == pytest.approx(-2.5)


def test_eos_pooling_variants_pick_different_positions(reference_dirs):
    """Guards the two EOT rules: with legacy id 2 the pooled position is argmax(ids); otherwise
    the first eos. The inputs make these positions differ from the last token."""
    for name in ("clip_legacy_eos", "clip_first_eos"):
        directory, reference = reference_dirs[name]
        model = load_model(directory)
        pixels, ids = _inputs(reference.config)
        tokens = model.text_model.tokens(jnp.asarray(ids))
        pooled = np.asarray(model.text_model.pool(tokens, jnp.asarray(ids)))
        np.testing.assert_allclose(pooled[0], np.asarray(tokens[0, 4]), atol=1e-6)
        np.testing.assert_allclose(pooled[1], np.asarray(tokens[1, 7]), atol=1e-6)


@pytest.mark.parametrize("name", ["clip_legacy_eos", "siglip"])
def test_saved_model_loads_in_transformers_and_matches(reference_dirs, tmp_path, name):
    directory, reference = reference_dirs[name]
    model = load_model(directory)
    save_pretrained(model, tmp_path)
    assert atomic.export_finished(tmp_path)  # the completion marker beside the files transformers reads
    reloaded = _hf_class(reference.config).from_pretrained(tmp_path).eval()
    pixels, ids = _inputs(reference.config, seed=1)
    got_image, got_text = _our_embeddings(model, pixels, ids)
    want_image, want_text = _reference_embeddings(reloaded, pixels, ids)
    np.testing.assert_allclose(got_image, want_image, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(got_text, want_text, atol=TOLERANCE, rtol=0)
    original = reference.state_dict()
    for key, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)


def test_our_hf_config_builds_the_same_transformers_config(reference_dirs):
    for name, (directory, reference) in reference_dirs.items():
        config = from_hf_config(json.loads((directory / "config.json").read_text()))
        assert from_hf_config(to_hf_config(config)) == config
        rebuilt = type(reference.config)(**to_hf_config(config))
        for tower in ("text_config", "vision_config"):
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "hidden_act", "layer_norm_eps"):
                assert getattr(getattr(rebuilt, tower), key) == getattr(getattr(reference.config, tower), key)


def test_sharded_checkpoint_with_index_loads(reference_dirs, tmp_path):
    _, reference = reference_dirs["clip_first_eos"]
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    pixels, ids = _inputs(reference.config)
    want_image, want_text = _reference_embeddings(reference, pixels, ids)
    got_image, got_text = _our_embeddings(load_model(tmp_path), pixels, ids)
    np.testing.assert_allclose(got_image, want_image, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(got_text, want_text, atol=TOLERANCE, rtol=0)


def test_bfloat16_load_stays_close_to_float32(reference_dirs):
    directory, reference = reference_dirs["siglip"]
    pixels, ids = _inputs(reference.config)
    want_image, _ = _our_embeddings(load_model(directory), pixels, ids)
    model = load_model(directory, dtype="bfloat16", param_dtype="bfloat16")
    assert model.vision_model.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    got_image, _ = _our_embeddings(model, pixels, ids)
    assert np.abs(got_image - want_image).max() < 0.05 * np.abs(want_image).max()


def test_bfloat16_params_export_and_reload_bit_exactly(reference_dirs, tmp_path):
    directory, _ = reference_dirs["siglip"]
    model = load_model(directory, param_dtype="bfloat16")
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.SiglipModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    probe = reloaded.vision_model.head.probe.detach().float().numpy()
    np.testing.assert_array_equal(probe, np.asarray(model.vision_model.head.probe[...], np.float32))
    again = load_model(tmp_path, param_dtype="bfloat16")
    kernel = again.text_model.encoder.layers[0].self_attn.q_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), np.asarray(
        model.text_model.encoder.layers[0].self_attn.q_proj.kernel[...], np.float32))


def test_mismatched_checkpoint_lists_missing_unexpected_and_misshaped_keys(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.extra_adapter.weight"] = np.zeros((2, 2), np.float32)
    tensors["visual_projection.weight"] = np.zeros((16, 64), np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message
    # The file, then the first differing tensor in model order (the projection comes after both towers).
    assert message.startswith(f"checkpoint {tmp_path / 'model.safetensors'} does not match the model built from "
                              f"{tmp_path / 'config.json'}: first difference text_model.encoder.layers.1.mlp.fc2.bias "
                              "(missing from the checkpoint); ")
    assert "missing (1): text_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "unexpected (1): vision_model.extra_adapter.weight" in message
    assert "visual_projection.weight: checkpoint (16, 64), model expects (32, 64)" in message


def test_stale_position_id_buffers_are_ignored(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    tensors["text_model.embeddings.position_ids"] = np.arange(TEXT_LENGTH)[None]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    load_model(tmp_path)


def test_pickle_checkpoints_are_refused_with_conversion_hint(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match="safe_serialization=True") as error:
        load_model(tmp_path)
    assert "pytorch_model.bin" in str(error.value)
    with pytest.raises(UserError, match="pickle"):
        load_model(tmp_path / "pytorch_model.bin")


def test_missing_weights_file_is_a_clear_error(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    with pytest.raises(UserError, match=f"no config.json in {tmp_path}"):
        load_model(tmp_path)
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path)


def test_truncated_weights_or_corrupt_config_is_a_one_line_user_error_naming_the_file(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    weights = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match=f"cannot read the weights file {tmp_path / 'model.safetensors'}") as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "config.json").write_text('{"model_type": "clip", ')
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'} does not describe a CLIP or SigLIP model"):
        load_model(tmp_path)


def test_a_save_interrupted_midway_leaves_no_finished_looking_export(reference_dirs, tmp_path, monkeypatch):
    directory, _ = reference_dirs["clip_first_eos"]
    model = load_model(directory)
    target = tmp_path / "export"

    def fail_after_the_weights(*args, **kwargs):  # config.json is written after model.safetensors
        assert [path.name for path in tmp_path.glob("export.tmp-*/*")] == ["model.safetensors"]
        raise OSError("disk full")

    monkeypatch.setattr(pretrained.json, "dumps", fail_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [] and not atomic.export_finished(target)

    save_pretrained(model, target)
    assert sorted(path.name for path in target.iterdir()) == [
        "config.json", atomic.MARKER, "model.safetensors"]
    assert json.loads((target / atomic.MARKER).read_text())["files"] == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(np.asarray(load_model(target).logit_scale[...]), np.asarray(model.logit_scale[...]))


def test_an_export_over_an_older_one_replaces_it_and_over_other_files_keeps_them(reference_dirs, tmp_path):
    directory, _ = reference_dirs["clip_first_eos"]
    model = load_model(directory)
    save_pretrained(model, tmp_path / "export")
    (tmp_path / "export" / "stale.txt").write_text("from the older export")
    save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export" / "stale.txt").exists() and atomic.export_finished(tmp_path / "export")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    save_pretrained(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not an export"
    assert atomic.export_finished(tmp_path / "mine") and load_model(tmp_path / "mine") is not None


_HAS_DATA_MODULES = all(importlib.util.find_spec(f"vlm_jax.data.{name}") is not None
                        for name in ("tokenizer", "preprocess"))


@pytest.mark.skipif(not _HAS_DATA_MODULES, reason="vlm_jax.data tokenizer/preprocess not available")
def test_load_pretrained_returns_default_preprocess_and_no_tokenizer_without_files(reference_dirs):
    for name, kind_resize in (("clip_first_eos", "shortest"), ("siglip", "squash")):
        directory, reference = reference_dirs[name]
        loaded = load_pretrained(directory)
        assert loaded.tokenizer is None
        assert loaded.preprocess.image_size == reference.config.vision_config.image_size
        assert loaded.preprocess.resize == kind_resize
        assert loaded.config == loaded.model.config


@pytest.mark.skipif(not _HAS_DATA_MODULES, reason="vlm_jax.data tokenizer/preprocess not available")
def test_tokenizer_and_preprocess_round_trip_through_save_pretrained(reference_dirs, tmp_path):
    import tokenizers

    from vlm_jax.data.preprocess import PreprocessSpec
    from vlm_jax.data.tokenizer import Tokenizer

    directory, reference = reference_dirs["clip_first_eos"]
    model = load_model(directory)
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "a": 3, "cat": 4, "<eos>": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = Tokenizer.from_tokenizers(backend, context_length=TEXT_LENGTH, pad_token="<pad>",
                                          bos_token="<bos>", eos_token="<eos>")
    spec = PreprocessSpec(image_size=32, resize="shortest", crop=True, mean=(0.5, 0.4, 0.3),
                          std=(0.2, 0.25, 0.3), resample="bicubic")
    save_pretrained(model, tmp_path, tokenizer=tokenizer, preprocess=spec)
    loaded = load_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded.tokenizer(["a cat"]), tokenizer(["a cat"]))
    assert loaded.preprocess == spec
