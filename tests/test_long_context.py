"""Long text context (Long-CLIP's position stretch) and a text tower trained in its last N blocks only.

A random-init tiny CLIP with 77 text positions is saved as a Hugging Face directory; loading it at
248 positions must keep the text embeddings of texts of at most 20 tokens, change those of longer
texts, save and reload at 248 without a second stretch, and agree with transformers' CLIPModel on
the saved directory. `text_trainable_layers` must freeze exactly the text embeddings and the early
blocks, on top of the user's own optim.trainable rules, in the optimizer's table and in a real step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from vlm_jax.config_lib import ConfigError
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.methods.clip import ClipMethod, text_trainable_rules
from vlm_jax.models.clip import CLIP, tiny
from vlm_jax.train import optim, sharding, trainer
from vlm_jax.weights import load_model, load_pretrained, save_pretrained, stretch_positions, stretched_length

REPO = Path(__file__).resolve().parents[1]
STORED, STRETCHED = 77, 248
BOS, EOS, PAD, UNK = 998, 999, 0, 997


def long_clip_reference(positional_embedding_pre: np.ndarray) -> np.ndarray:
    """Long-CLIP's load_from_clip loop (model/longclip.py), transcribed to numpy float32."""
    length, dim = positional_embedding_pre.shape
    keep_len = 20
    new = np.zeros([4 * length - 3 * keep_len, dim], dtype=np.float32)
    old = positional_embedding_pre.astype(np.float32)
    for i in range(keep_len):
        new[i] = old[i]
    for i in range(length - 1 - keep_len):
        new[4 * i + keep_len] = old[i + keep_len]
        new[4 * i + 1 + keep_len] = 3 * old[i + keep_len] / 4 + 1 * old[i + 1 + keep_len] / 4
        new[4 * i + 2 + keep_len] = 2 * old[i + keep_len] / 4 + 2 * old[i + 1 + keep_len] / 4
        new[4 * i + 3 + keep_len] = 1 * old[i + keep_len] / 4 + 3 * old[i + 1 + keep_len] / 4
    for j in range(4):
        new[4 * length - 3 * keep_len - 4 + j] = old[length - 1] + j * (old[length - 1] - old[length - 2]) / 4
    return new


def _tokenizer(context_length: int) -> Tokenizer:
    """Words w1..w996 are ids 1..996; <pad> 0, <unk> 997, <bos> 998, <eos> 999 (tiny()'s ids)."""
    vocab = {"<pad>": PAD, **{f"w{i}": i for i in range(1, UNK)}, "<unk>": UNK, "<bos>": BOS, "<eos>": EOS}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer.from_tokenizers(backend, context_length=context_length, pad_token="<pad>", bos_token="<bos>",
                                     eos_token="<eos>", unk_token="<unk>")


def _texts(*word_counts: int) -> list[str]:
    """One text of n words per count (n + 2 tokens with bos and eos)."""
    rng = np.random.default_rng(sum(word_counts))
    return [" ".join(f"w{i}" for i in rng.integers(1, UNK, size=n)) for n in word_counts]


SHORT = _texts(1, 5, 18)  # 3, 7 and 20 tokens: within the 20 kept positions
# 22, 42 and 72 tokens. Position 20 is old[20] too (the first interpolated group starts on it), so
# a text of 21 tokens also keeps its embedding; 22 is the shortest that moves.
LONG = _texts(20, 40, 70)


def _model_config():
    base = tiny()
    return base.replace(text=dataclasses.replace(base.text, context_length=STORED, width=32, heads=4, mlp_dim=64))


@pytest.fixture(scope="module")
def clip77(tmp_path_factory) -> Path:
    """A random-init tiny CLIP (77 text positions, 2 text blocks) with its tokenizer, saved as a
    Hugging Face directory. Its position embedding is made large so a stretch visibly moves it."""
    model = CLIP(_model_config(), rngs=nnx.Rngs(0))
    positions = model.text_model.embeddings.position_embedding.embedding
    positions.value = jnp.asarray(np.random.default_rng(1).normal(size=positions.shape) * 0.5, jnp.float32)
    directory = tmp_path_factory.mktemp("clip77")
    save_pretrained(model, directory, tokenizer=_tokenizer(STORED))
    return directory


