"""A small image-conditioned language model (CapPa / LocCa style): the embedded MLLM.

    tokens = vision_model(pixels)                    ViT tokens (the CLIP image tower's layout)
    context = LayerNorm(Dense(tokens))               [B, N, width]
    hidden = decoder(ids, context)                   causal self-attention + cross-attention blocks
    logits = head(final_norm(hidden))                [B, L, vocab]

A sequence is `[bos] prompt [eos] answer [eos]` (`sequence_ids`); the loss covers the answer and
its closing eos. Decoding runs on a key/value cache (`layers.Block.cached`): the prompt in one
chunk, then one token per step, greedy or beam search, all inside jit. `score` teacher-forces
each candidate answer and sums its tokens' log-probabilities (closing eos included), mapping over
candidates with `jax.lax.map` so memory stays that of one candidate.

The vision tower has the CLIP image tower's parameter names, so it starts from a base CLIP's
(`init_vision_from`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models.clip import VisionConfig, VisionTransformer
from vlm_jax.models.layers import Block, Dense, Embedding, LayerNorm

NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    """vision: the image tower (`VisionConfig`). Decoder: width, depth, heads, mlp_dim, act, dropout;
    context_length: most tokens of prompt + answer; vocab_size and the tokenizer's bos/eos/pad ids."""

    vision: VisionConfig = VisionConfig(image_size=64, patch_size=8, width=128, depth=3, heads=4, mlp_dim=256)
    vocab_size: int = 1024
    context_length: int = 160
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 512
    act: str = "gelu"
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    bos_id: int = 0
    eos_id: int = 1
    pad_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CaptionerConfig":
        values = dict(values)
        vision = values.pop("vision", {})
        return cls(vision=vision if isinstance(vision, VisionConfig) else VisionConfig(**vision), **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Captioner(nnx.Module):
    """Image tower, a context projection and a causal decoder with cross-attention."""

    def __init__(self, config: CaptionerConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        eps = config.layer_norm_eps
        self.vision_model = VisionTransformer(config.vision, remat=False, **kw)
        self.context_projection = Dense(config.vision.width, config.width, ("embed", "embed"), **kw)
        self.context_norm = LayerNorm(config.width, eps=eps, **kw)
        self.token_embedding = Embedding(config.vocab_size, config.width, ("vocab", "embed"),
                                         init=nnx.initializers.normal(0.02), **kw)
        self.position_embedding = Embedding(config.context_length, config.width, (None, "embed"),
                                            init=nnx.initializers.normal(0.01), **kw)
        self.layers = nnx.List([
            Block(config.width, config.heads, config.mlp_dim, config.act, eps=eps, dropout=config.dropout,
                  cross_attention=True, context_width=config.width, **kw) for _ in range(config.depth)])
        self.final_norm = LayerNorm(config.width, eps=eps, **kw)
        self.head = Dense(config.width, config.vocab_size, ("embed", "vocab"), **kw)

    def image_context(self, pixels: jax.Array) -> jax.Array:
        """pixels float32 [B, H, W, 3] (normalized) -> context [B, N, width] (every ViT token)."""
        return self.context_norm(self.context_projection(self.vision_model.tokens(pixels)))

    def _embed(self, ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.token_embedding(ids) + self.position_embedding.embedding[...][positions].astype(
            jnp.dtype(self.config.dtype))

    def logits(self, context: jax.Array, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Teacher forcing: context [B, N, width], ids int32 [B, L] -> float32 logits [B, L, vocab]
        (position t predicts token t + 1)."""
        hidden = self._embed(ids, jnp.arange(ids.shape[1]))
        rngs = jax.random.split(rng, len(self.layers)) if rng is not None else [None] * len(self.layers)
        for layer, layer_rng in zip(self.layers, rngs):
            hidden = layer(hidden, is_causal=True, context=context, rng=layer_rng)
        return self.head(self.final_norm(hidden)).astype(jnp.float32)

    def __call__(self, pixels: jax.Array, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        return self.logits(self.image_context(pixels), ids, rng)

    # -- cached decoding ----------------------------------------------------------------------------

    def start_cache(self, context: jax.Array, batch: int, length: int | None = None) -> dict[str, Any]:
        """An empty key/value cache of `length` positions (default context_length) for `batch` rows, and
        the context's projected keys/values. Decoding touches the whole cache every step: size it to
        the prompt plus the answer."""
        config = self.config
        length = min(config.context_length, length or config.context_length)
        shape = (batch, length, config.heads, config.width // config.heads)
        return {"self": [(jnp.zeros(shape, jnp.dtype(config.dtype)),) * 2 for _ in self.layers],
                "context": [layer.cross_attn.project_kv(context) for layer in self.layers]}

    def cached_logits(self, cache: dict[str, Any], ids: jax.Array, start: jax.Array) -> tuple[jax.Array, dict]:
        """T tokens ids [B, T] of each row at positions start [B] .. start + T - 1 -> (float32
        logits [B, T, vocab], the updated cache)."""
        hidden = self._embed(ids, start[:, None] + jnp.arange(ids.shape[1])[None, :])
        updated = []
        for layer, layer_cache, context_kv in zip(self.layers, cache["self"], cache["context"]):
            hidden, layer_cache = layer.cached(hidden, layer_cache, start, context_kv=context_kv)
            updated.append(layer_cache)
        return self.head(self.final_norm(hidden)).astype(jnp.float32), {**cache, "self": updated}


# -- sequences (host side) -------------------------------------------------------------------------


def sequence_ids(prompt: Sequence[int], answer: Sequence[int] | None, *, bos_id: int, eos_id: int,
                 pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`[bos] prompt [eos] answer [eos]` right-padded to `length`: (ids int32 [length], loss mask
    float32 [length] (1 where the next token is an answer token or the closing eos), prefix length).
    answer None: the prefix only. Raises ValueError when the sequence does not fit."""
    prefix = [bos_id, *prompt, eos_id]
    tokens = prefix + ([*answer, eos_id] if answer is not None else [])
    if len(tokens) > length:
        raise ValueError(f"prompt + answer take {len(tokens)} tokens, more than the captioner's context_length "
                         f"{length}; shorten the prompt or raise model.context_length.")
    ids = np.full(length, pad_id, np.int32)
    ids[: len(tokens)] = tokens
    mask = np.zeros(length, np.float32)
    if answer is not None:
        mask[len(prefix) - 1 : len(tokens) - 1] = 1.0
    return ids, mask, len(prefix)


def token_log_probs(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-row sum of log p(ids[t + 1] | ..t) over positions where mask [B, L] is 1 -> float32 [B]."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(chosen * mask[:, :-1], axis=-1)


def caption_loss(model: Captioner, pixels: jax.Array, ids: jax.Array, mask: jax.Array,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over answer tokens; metrics: loss, token accuracy."""
    logits = model(pixels, ids, rng)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets, weights = ids[:, 1:], mask[:, :-1]
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(weights.sum(), 1.0)
    loss = -(chosen * weights).sum() / count
    accuracy = ((jnp.argmax(log_probs, -1) == targets) * weights).sum() / count
    return loss, {"loss": loss, "token_accuracy": accuracy}


# -- inside jit: scoring and decoding --------------------------------------------------------------


def score_candidates(model: Captioner, context: jax.Array, ids: jax.Array, mask: jax.Array,
                     normalize: bool) -> jax.Array:
    """context [B, N, width]; ids, mask [C, B, L] (one teacher-forced sequence per candidate) ->
    float32 [B, C] summed (normalize: averaged) answer-token log-probabilities."""

    def one(args):
        candidate_ids, candidate_mask = args
        total = token_log_probs(model.logits(context, candidate_ids), candidate_ids, candidate_mask)
        return total / jnp.maximum(candidate_mask.sum(-1), 1.0) if normalize else total

    return jax.lax.map(one, (ids, mask)).T


def _prefill(model: Captioner, context: jax.Array, prefix: jax.Array, lengths: jax.Array, max_tokens: int):
    """Runs the prefixes [B, P] (right-padded, true lengths [B]) through a cache with room for
    `max_tokens` more; returns (the log-probabilities of the first answer token [B, vocab], the cache)."""
    cache = model.start_cache(context, prefix.shape[0], prefix.shape[1] + max_tokens)
    logits, cache = model.cached_logits(cache, prefix, jnp.zeros(prefix.shape[0], jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(last, axis=-1), cache


def greedy_decode(model: Captioner, context: jax.Array, prefix: jax.Array, lengths: jax.Array, max_tokens: int,
                  top_logprobs: int = 0):
    """Greedy answers: (tokens int32 [B, max_tokens] (eos then pad_id after the end), their
    log-probabilities [B, max_tokens], and the top `top_logprobs` (ids, log-probs) [B, T, K])."""
    config = model.config
    log_probs, cache = _prefill(model, context, prefix, lengths, max_tokens)
    top = max(top_logprobs, 1)

    def step(carry, _):
        log_probs, cache, position, done = carry
        token = jnp.where(done, config.pad_id, jnp.argmax(log_probs, -1)).astype(jnp.int32)
        chosen = jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None], -1)[:, 0])
        top_values, top_ids = jax.lax.top_k(log_probs, top)
        done = done | (token == config.eos_id)
        logits, cache = model.cached_logits(cache, token[:, None], position)
        return (jax.nn.log_softmax(logits[:, 0], -1), cache, position + 1, done), (token, chosen, top_ids,
                                                                                     top_values)

    done = jnp.zeros(prefix.shape[0], bool)
    _, (tokens, chosen, top_ids, top_values) = jax.lax.scan(step, (log_probs, cache, lengths, done), None,
                                                            length=max_tokens)
    return tokens.T, chosen.T, jnp.swapaxes(top_ids, 0, 1), jnp.swapaxes(top_values, 0, 1)


def beam_decode(model: Captioner, context: jax.Array, prefix: jax.Array, lengths: jax.Array, max_tokens: int,
                beam_size: int) -> jax.Array:
    """Beam search: the highest-scoring answer per row (sum of log-probabilities; a finished beam
    keeps its score) -> tokens int32 [B, max_tokens]."""
    config = model.config
    batch, beams = prefix.shape[0], beam_size
    log_probs, cache = _prefill(model, context, prefix, lengths, max_tokens)
    tile = lambda x: jnp.repeat(x, beams, axis=0)  # noqa: E731 - [B, ...] -> [B * K, ...]
    cache = jax.tree.map(tile, cache)
    log_probs, position = tile(log_probs), tile(lengths)
    scores = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (beams - 1)), (batch, 1))  # one live beam at first
    tokens = jnp.full((batch, beams, max_tokens), config.pad_id, jnp.int32)
    done = jnp.zeros((batch, beams), bool)
    vocab = log_probs.shape[-1]

    def step(carry, t):
        log_probs, cache, position, scores, tokens, done = carry
        # A finished beam extends only by pad at no cost; the others by every token.
        extend = jnp.where(done.reshape(-1, 1), jnp.where(jnp.arange(vocab) == config.pad_id, 0.0, NEG_INF),
                           log_probs).reshape(batch, beams, vocab)
        total = (scores[..., None] + extend).reshape(batch, beams * vocab)
        scores, flat = jax.lax.top_k(total, beams)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        was_done = jnp.take_along_axis(done, parent, axis=1)
        token = jnp.where(was_done, config.pad_id, token)
        tokens = tokens.at[:, :, t].set(token)
        done = was_done | (token == config.eos_id)
        position = position[rows]
        logits, cache = model.cached_logits(cache, token.reshape(-1, 1), position)
        return (jax.nn.log_softmax(logits[:, 0], -1), cache, position + 1, scores, tokens, done), None

    carry = (log_probs, cache, position, scores, tokens, done)
    (_, _, _, scores, tokens, _), _ = jax.lax.scan(step, carry, jnp.arange(max_tokens))
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]


def init_vision_from(model: Captioner, vision_model: VisionTransformer) -> None:
    """Copies a CLIP image tower's parameters (same `VisionConfig`) into the captioner's, in place."""
    nnx.update(model.vision_model, nnx.state(vision_model, nnx.Param))
