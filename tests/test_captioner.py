"""The captioner (the embedded MLLM): teacher forcing against the key/value cache, greedy and beam decoding,
candidate scoring, the `EmbeddedMLLM` backend and its export, serving over HTTP, caption metrics, and the
trainer's `CaptionerMethod`.

Every model is tiny (32 px images, widths 16-32, context 32) with the Shapes World tokenizer (vocab 640); the
random one has its head's eos bias raised so that greedy answers end at different steps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlm_jax.data import shapes_world
from vlm_jax.data.preprocess import PreprocessSpec, preprocess_images
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import UserError
from vlm_jax.mllm.config import mllm_config, parse_mllm
from vlm_jax.mllm.embedded import EmbeddedMLLM, PromptCoder, load_captioner, save_captioner
from vlm_jax.mllm.http import OpenAIClient
from vlm_jax.mllm.serve import make_server
from vlm_jax.mllm.training import (CaptionerMethod, caption_eval_config, caption_metrics, caption_source_config,
                                   captioner_model_config)
from vlm_jax.models import captioner as captioner_lib
from vlm_jax.models.clip import CLIP, VisionConfig, tiny
from vlm_jax.train.metrics import read_metrics
from vlm_jax.train.trainer import train, trainer_config
from vlm_jax.weights import save_pretrained

VISION = VisionConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
CONTEXT = 32
EOS_BIAS = 2.6  # with nnx.Rngs(0), greedy answers to PREFIX_LENGTHS end at steps 0, 4, never, 2, 0 and 9
PREFIX_LENGTHS = (3, 7, 11, 16, 5, 9)
PROMPTS = ("Describe the image.", "What is this?", "a", "What shape is this?", "Name the object.")
MAX_TOKENS = 12


# -- jitted calls on (graphdef, state) --------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="graphdef")
def _context(graphdef, state, pixels):
    return nnx.merge(graphdef, state).image_context(pixels)


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(graphdef, state, context, ids):
    return nnx.merge(graphdef, state).logits(context, ids)


@functools.partial(jax.jit, static_argnames="graphdef")
def _start_cache(graphdef, state, context):
    return nnx.merge(graphdef, state).start_cache(context, context.shape[0])


@functools.partial(jax.jit, static_argnames="graphdef")
def _cached(graphdef, state, cache, ids, start):
    return nnx.merge(graphdef, state).cached_logits(cache, ids, start)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens"))
def _greedy(graphdef, state, context, prefix, lengths, max_tokens):
    return captioner_lib.greedy_decode(nnx.merge(graphdef, state), context, prefix, lengths, max_tokens, 3)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens", "beam_size"))
def _beam(graphdef, state, context, prefix, lengths, max_tokens, beam_size):
    return captioner_lib.beam_decode(nnx.merge(graphdef, state), context, prefix, lengths, max_tokens, beam_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def _score(graphdef, state, context, ids, mask, normalize):
    return captioner_lib.score_candidates(nnx.merge(graphdef, state), context, ids, mask, normalize)


# -- fixtures and references -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"))


def _config(tokenizer, **overrides) -> captioner_lib.CaptionerConfig:
    values = dict(vision=VISION, vocab_size=tokenizer.vocab_size, context_length=CONTEXT, width=32, depth=2, heads=2,
                  mlp_dim=64, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return captioner_lib.CaptionerConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def model(tokenizer) -> captioner_lib.Captioner:
    model = captioner_lib.Captioner(_config(tokenizer), rngs=nnx.Rngs(0))
    model.head.bias[...] = model.head.bias[...].at[model.config.eos_id].set(EOS_BIAS)
    return model


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


def _pixels(count: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(count, 32, 32, 3)), jnp.float32)


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8))


def _prefixes(config, lengths, width: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[bos] prompt [eos]` rows of the given lengths with random prompt tokens."""
    rng = np.random.default_rng(seed)
    prefix = np.full((len(lengths), width), config.pad_id, np.int32)
    for row, length in enumerate(lengths):
        prefix[row, :length] = [config.bos_id, *rng.integers(1, 600, length - 2), config.eos_id]
    return prefix, np.asarray(lengths, np.int32)