@pytest.fixture(scope="module")
def stretched(clip77, tmp_path_factory) -> tuple:
    """(the 248-position load of clip77, the directory save_pretrained writes it to)."""
    loaded = load_pretrained(clip77, text_context_length=STRETCHED)
    directory = tmp_path_factory.mktemp("clip248")
    save_pretrained(loaded.model, directory, tokenizer=loaded.tokenizer)
    return loaded, directory


def _text_features(pretrained, texts) -> np.ndarray:
    return np.asarray(pretrained.model.encode_text(jnp.asarray(pretrained.tokenizer(texts))))


def _positions(model) -> np.ndarray:
    return np.asarray(model.text_model.embeddings.position_embedding.embedding[...])


# -- the stretch --------------------------------------------------------------------------------


@pytest.mark.parametrize("length, expected", [(77, 248), (32, 68)])
def test_stretch_positions_is_long_clips_loop(length, expected):
    embedding = np.random.default_rng(length).normal(size=(length, 16)).astype(np.float32)
    ours = stretch_positions(embedding)
    assert ours.shape == (expected, 16) and ours.dtype == np.float32 and stretched_length(length) == expected
    np.testing.assert_allclose(ours, long_clip_reference(embedding), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours[:20], embedding[:20])


def test_stretch_generalises_the_factor_and_refuses_what_has_nothing_to_stretch():
    embedding = np.random.default_rng(0).normal(size=(30, 4))
    np.testing.assert_array_equal(stretch_positions(embedding, factor=1), embedding)
    twice = stretch_positions(embedding, factor=2)
    assert twice.shape == (20 + 2 * 10, 4) == (stretched_length(30, factor=2), 4)
    np.testing.assert_allclose(twice[20 + 2 * 3 + 1], (embedding[23] + embedding[24]) / 2)
    np.testing.assert_allclose(twice[-1], embedding[-1] + (embedding[-1] - embedding[-2]) / 2)
    for rows in (20, 5):
        with pytest.raises(ValueError, match="nothing to stretch"):
            stretch_positions(np.zeros((rows, 4)))
        with pytest.raises(ValueError, match="nothing to stretch"):
            stretched_length(rows)


# -- loading at a longer context -----------------------------------------------------------------


def test_clip_loads_at_248_positions_with_the_same_short_text_embeddings(clip77, stretched):
    original, (loaded, _) = load_pretrained(clip77), stretched
    assert loaded.model.config.text.context_length == STRETCHED == loaded.config.text.context_length
    assert _positions(loaded.model).shape == (STRETCHED, 32)
    np.testing.assert_allclose(_positions(loaded.model), stretch_positions(_positions(original.model)), atol=0)
    assert loaded.tokenizer.context_length == STRETCHED and loaded.tokenizer(SHORT).shape == (3, STRETCHED)
    assert original.tokenizer(SHORT).shape == (3, STORED)

    np.testing.assert_allclose(_text_features(loaded, SHORT), _text_features(original, SHORT), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_positions(loaded.model)[:21], _positions(original.model)[:21])
    # Past the 20 kept positions the stretch is live: every longer text moves.
    differences = np.abs(_text_features(loaded, LONG) - _text_features(original, LONG)).max(axis=-1)
    assert (differences > 1e-3).all(), differences
    # The image tower is untouched.
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded.model.encode_image(pixels)),
                                  np.asarray(original.model.encode_image(pixels)))


def test_stretched_model_saves_and_reloads_at_248_without_a_second_stretch(stretched):
    loaded, directory = stretched
    stored = json.loads((directory / "config.json").read_text())
    assert stored["text_config"]["max_position_embeddings"] == STRETCHED
    for reloaded in (load_pretrained(directory), load_pretrained(directory, text_context_length=STRETCHED)):
        assert reloaded.model.config.text.context_length == STRETCHED
        assert reloaded.tokenizer.context_length == STRETCHED
        np.testing.assert_array_equal(_positions(reloaded.model), _positions(loaded.model))
        texts = SHORT + LONG
        np.testing.assert_allclose(_text_features(reloaded, texts), _text_features(loaded, texts), rtol=0, atol=1e-6)


