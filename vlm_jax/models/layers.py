"""Transformer building blocks shared by every model: the CLIP/SigLIP towers, the fusion, heads.

Every parameter carries logical axis names as ``out_sharding`` metadata (the key
``nnx.with_partitioning`` writes). Params are created with ``eager_sharding=False``:
a model builds the same way with or without a mesh, and the trainer turns the names
into mesh axes with its rules (``nnx.get_partition_spec`` under
``nnx.logical_axis_rules``) and creates the params already sharded with a jitted init.

Logical names: "embed" (model width), "mlp", "heads", "kv" (head dim), "vocab",
"patch" (flattened patch in-features), "proj" (projection out dim); None for
dimensions that are never sharded.

Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at use.
LayerNorm statistics and the attention softmax run in float32 whatever the compute
dtype, which keeps a bfloat16 model close to its float32 twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
LogicalNames = tuple[str | None, ...]


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, transformers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """Tanh-approximated GELU, transformers' "gelu_pytorch_tanh" (SigLIP)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
}


def partitioned_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: LogicalNames,
    param_dtype: jnp.dtype,
) -> nnx.Param:
    """Creates a Param with logical axis names; len(names) == len(shape)."""
    if len(names) != len(shape):
        raise ValueError(f"expected one logical name per dimension of {tuple(shape)}, got {names}")
    value = init(rngs.params(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _as_shape(features: int | Sequence[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


class Dense(nnx.Module):
    """Linear map contracting the trailing input dims into (possibly multi-dim) outputs.

    kernel: [*in_shape, *out_shape]; bias: [*out_shape]. Attention keeps heads as a
    separate kernel dimension ([embed, heads, kv]) so "heads" can be sharded directly.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        names: LogicalNames,
        *,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = _as_shape(in_features), _as_shape(out_features)
        n_in = len(in_shape)
        if kernel_init is None:
            kernel_init = nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal",
                in_axis=tuple(range(n_in)),
                out_axis=tuple(range(n_in, n_in + len(out_shape))))
        self.in_ndim = n_in
        self.dtype = dtype
        self.kernel = partitioned_param(rngs, kernel_init, in_shape + out_shape, names, param_dtype)
        self.bias = (
            partitioned_param(rngs, nnx.initializers.zeros, out_shape, names[n_in:], param_dtype)
            if use_bias else None)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """[..., *in_shape] -> [..., *out_shape] in the compute dtype."""
        kernel = self.kernel[...].astype(self.dtype)
        outputs = jnp.tensordot(
            inputs.astype(self.dtype), kernel,
            axes=(tuple(range(inputs.ndim - self.in_ndim, inputs.ndim)), tuple(range(self.in_ndim))))
        if self.bias is not None:
            outputs = outputs + self.bias[...].astype(self.dtype)
        return outputs


class Embedding(nnx.Module):
    """Lookup table: embedding [num_embeddings, features]."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        names: LogicalNames,
        *,
        init: Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = partitioned_param(rngs, init, (num_embeddings, features), names, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """int [...] -> [..., features] in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last dim; scale, bias: [features]."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = partitioned_param(rngs, nnx.initializers.ones, (features,), ("embed",), param_dtype)
        self.bias = partitioned_param(rngs, nnx.initializers.zeros, (features,), ("embed",), param_dtype)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """[..., features] -> [..., features]; statistics in float32."""
        x = inputs.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(var + self.eps)
        outputs = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return outputs.astype(self.dtype)


def l2_normalize(vectors: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Scales each row to unit length, a norm below eps counting as eps; float32 [..., D] out."""
    vectors = vectors.astype(jnp.float32)
    return vectors * jax.lax.rsqrt(jnp.maximum(jnp.sum(vectors**2, axis=-1, keepdims=True), eps**2))


def dropout(inputs: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of single elements; the identity when rng is None or rate is 0."""
    if rng is None or rate == 0.0:
        return inputs
    keep = jax.random.bernoulli(rng, 1.0 - rate, inputs.shape)
    return jnp.where(keep, inputs / (1.0 - rate), 0.0).astype(inputs.dtype)


class Attention(nnx.Module):
    """Multi-head self- or cross-attention with separate q/k/v projections (transformers' layout).

    q_proj kernel: [embed, heads, kv]; k_proj/v_proj kernels: [kv_width, heads, kv] (kv_width
    defaults to width); out_proj kernel: [heads, kv, embed].
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        kv_width: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        head_dim = width // heads
        kv_width = width if kv_width is None else kv_width
        self.head_dim = head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.k_proj = Dense(kv_width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.v_proj = Dense(kv_width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.out_proj = Dense((heads, head_dim), width, ("heads", "kv", "embed"), **kw)

    def __call__(
        self,
        queries: jax.Array,
        keys_values: jax.Array | None = None,
        *,
        key_mask: jax.Array | None = None,
        is_causal: bool = False,
        num_queries: int | None = None,
        query_rows: jax.Array | None = None,
    ) -> jax.Array:
        """queries [B, T, width], keys_values [B, S, kv_width] (None: self-attention, S = T) -> [B, Q, width].

        key_mask: bool [B, S]; False keys are never attended to. None: every key.
        is_causal: query i attends keys 0..i only.
        num_queries: only the first Q query positions are computed; None: Q = T.
        query_rows: int [B, Q]: only these query positions are computed, in this order (with
          is_causal, the query at row r attends keys 0..r). None: as num_queries says.
        """
        keys_values = queries if keys_values is None else keys_values
        if num_queries is not None:
            queries = queries[:, :num_queries]
        if query_rows is not None:
            queries = jnp.take_along_axis(queries, query_rows[..., None], axis=1)
            if is_causal:
                visible = jnp.arange(keys_values.shape[1])[None, None, :] <= query_rows[..., None]  # [B, Q, S]
                key_mask = visible if key_mask is None else visible & key_mask.astype(bool)[:, None, :]
                is_causal = False
        return self.attend(queries, *self.project_kv(keys_values), key_mask=key_mask, is_causal=is_causal)

    def project_kv(self, keys_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """keys_values [B, S, kv_width] -> (keys, values) [B, S, heads, kv], e.g. a decoder's cache."""
        return self.k_proj(keys_values), self.v_proj(keys_values)

    def attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array, *, key_mask: jax.Array | None = None,
               is_causal: bool = False) -> jax.Array:
        """queries [B, Q, width] over projected keys/values [B, S, heads, kv] -> [B, Q, width];
        key_mask bool [B, S] or [B, Q, S] (per query)."""
        mask = None
        if key_mask is not None:
            mask = key_mask.astype(bool)
            mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # [B, heads, Q, S]
        attended = jax.nn.dot_product_attention(
            self.q_proj(queries), keys, values, mask=mask, scale=1.0 / math.sqrt(self.head_dim), is_causal=is_causal)
        return self.out_proj(attended)


class MLP(nnx.Module):
    """fc1 -> activation -> fc2; fc1 kernel [embed, mlp], fc2 kernel [mlp, embed]."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        act: str,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not one of {sorted(ACTIVATIONS)}")
        self.act = act
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), **kw)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """[..., width] -> [..., width]."""
        return self.fc2(ACTIVATIONS[self.act](self.fc1(inputs)))


class Block(nnx.Module):
    """Pre-norm transformer block with residual dropout:

        x = x + dropout(self_attn(layer_norm1(x)))                      key_mask, is_causal
        x = x + dropout(cross_attn(cross_attn_layer_norm(x), context))   with cross_attention only
        x = x + dropout(mlp(layer_norm2(x)))

    Without cross-attention the params are transformers' CLIP encoder layer's. Dropout (``dropout``
    rate) runs only when an rng key is passed.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        act: str,
        *,
        eps: float,
        dropout: float = 0.0,
        cross_attention: bool = False,
        context_width: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = dropout
        self.layer_norm1 = LayerNorm(width, eps=eps, **kw)
        self.self_attn = Attention(width, heads, **kw)
        if cross_attention:
            self.cross_attn_layer_norm = LayerNorm(width, eps=eps, **kw)
            self.cross_attn = Attention(width, heads, kv_width=context_width, **kw)
        else:
            self.cross_attn_layer_norm = None
            self.cross_attn = None
        self.layer_norm2 = LayerNorm(width, eps=eps, **kw)
        self.mlp = MLP(width, mlp_dim, act, **kw)

    def __call__(
        self,
        hidden: jax.Array,
        *,
        key_mask: jax.Array | None = None,
        is_causal: bool = False,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        num_queries: int | None = None,
        query_rows: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """hidden [B, T, width] -> [B, Q, width].

        key_mask: bool [B, T] for self-attention (False: never attended to); None: every token.
        context: [B, S, context_width] for cross-attention (required with it, refused without);
        context_mask: bool [B, S].
        num_queries: only the first Q rows are computed (keys still come from all T); None: Q = T.
        query_rows: int [B, Q]: only these rows are computed, in this order (keys still come from all
          T; with is_causal, row r attends rows 0..r); None: as num_queries says.
        rng: PRNG key enabling dropout; None: deterministic.
        """
        if (context is None) != (self.cross_attn is None):
            raise ValueError("a block with cross-attention needs a context and one without refuses it; "
                             f"cross_attention={self.cross_attn is not None}, context given={context is not None}")
        sublayers = 2 if self.cross_attn is None else 3
        rngs = list(jax.random.split(rng, sublayers)) if rng is not None else [None] * sublayers
        attended = self.self_attn(self.layer_norm1(hidden), key_mask=key_mask, is_causal=is_causal,
                                  num_queries=num_queries, query_rows=query_rows)
        if query_rows is not None:
            hidden = jnp.take_along_axis(hidden, query_rows[..., None], axis=1)
        hidden = hidden[:, : attended.shape[1]] + dropout(attended, self.dropout, rngs[0])
        if self.cross_attn is not None:
            attended = self.cross_attn(self.cross_attn_layer_norm(hidden), context, key_mask=context_mask)
            hidden = hidden + dropout(attended, self.dropout, rngs[1])
        return hidden + dropout(self.mlp(self.layer_norm2(hidden)), self.dropout, rngs[-1])

    def cached(self, hidden: jax.Array, cache: tuple[jax.Array, jax.Array], start: jax.Array, *,
               context_kv: tuple[jax.Array, jax.Array] | None = None, context_mask: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Causal decoding with a key/value cache: T new tokens of each row at positions
        start[b] .. start[b] + T - 1.

        hidden [B, T, width]; cache (keys, values) [B, L, heads, kv]; start int32 [B];
        context_kv: the cross-attention's projected context (`cross_attn.project_kv(context)`).
        The new keys/values are written into the cache; token t attends to cache positions
        <= start + t. Returns (hidden [B, T, width], the updated cache). Deterministic (no dropout).
        The same as `__call__(is_causal=True)` on the whole sequence, one chunk at a time.
        """
        if (context_kv is None) != (self.cross_attn is None):
            raise ValueError("a block with cross-attention needs context_kv and one without refuses it.")
        steps = hidden.shape[1]
        normed = self.layer_norm1(hidden)
        keys, values = self.self_attn.project_kv(normed)
        write = jax.vmap(lambda buffer, new, at: jax.lax.dynamic_update_slice_in_dim(buffer, new, at, axis=0))
        cache = (write(cache[0], keys.astype(cache[0].dtype), start), write(cache[1], values.astype(cache[1].dtype),
                                                                          start))
        positions = start[:, None] + jnp.arange(steps)[None, :]  # [B, T]
        visible = jnp.arange(cache[0].shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, L]
        hidden = hidden + self.self_attn.attend(normed, *cache, key_mask=visible)
        if self.cross_attn is not None:
            hidden = hidden + self.cross_attn.attend(self.cross_attn_layer_norm(hidden), *context_kv,
                                                     key_mask=context_mask)
        return hidden + self.mlp(self.layer_norm2(hidden)), cache


def _apply_block(block: Block, hidden: jax.Array, key_mask: jax.Array | None, is_causal: bool,
                 num_queries: int | None = None, query_rows: jax.Array | None = None) -> jax.Array:
    return block(hidden, key_mask=key_mask, is_causal=is_causal, num_queries=num_queries, query_rows=query_rows)


# What a rematerialized block may keep for the backward: `jax.checkpoint_policies` that take no arguments.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable")


class Encoder(nnx.Module):
    """A stack of self-attention Blocks (``layers.<i>``), optionally rematerialized per block.

    scan: run the blocks but the last as one `jax.lax.scan` over their params, stacked at call time
    (the last block runs alone, since it may compute only the rows a pooling reads). The params keep
    their per-block layout (``layers.<i>``, transformers' names); the loop gives XLA one block to
    compile, so fusion cannot reach across blocks. Unrolled, XLA's CPU backend fuses the backward
    residual stream's LayerNorm gradients of later blocks into each earlier block's fusions and
    recomputes them: ViT-B/32's train step spent more time in those fusions than in its matmuls
    (benchmarks/profile_towers.py, RESULTS.md). The stacking copies the blocks' params once per call.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        act: str,
        *,
        eps: float,
        remat: bool = False,
        remat_policy: str = "nothing_saveable",
        scan: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r} is not one of {list(REMAT_POLICIES)}")
        self.remat_policy = remat_policy
        self.scan = scan
        self.layers = nnx.List([
            Block(width, heads, mlp_dim, act, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(depth)])

    def __call__(self, hidden: jax.Array, *, key_mask: jax.Array | None = None, is_causal: bool = False,
                 num_queries: int | None = None, query_rows: jax.Array | None = None) -> jax.Array:
        """hidden [B, T, width], key_mask bool [B, T] or None -> [B, T, width], or [B, Q, width] when the
        last block computes only the rows a pooling reads: the first Q (num_queries) or query_rows int [B, Q]."""
        policy = getattr(jax.checkpoint_policies, self.remat_policy)
        apply = nnx.remat(_apply_block, static_argnums=(3, 4), policy=policy) if self.remat else _apply_block
        *blocks, last = self.layers
        if self.scan and blocks:
            graphdef = nnx.graphdef(blocks[0])
            stacked = jax.tree.map(lambda *params: jnp.stack(params), *(nnx.state(block) for block in blocks))

            def body(carry: jax.Array, params) -> tuple[jax.Array, None]:
                return _apply_block(nnx.merge(graphdef, params), carry, key_mask, is_causal), None

            hidden, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False, policy=policy) if self.remat else body,
                                     hidden, stacked)
        else:
            for layer in blocks:
                hidden = apply(layer, hidden, key_mask, is_causal)
        return apply(last, hidden, key_mask, is_causal, num_queries, query_rows)