def _teacher_forced(split, context, prefixes: list[list[int]], answers: list[list[int]]) -> np.ndarray:
    """float32 [R, CONTEXT, vocab] log-probabilities of `prefix + answer` per row, from `logits`."""
    ids = np.zeros((len(prefixes), CONTEXT), np.int32)
    for row, (prefix, answer) in enumerate(zip(prefixes, answers)):
        ids[row, : len(prefix) + len(answer)] = [*prefix, *answer]
    return np.asarray(jax.nn.log_softmax(_logits(*split, context, jnp.asarray(ids)), axis=-1))


def _answer_log_probs(split, context, prefixes, answers) -> np.ndarray:
    """float64 [R]: the sum of log p(answer token | everything before) over each row's answer."""
    log_probs = _teacher_forced(split, context, prefixes, answers)
    return np.asarray([sum(float(log_probs[row, len(prefix) - 1 + t, token]) for t, token in enumerate(answer))
                       for row, (prefix, answer) in enumerate(zip(prefixes, answers))])


def _until_eos(tokens, eos_id: int) -> list[int]:
    """Generated tokens up to and including the first eos."""
    tokens = [int(token) for token in tokens]
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def _reference_greedy(split, context, prefix, lengths, max_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding by recomputing the whole sequence with `logits` at every step (no cache)."""
    config = nnx.merge(*split).config
    rows = [list(prefix[row, :length]) for row, length in enumerate(lengths)]
    generated = [[] for _ in rows]
    tokens = np.full((len(rows), max_tokens), config.pad_id, np.int32)
    chosen = np.zeros((len(rows), max_tokens), np.float32)
    for step in range(max_tokens):
        log_probs = _teacher_forced(split, context, rows, generated)
        for row, prefix_row in enumerate(rows):
            if generated[row] and generated[row][-1] == config.eos_id:
                continue
            position = len(prefix_row) + len(generated[row]) - 1
            token = int(np.argmax(log_probs[row, position]))
            tokens[row, step], chosen[row, step] = token, log_probs[row, position, token]
            generated[row].append(token)
    return tokens, chosen


# -- layout -------------------------------------------------------------------------------------------


def test_sequence_ids_layout_and_loss_mask():
    ids, mask, prefix = captioner_lib.sequence_ids([5, 6], [7, 8, 9], bos_id=3, eos_id=4, pad_id=0, length=10)
    np.testing.assert_array_equal(ids, [3, 5, 6, 4, 7, 8, 9, 4, 0, 0])
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    assert (ids.dtype, mask.dtype, prefix) == (np.int32, np.float32, 4)
    ids, mask, prefix = captioner_lib.sequence_ids([5, 6], None, bos_id=3, eos_id=4, pad_id=2, length=6)
    np.testing.assert_array_equal(ids, [3, 5, 6, 4, 2, 2])
    np.testing.assert_array_equal(mask, np.zeros(6))
    assert prefix == 4
    ids, mask, _ = captioner_lib.sequence_ids([], [], bos_id=3, eos_id=4, pad_id=0, length=3)
    np.testing.assert_array_equal(ids, [3, 4, 4])
    np.testing.assert_array_equal(mask, [0, 1, 0])
    with pytest.raises(ValueError, match="take 8 tokens, more than the captioner's context_length 7"):
        captioner_lib.sequence_ids([5, 6], [7, 8, 9], bos_id=3, eos_id=4, pad_id=0, length=7)


# -- teacher forcing vs the cache -------------------------------------------------------------------


def test_teacher_forced_logits_equal_the_cache_fed_in_chunks(split):
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 600, size=(3, 20)), jnp.int32)
    context = _context(*split, _pixels(3))
    full = np.asarray(_logits(*split, context, ids))
    cache = _start_cache(*split, context)
    chunk, cache = _cached(*split, cache, ids[:, :6], jnp.zeros(3, jnp.int32))
    pieces = [chunk]
    for position in range(6, 20):
        step, cache = _cached(*split, cache, ids[:, position : position + 1], jnp.full(3, position, jnp.int32))
        pieces.append(step)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_score_candidates_is_the_sum_of_cached_step_by_step_log_probs(split, normalize):
    config = nnx.merge(*split).config
    rng = np.random.default_rng(3)
    prompt_lengths = (1, 4, 7)
    answer_lengths = ((2, 5), (0, 3), (4, 1))  # [B, C] answer tokens, the closing eos not counted
    prompts = [list(rng.integers(1, 600, n)) for n in prompt_lengths]
    answers = [[list(rng.integers(1, 600, n)) for n in row] for row in answer_lengths]
    length = 24
    rows = [[captioner_lib.sequence_ids(prompts[b], answers[b][c], bos_id=config.bos_id, eos_id=config.eos_id,
                                        pad_id=config.pad_id, length=length) for c in range(2)] for b in range(3)]
    ids = np.asarray([[rows[b][c][0] for b in range(3)] for c in range(2)])  # [C, B, L]
    mask = np.asarray([[rows[b][c][1] for b in range(3)] for c in range(2)])
    context = _context(*split, _pixels(3))
    scores = np.asarray(_score(*split, context, jnp.asarray(ids), jnp.asarray(mask), normalize))

    # The reference: every (row, candidate) sequence fed to the cache one token at a time.
    flat = jnp.asarray(ids.transpose(1, 0, 2).reshape(6, length))  # row-major: (b, c)
    cache = _start_cache(*split, jnp.repeat(context, 2, axis=0))
    steps = []
    for position in range(length):
        logits, cache = _cached(*split, cache, flat[:, position : position + 1], jnp.full(6, position, jnp.int32))
        steps.append(np.asarray(jax.nn.log_softmax(logits[:, 0], axis=-1)))
    expected = np.zeros((3, 2))
    for b, c in itertools.product(range(3), range(2)):
        start = len(prompts[b]) + 2  # [bos] prompt [eos]
        targets = [*answers[b][c], config.eos_id]
        total = sum(steps[start - 1 + t][2 * b + c, token] for t, token in enumerate(targets))
        expected[b, c] = total / len(targets) if normalize else total
    assert scores.shape == (3, 2)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


# -- decoding -----------------------------------------------------------------------------------------


def test_greedy_decode_equals_a_step_by_step_argmax_and_pads_after_eos(split):
    config = nnx.merge(*split).config
    prefix, lengths = _prefixes(config, PREFIX_LENGTHS)
    context = _context(*split, _pixels(len(lengths)))
    tokens, chosen, top_ids, top_values = (np.asarray(x) for x in _greedy(*split, context, prefix, lengths, 10))
    expected_tokens, expected_chosen = _reference_greedy(split, context, prefix, lengths, 10)
    ends = [list(row).index(config.eos_id) if config.eos_id in row else -1 for row in expected_tokens]
    assert ends == [0, 4, -1, 2, 0, 9]  # the fixture's eos bias ends answers at different steps
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(chosen, expected_chosen, atol=1e-4, rtol=0)
    for row, end in enumerate(ends):
        if end >= 0:
            assert (tokens[row, end + 1 :] == config.pad_id).all() and (chosen[row, end + 1 :] == 0).all()
    assert top_ids.shape == top_values.shape == (6, 10, 3)
    live = np.asarray([[end < 0 or t <= end for t in range(10)] for end in ends])
    np.testing.assert_array_equal(top_ids[..., 0][live], tokens[live])
    np.testing.assert_allclose(top_values[..., 0][live], chosen[live], atol=1e-6, rtol=0)
    assert (np.diff(top_values, axis=-1) <= 0).all()


def test_beam_size_one_is_greedy_and_four_beams_score_at_least_greedy(split):
    config = nnx.merge(*split).config
    prefix, lengths = _prefixes(config, PREFIX_LENGTHS)
    context = _context(*split, _pixels(len(lengths)))
    greedy = np.asarray(_greedy(*split, context, prefix, lengths, 10)[0])
    np.testing.assert_array_equal(np.asarray(_beam(*split, context, prefix, lengths, 10, 1)), greedy)
    beam = np.asarray(_beam(*split, context, prefix, lengths, 10, 4))
    prefixes = [list(prefix[row, :length]) for row, length in enumerate(lengths)]

    def total(tokens):
        return _answer_log_probs(split, context, prefixes, [_until_eos(row, config.eos_id) for row in tokens])

    beam_total, greedy_total = total(beam), total(greedy)
    assert (beam_total >= greedy_total - 1e-5).all(), (beam_total, greedy_total)
    assert (beam_total > greedy_total + 1e-3).any()  # the search finds something greedy does not
    for row in beam:  # after the first eos, only pad
        end = _until_eos(row, config.eos_id)
        assert (row[len(end) :] == config.pad_id).all()


def test_beam_search_wide_enough_finds_the_best_answer_by_exhaustive_search(tokenizer):
    """Vocab 6, 3 tokens: 36 beams keep every 2-token prefix, so the search is exact."""
    config = _config(tokenizer, vocab_size=6, bos_id=2, eos_id=1, pad_id=0)
    split = nnx.split(captioner_lib.Captioner(config, rngs=nnx.Rngs(5)))
    prefix = np.asarray([[2, 3, 4, 1, 0, 0], [2, 5, 1, 0, 0, 0]], np.int32)
    lengths = np.asarray([4, 3], np.int32)
    context = _context(*split, _pixels(2, seed=4))
    found = np.asarray(_beam(*split, context, prefix, lengths, 3, 36))
    candidates = sorted({tuple(_until_eos(tokens, 1)) for tokens in itertools.product(range(6), repeat=3)})
    for row in range(2):
        rows = [list(prefix[row, : lengths[row]])] * len(candidates)
        totals = _answer_log_probs(split, jnp.repeat(context[row : row + 1], len(candidates), axis=0), rows,
                                   [list(c) for c in candidates])
        best = candidates[int(np.argmax(totals))]
        assert _until_eos(found[row], 1) == list(best)
        assert (found[row, len(best) :] == 0).all()


# -- the embedded backend -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(model, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("captioner") / "export"
    save_captioner(model, directory, tokenizer, PreprocessSpec.clip(32))
    return directory


@pytest.fixture(scope="module")
def loaded(export_dir) -> EmbeddedMLLM:
    return EmbeddedMLLM.load(export_dir, batch_size=4)


def _names(count: int) -> list[str]:
    return list(shapes_world.class_names()[:count])


def test_export_round_trip_gives_identical_outputs(model, tokenizer, loaded):
    images, prompts = _images(5), list(PROMPTS)
    candidates = [_names(3)] * 5
    in_memory = EmbeddedMLLM(model, tokenizer, PreprocessSpec.clip(32), batch_size=4)
    assert loaded.config == model.config
    assert loaded.generate(images, prompts, MAX_TOKENS) == in_memory.generate(images, prompts, MAX_TOKENS)
    np.testing.assert_array_equal(loaded.score(images, prompts, candidates), in_memory.score(images, prompts,
                                                                                             candidates))


def test_generate_is_the_decoded_greedy_answer_whatever_the_batch(split, loaded):
    images, prompts = _images(5), list(PROMPTS)
    texts = loaded.generate(images, prompts, MAX_TOKENS)
    assert all(isinstance(text, str) for text in texts) and len(texts) == 5
    coder = PromptCoder(loaded.coder.tokenizer, CONTEXT)
    rows = [coder.sequence(prompt, None) for prompt in prompts]
    prefix = np.stack([ids[:16] for ids, _, _ in rows])
    lengths = np.asarray([length for _, _, length in rows], np.int32)
    context = _context(*split, jnp.asarray(preprocess_images(images, PreprocessSpec.clip(32))))
    tokens, chosen = _reference_greedy(split, context, prefix, lengths, MAX_TOKENS)
    assert texts == [coder.decode(row) for row in tokens]
    assert len({text for text in texts if text}) == 3  # three answers differ; two end at once (eos first)
    assert [loaded.generate([image], [prompt], MAX_TOKENS)[0] for image, prompt in zip(images, prompts)] == texts

    results = loaded.generate_tokens(images, prompts, MAX_TOKENS, top_logprobs=2)
    assert [text for text, _ in results] == texts
    for row, (_, steps) in enumerate(results):
        answer = [token for token in _until_eos(tokens[row], coder.ids["eos_id"]) if token != coder.ids["eos_id"]]
        assert [token for token, _, _ in steps] == [coder.token_text(token) for token in answer]
        np.testing.assert_allclose([logprob for _, logprob, _ in steps], chosen[row, : len(answer)], atol=1e-4)
        for token, logprob, alternatives in steps:
            assert len(alternatives) == 2 and alternatives[0] == (token, logprob) and alternatives[1][1] <= logprob


def test_score_is_the_answer_log_likelihood_whatever_the_batch(split, loaded):
    images, prompts = _images(5), list(PROMPTS)
    candidates = [_names(3)] * 5
    scores = loaded.score(images, prompts, candidates)
    assert scores.shape == (5, 3) and scores.dtype == np.float32
    alone = np.concatenate([loaded.score([image], [prompt], [row])
                            for image, prompt, row in zip(images, prompts, candidates)])
    np.testing.assert_allclose(alone, scores, atol=1e-5, rtol=0)
    coder = loaded.coder
    context = _context(*split, jnp.asarray(preprocess_images(images, PreprocessSpec.clip(32))))
    prefixes = [[coder.ids["bos_id"], *coder.encode(prompt), coder.ids["eos_id"]] for prompt in prompts]
    normalized = loaded.score(images, prompts, candidates, normalize=True)
    for c, name in enumerate(_names(3)):
        answer = [*coder.encode(name), coder.ids["eos_id"]]
        expected = _answer_log_probs(split, context, prefixes, [answer] * 5)
        np.testing.assert_allclose(scores[:, c], expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(normalized[:, c], expected / len(answer), atol=1e-4, rtol=0)


def test_load_captioner_refuses_a_directory_that_is_not_an_export(export_dir, tmp_path):
    for name in ("captioner.safetensors", "captioner.json", "tokenizer.json"):
        broken = tmp_path / name
        broken.mkdir()
        for path in export_dir.iterdir():
            if path.name != name:
                (broken / path.name).write_bytes(path.read_bytes())
        with pytest.raises(UserError, match=f"{broken} has no {name}; expected a captioner export"):
            load_captioner(broken)
    mismatched = tmp_path / "captioner.safetensors"  # everything but the weights: add a config of another depth
    config = json.loads((export_dir / "captioner.json").read_text())
    (mismatched / "captioner.json").write_text(json.dumps({**config, "depth": 1}))
    (mismatched / "captioner.safetensors").write_bytes((export_dir / "captioner.safetensors").read_bytes())
    with pytest.raises(UserError, match="does not match captioner.json: parameter layers/1/"):
        load_captioner(mismatched)


@pytest.mark.slow
def test_an_overfit_captioner_scores_and_generates_its_answers(tokenizer):
    """Two images, each trained to answer its own Shapes World name."""
    model = captioner_lib.Captioner(_config(tokenizer), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    preprocess = PreprocessSpec.clip(32)
    images, prompts, answers = _images(2, seed=7), ["What is this?"] * 2, [_names(3)[0], _names(3)[2]]
    coder = PromptCoder(tokenizer, CONTEXT)
    rows = [coder.sequence(prompt, answer) for prompt, answer in zip(prompts, answers)]
    pixels = jnp.asarray(preprocess_images(images, preprocess))
    ids, mask = jnp.asarray(np.stack([r[0] for r in rows])), jnp.asarray(np.stack([r[1] for r in rows]))
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(state, opt_state):
        loss, grads = jax.value_and_grad(
            lambda s: captioner_lib.caption_loss(nnx.merge(graphdef, s), pixels, ids, mask)[0])(state)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = optimizer.init(state)
    losses = []
    for _ in range(40):
        state, opt_state, loss = step(state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.05 < losses[0]
    nnx.update(model, state)
    mllm = EmbeddedMLLM(model, tokenizer, preprocess, batch_size=4)

    scores = mllm.score(images, prompts, [_names(3)] * 2)
    np.testing.assert_array_equal(np.argmax(scores, axis=1), [0, 2])
    assert mllm.generate(images, prompts, MAX_TOKENS) == answers
    results = mllm.generate_tokens(images, prompts, MAX_TOKENS, top_logprobs=2)
    context = _context(graphdef, state, pixels)
    for row, (text, steps) in enumerate(results):
        assert text == answers[row] == "".join(token for token, _, _ in steps)
        assert len(steps) == len(coder.encode(answers[row]))
        for token, logprob, alternatives in steps:
            assert len(alternatives) == 2 and alternatives[0] == (token, logprob) and alternatives[1][1] <= logprob
        prefix = [coder.ids["bos_id"], *coder.encode(prompts[row]), coder.ids["eos_id"]]
        answer = coder.encode(answers[row])
        eos = _teacher_forced((graphdef, state), context[row : row + 1], [prefix], [answer])[
            0, len(prefix) + len(answer) - 1, coder.ids["eos_id"]]
        assert sum(logprob for _, logprob, _ in steps) == pytest.approx(scores[row, 2 * row] - eos, abs=1e-4)


# -- serving ----------------------------------------------------------------------------------------------


def test_the_openai_client_through_make_server_gives_the_in_process_answers(loaded):
    images, prompts = _images(5, seed=8), list(PROMPTS)
    server = make_server(loaded)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        client = OpenAIClient(parse_mllm(mllm_config(
            backend="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", image_format="png",
            max_side=32, concurrency=4, max_retries=0)))
        texts = client.generate(images, prompts, MAX_TOKENS)
    finally:
        server.shutdown()
        server.server_close()
    assert texts == loaded.generate(images, prompts, MAX_TOKENS)
    assert sum(server.batcher.batch_sizes) == 5 and max(server.batcher.batch_sizes) <= 4
    assert client.counts == {"requests": 5}


# -- caption metrics --------------------------------------------------------------------------------------


def test_caption_metrics_on_hand_written_dense_captions():
    truths = [
        "a large striped red star to the left of a small solid blue circle",
        "a small solid green square",
        "a large dotted yellow hexagon above a small checkered white ring, which is below a large solid black cross",
        "a small striped purple diamond to the right of a large solid orange triangle",
    ]
    texts = [
        truths[0],  # exact
        "a large solid green square",  # one object, the size wrong
        "not a dense caption",  # unparsed: no objects found
        "a small striped purple diamond",  # the first object only, right
    ]
    metrics = caption_metrics(texts, truths, shapes_world.parse_dense_caption)
    # 8 true objects: 2 + 1 + 3 + 2; found in place: 2 (all right) + 1 (size wrong) + 0 + 1 (all right).
    assert metrics == {"exact_match": 0.25, "objects": 0.5, "unparsed": 0.25, "size_accuracy": 3 / 8,
                       "pattern_accuracy": 4 / 8, "colour_accuracy": 4 / 8, "shape_accuracy": 4 / 8}
    assert shapes_world.parse_dense_caption(truths[2]) == (
        [("large", "dotted", "yellow", "hexagon"), ("small", "checkered", "white", "ring"),
         ("large", "solid", "black", "cross")], ["above", "below"])


# -- the trainer's method ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_captioner_method_trains_on_shapes_world_and_exports_a_loadable_backend(tokenizer, tmp_path):
    clip_config = tiny()
    clip_config = clip_config.replace(
        vision=dataclasses.replace(clip_config.vision, depth=1),
        text=dataclasses.replace(clip_config.text, depth=1, vocab_size=tokenizer.vocab_size,
                                 context_length=tokenizer.context_length, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id))
    clip = CLIP(clip_config, rngs=nnx.Rngs(0))
    save_pretrained(clip, tmp_path / "clip", tokenizer=tokenizer, preprocess=PreprocessSpec.clip(32))

    config = trainer_config()
    config.method = "captioner"
    config.clip_dir = str(tmp_path / "clip")
    config.init_vision = True
    config.init_from = ""
    config.model = captioner_model_config()
    config.model.update(context_length=64, width=32, depth=1, heads=2, mlp_dim=64)  # dense captions: <= 50 tokens
    seed, names = caption_source_config(), caption_source_config()
    seed.update(tfds_name="shapes_world/test", split="caption_seed", prompt="Describe the image.",
                answer="dense_caption", limit=16)
    names.update(tfds_name="shapes_world/test", split="memory", prompt="What is this?", answer="entity_name",
                 limit=32)
    config.captions = {"caption_seed": seed, "names": names}
    config.caption_eval = caption_eval_config()
    config.caption_eval.update(tfds_name="shapes_world/test", split="eval_retrieval", limit=8, max_tokens=16)
    config.global_batch_size = 8
    config.total_steps = 20
    config.log_every = 1
    config.progress = False
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 1
    config.checkpoint.save_interval_steps = 100

    method = CaptionerMethod()
    method.check_config(config)
    initial = method.create_model(config, nnx.Rngs(0))
    for (path, mine), (_, clips) in zip(nnx.to_flat_state(nnx.state(initial.vision_model, nnx.Param)),
                                        nnx.to_flat_state(nnx.state(clip.vision_model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(mine.get_value(), clips.get_value(), err_msg=str(path))

    results = train(config, tmp_path / "run", CaptionerMethod())
    losses = [record["train/loss"] for record in read_metrics(tmp_path / "run") if "train/loss" in record]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert {f"captions/{name}" for name in ("exact_match", "objects", "unparsed", "size_accuracy", "pattern_accuracy",
                                            "colour_accuracy", "shape_accuracy")} <= set(results)

    mllm = EmbeddedMLLM.load(tmp_path / "run" / "export", batch_size=4)
    assert mllm.config.vision == clip_config.vision and mllm.config.vocab_size == tokenizer.vocab_size
    assert all(isinstance(text, str) for text in mllm.generate(_images(2), ["What is this?"] * 2, 8))