def test_transformers_reads_the_stretched_directory_and_agrees(stretched):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    loaded, directory = stretched
    reference = transformers.CLIPModel.from_pretrained(directory).eval()
    assert reference.config.text_config.max_position_embeddings == STRETCHED
    ids = loaded.tokenizer(SHORT + LONG)
    with torch.no_grad():
        theirs = reference.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    np.testing.assert_allclose(np.asarray(loaded.model.encode_text(jnp.asarray(ids))), theirs, rtol=1e-4, atol=1e-4)


def test_a_context_that_is_no_stretch_of_the_stored_one_is_a_one_line_error(clip77):
    with pytest.raises(UserError) as error:
        load_model(clip77, text_context_length=50)
    message = str(error.value)
    assert "\n" not in message and "text_context_length=50" in message and "77" in message and "shorter" in message
    with pytest.raises(UserError) as error:
        load_model(clip77, text_context_length=200)
    message = str(error.value)
    assert "\n" not in message and "200" in message and "77" in message and "20 + k*57" in message
    assert "248" in message
    assert load_model(clip77, text_context_length=STORED).config.text.context_length == STORED


# -- ClipMethod ------------------------------------------------------------------------------------


def _experiment_config(**fields):
    """experiments/clip.py's Shapes World smoke config (nothing to build for check_config), with
    `fields` set ("optim.trainable" style keys reach into sections)."""
    spec = importlib.util.spec_from_file_location("experiments_clip", REPO / "experiments" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("shapes,smoke=True")
    config.text_context_length = 0
    config.text_trainable_layers = -1
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def _check_error(config) -> str:
    with pytest.raises(ConfigError) as error:
        ClipMethod().check_config(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_method_config_errors_are_one_line(clip77):
    message = _check_error(_experiment_config(clip_dir=str(clip77), text_context_length=50))
    assert "text_context_length=50" in message and "77" in message
    message = _check_error(_experiment_config(clip_dir=str(clip77), text_context_length=100))
    assert "20 + k*57" in message
    assert _check_error(_experiment_config(text_trainable_layers=1)).startswith(
        "clip_dir is not set, but text_trainable_layers=1 freezes")
    message = _check_error(_experiment_config(clip_dir=str(clip77), text_trainable_layers=3))
    assert message.startswith("text_trainable_layers=3 exceeds the 2 blocks of the text tower of clip_dir")
    assert _check_error(_experiment_config(clip_dir=str(clip77), text_trainable_layers=-2)).startswith(
        "text_trainable_layers=-2;")
    # The defaults change nothing: no rule is added and the config passes as before.
    config = _experiment_config()
    before = config.optim.trainable
    ClipMethod().check_config(config)
    assert config.optim.trainable == before == ((".*", True),)


def test_method_text_context_length_sets_the_tokenizer_and_the_model(clip77):
    config = _experiment_config(clip_dir=str(clip77), text_context_length=STRETCHED)
    method = ClipMethod()
    method.check_config(config)
    assert method.tokenizer(config).context_length == STRETCHED
    model = method.create_model(config, nnx.Rngs(0))
    assert model.config.text.context_length == STRETCHED and _positions(model).shape[0] == STRETCHED
    scratch = _experiment_config(text_context_length=24)
    assert ClipMethod(tokenizer=_tokenizer(24)).model_config(scratch).text.context_length == 24
    default = _experiment_config()  # 0: the model's own
    assert ClipMethod(tokenizer=_tokenizer(16)).model_config(default).text.context_length == default.model.text.context_length


def _table(config, method) -> dict[str, str]:
    model = nnx.eval_shape(lambda: CLIP(_model_config(), rngs=nnx.Rngs(0)))
    _, table = optim.make_optimizer(dict(config.optim), nnx.state(model, nnx.Param))
    return {name: entry["label"] for name, entry in table.items()}


def test_text_trainable_layers_freezes_the_embeddings_and_early_blocks_on_top_of_the_users_rules(clip77):
    assert text_trainable_rules(2, -1) == ()
    assert text_trainable_rules(2, 2) == ((r"^text_model/embeddings/", False),)
    config = _experiment_config(clip_dir=str(clip77), text_trainable_layers=1)
    method = ClipMethod()
    method.check_config(config)
    assert config.optim.trainable == (*text_trainable_rules(2, 1), (".*", True))
    method.check_config(config)  # idempotent
    assert config.optim.trainable == (*text_trainable_rules(2, 1), (".*", True)) == method.trainable_policy(config)
    labels = _table(config, method)
    frozen = sorted(name for name, label in labels.items() if label == optim.FROZEN)
    assert frozen and all(name.startswith(("text_model/embeddings/", "text_model/encoder/layers/0/")) for name in frozen)
    assert {"text_model/embeddings/token_embedding/embedding",
            "text_model/embeddings/position_embedding/embedding"} <= set(frozen)
    assert len([n for n in frozen if n.startswith("text_model/encoder/layers/0/")]) == len(
        [n for n in labels if n.startswith("text_model/encoder/layers/1/")])
    for name in ("text_model/encoder/layers/1/mlp/fc1/kernel", "text_model/final_layer_norm/scale",
                 "text_projection/kernel", "vision_model/encoder/layers/0/mlp/fc1/kernel", "logit_scale"):
        assert labels[name] == optim.TRAINABLE, name
    assert all(label == optim.TRAINABLE for name, label in labels.items() if not name.startswith("text_model/")
               or name.startswith(("text_model/encoder/layers/1/", "text_model/final_layer_norm/")))

    # A user's own rules still decide every param the generated rules do not freeze (LiT-style).
    lit = _experiment_config(clip_dir=str(clip77), text_trainable_layers=0,
                             **{"optim.trainable": ((r"^vision_model/", False), (r"^visual_projection/", False),
                                                    (r".*", True))})
    ClipMethod().check_config(lit)
    labels = _table(lit, method)
    trains = sorted(name for name, label in labels.items() if label == optim.TRAINABLE)
    assert trains == ["logit_scale", "text_model/final_layer_norm/bias", "text_model/final_layer_norm/scale",
                      "text_projection/kernel"]

    # Without check_config the trainer still asks the method for its policy: the same rules.
    unchecked = _experiment_config(clip_dir=str(clip77), text_trainable_layers=1)
    assert ClipMethod().trainable_policy(unchecked) == config.optim.trainable


def test_one_train_step_changes_only_the_trainable_params(clip77):
    config = _experiment_config(clip_dir=str(clip77), text_trainable_layers=1, **{"optim.warmup_steps": 0,
                                                                                   "optim.learning_rate": 1e-2})
    method = ClipMethod()  # no check_config: build_training takes the method's trainable_policy
    setup = trainer.build_training(config, method)
    before = {name: np.asarray(entry) for name, entry in _named_leaves(setup.state["params"]).items()}
    frozen_before = {name: np.asarray(entry) for name, entry in
                     _named_leaves(nnx.state(setup.frozen, nnx.Param)).items()}
    tokenizer = method.tokenizer(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "text_ids": tokenizer(_texts(*range(2, 34, 4)))}
    state, metrics = setup.train_step(setup.state, setup.frozen,
                                      sharding.shard_batch(batch, setup.mesh, setup.batch_axes), setup.constants)
    assert np.isfinite(float(metrics["loss"]))
    after = {name: np.asarray(entry) for name, entry in _named_leaves(state["params"]).items()}
    frozen_after = {name: np.asarray(entry) for name, entry in
                    _named_leaves(nnx.state(setup.frozen, nnx.Param)).items()}

    assert set(frozen_before) == {name for name in _table(config, method) if name.startswith(
        ("text_model/embeddings/", "text_model/encoder/layers/0/"))}
    stored = {"/".join(map(str, path)): np.asarray(value[...])
              for path, value in nnx.to_flat_state(nnx.state(load_model(clip77), nnx.Param))}
    for name, value in frozen_after.items():
        np.testing.assert_array_equal(value, frozen_before[name])
        np.testing.assert_array_equal(value, stored[name])
    changed = [name for name in after if not np.array_equal(after[name], before[name])]
    # Every trainable matrix moves (biases of a fresh LayerNorm may too); nothing frozen is in the state.
    kernels = [name for name in after if name.endswith(("kernel", "embedding"))]
    assert set(kernels) <= set(changed), sorted(set(kernels) - set(changed))
    assert "text_model/encoder/layers/1/self_attn/q_proj/kernel" in changed and "text_projection/kernel" in changed
    assert not any(name.startswith("text_model/embeddings/") for name in after)


def _named_leaves(state) -> dict[str, jax.Array]:
    return {"/".join(map(str, path)): value[...] for path, value in nnx.to_flat_state(state)}
