"""RECO's fusion module: refines a query embedding with the embeddings retrieved for it.

One module per modality. The input is the sequence [query; retrieved_1 .. retrieved_k] of
embeddings in the shared image-text space (D = the CLIP's embed_dim); a small pre-norm transformer
encoder (``depth`` shared ``layers.Block``s, default 1 as in the paper) runs over it, and the output
at the query position, projected back to D, is the refined embedding:

    tokens  = in_proj([query; retrieved]) + type_embedding[query | retrieved]     [B, 1 + k, width]
    hidden  = encoder(tokens, key_mask = [True; valid & ~dropped])                [B, 1 + k, width]
    refined = query + out_proj(final_norm(hidden[:, 0]))                          [B, D]

The last layer computes only the query row (its query projection, attention output, residual and
MLP): the other rows are never read, and skipping them cuts the one-layer fusion's FLOPs about 2x
at k = 10 (keys and values still come from every item).

Choices the paper does not state, and why:
  - Identity-friendly start (``residual=True``, ``zero_init_output=True``, the defaults): the
    query is added back to the output and ``out_proj`` starts at zero, so an untrained fusion
    returns its query exactly and training starts from the frozen CLIP's zero-shot accuracy
    instead of from a random embedding that must first relearn the CLIP space. The gradient at
    the start is not zero: ``out_proj`` receives the fused query token's features. ``residual=False``
    gives the literal reading (the query-position output is the embedding).
  - A learned token-type embedding (query vs retrieved): the encoder has no positions, and
    without it the query token is told apart from its neighbours only by where it is read out.
  - The retrieved items' rank is not encoded: the set is used as a set.
  - ``in_proj`` / ``out_proj`` exist only when ``width != embed_dim`` (``out_proj`` always exists,
    it is the zero-initialized map that makes the start an identity).

Masking: ``valid`` [B, k] marks retrieved items that exist (a search that found fewer than k
neighbours returns id -1 for the rest). Invalid items are removed from attention as keys in every
layer, so their values cannot reach the query: changing them leaves the output bitwise unchanged.

Retrieved-item dropout (``retrieved_dropout``): in training, each retrieved item is dropped as a
whole with that probability, by the same attention mask. Dropout (this and the residual
``dropout``) runs only when an ``rng`` key is passed; without one (evaluation, the evaluators'
``encode_image``) the module is deterministic.

Parameters carry logical axis names like the CLIP's: "embed" (fusion width), "mlp", "heads",
"kv", "proj" (the embedding dim D). Parameters are stored in ``param_dtype`` and computed in
``dtype``; the refined embedding is returned in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.layers import Block, Dense, LayerNorm, l2_normalize, partitioned_param


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The fusion transformer of one modality.

    embed_dim: D, the width of the query and retrieved embeddings (the CLIP's embed_dim).
    width: transformer width; None means embed_dim (no input projection).
    depth, heads: encoder layers and attention heads (width must divide by heads).
    mlp_ratio: MLP hidden width = round(mlp_ratio * width).
    act: MLP activation ("gelu", "quick_gelu", "gelu_tanh").
    dropout: residual dropout after attention and MLP (training only).
    retrieved_dropout: probability of dropping a whole retrieved item (training only).
    residual: add the query to the output (refined = query + fusion delta).
    zero_init_output: out_proj starts at zero (with residual: the untrained fusion is the identity).
    layer_norm_eps: LayerNorm epsilon.
    dtype, param_dtype: compute and storage dtypes.
    """

    embed_dim: int = 512
    width: int | None = None
    depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    dropout: float = 0.0
    retrieved_dropout: float = 0.0
    residual: bool = True
    zero_init_output: bool = True
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.fusion_width % self.heads:
            raise ValueError(f"fusion width {self.fusion_width} is not divisible by heads {self.heads}; "
                             "change fusion.width or fusion.heads.")
        for name in ("dropout", "retrieved_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"fusion.{name} must be in [0, 1), got {rate}.")
        if self.depth < 1:
            raise ValueError(f"fusion.depth must be >= 1, got {self.depth}.")

    @property
    def fusion_width(self) -> int:
        return self.width or self.embed_dim

    @property
    def mlp_dim(self) -> int:
        return max(1, round(self.mlp_ratio * self.fusion_width))


class Fusion(nnx.Module):
    """Transformer fusion of one modality (see the module docstring)."""

    def __init__(self, config: FusionConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        width, embed_dim = config.fusion_width, config.embed_dim
        self.in_proj = Dense(embed_dim, width, ("proj", "embed"), **kw) if width != embed_dim else None
        # Row 0 marks the query token, row 1 every retrieved token.
        self.type_embedding = partitioned_param(
            rngs, nnx.initializers.normal(0.02), (2, width), (None, "embed"), param_dtype)
        self.layers = nnx.List([
            Block(width, config.heads, config.mlp_dim, config.act, eps=config.layer_norm_eps,
                  dropout=config.dropout, **kw)
            for _ in range(config.depth)])
        self.final_norm = LayerNorm(width, eps=config.layer_norm_eps, **kw)
        output_init = nnx.initializers.zeros if config.zero_init_output else None
        self.out_proj = Dense(width, embed_dim, ("embed", "proj"), kernel_init=output_init, **kw)

    def __call__(
        self,
        query: jax.Array,
        retrieved: jax.Array,
        valid: jax.Array | None = None,
        *,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Refines each query with its retrieved items.

        Args:
          query: [B, D] query embeddings (RECO passes them L2-normalized).
          retrieved: [B, k, D] retrieved embeddings (the other modality, L2-normalized).
          valid: bool [B, k]; False marks a missing neighbour (id -1). None: all valid.
          rng: PRNG key enabling retrieved-item and residual dropout (training); None: no dropout.

        Returns:
          float32 [B, D] refined embeddings (not normalized).
        """
        batch, k = retrieved.shape[:2]
        if valid is None:
            valid = jnp.ones((batch, k), bool)
        if rng is not None:
            item_rng, rng = jax.random.split(rng)
            if self.config.retrieved_dropout > 0.0:
                valid = valid & jax.random.bernoulli(item_rng, 1.0 - self.config.retrieved_dropout, (batch, k))
        key_mask = jnp.concatenate([jnp.ones((batch, 1), bool), valid.astype(bool)], axis=1)
        # Masked items are also zeroed at the input, so no NaN/inf in a missing row can leak into sums.
        retrieved = jnp.where(valid[..., None], retrieved, 0.0)
        tokens = jnp.concatenate([query[:, None, :], retrieved], axis=1).astype(self.dtype)
        if self.in_proj is not None:
            tokens = self.in_proj(tokens)
        types = self.type_embedding[...].astype(self.dtype)
        tokens = tokens + jnp.concatenate([types[:1], jnp.broadcast_to(types[1:], (k, types.shape[1]))])[None]
        hidden = tokens
        for index, layer in enumerate(self.layers):
            layer_rng, rng = jax.random.split(rng) if rng is not None else (None, None)
            # Only the query position is read out: the last layer computes that row alone.
            last = index == len(self.layers) - 1
            hidden = layer(hidden, key_mask=key_mask, num_queries=1 if last else None, rng=layer_rng)
        delta = self.out_proj(self.final_norm(hidden[:, 0])).astype(jnp.float32)
        if self.config.residual:
            return query.astype(jnp.float32) + delta
        return delta


class MeanFusion(nnx.Module):
    """The averaging ablation: the mean of the normalized [query; valid retrieved], normalized.

    No parameters. Retrieved-item dropout applies in training as in `Fusion`.
    """

    def __init__(self, retrieved_dropout: float = 0.0):
        self.retrieved_dropout = retrieved_dropout

    def __call__(
        self,
        query: jax.Array,
        retrieved: jax.Array,
        valid: jax.Array | None = None,
        *,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """query [B, D], retrieved [B, k, D], valid bool [B, k] -> float32 [B, D] unit-norm means."""
        batch, k = retrieved.shape[:2]
        if valid is None:
            valid = jnp.ones((batch, k), bool)
        if rng is not None and self.retrieved_dropout > 0.0:
            valid = valid & jax.random.bernoulli(rng, 1.0 - self.retrieved_dropout, (batch, k))
        items = jnp.concatenate([query[:, None, :], retrieved], axis=1).astype(jnp.float32)
        items = l2_normalize(items)
        weights = jnp.concatenate([jnp.ones((batch, 1), bool), valid.astype(bool)], axis=1)
        total = jnp.sum(jnp.where(weights[..., None], items, 0.0), axis=1)
        mean = total / jnp.sum(weights, axis=1, keepdims=True)
        return l2_normalize(mean)
