"""Transformer building blocks shared by the CLIP/SigLIP towers.

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


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v projections (transformers' layout).

    q_proj/k_proj/v_proj kernels: [embed, heads, kv]; out_proj kernel: [heads, kv, embed].
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        head_dim = width // heads
        self.head_dim = head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.k_proj = Dense(width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.v_proj = Dense(width, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.out_proj = Dense((heads, head_dim), width, ("heads", "kv", "embed"), **kw)

    def __call__(
        self,
        queries: jax.Array,
        keys_values: jax.Array | None = None,
        *,
        is_causal: bool = False,
    ) -> jax.Array:
        """queries [B, T, width], keys_values [B, S, width] (default: queries) -> [B, T, width]."""
        keys_values = queries if keys_values is None else keys_values
        q = self.q_proj(queries)
        k = self.k_proj(keys_values)
        v = self.v_proj(keys_values)
        attended = jax.nn.dot_product_attention(
            q, k, v, scale=1.0 / math.sqrt(self.head_dim), is_causal=is_causal)
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


class EncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        act: str,
        *,
        eps: float,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(width, eps=eps, **kw)
        self.self_attn = Attention(width, heads, **kw)
        self.layer_norm2 = LayerNorm(width, eps=eps, **kw)
        self.mlp = MLP(width, mlp_dim, act, **kw)

    def __call__(self, hidden: jax.Array, is_causal: bool = False) -> jax.Array:
        """[B, T, width] -> [B, T, width]."""
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), is_causal=is_causal)
        return hidden + self.mlp(self.layer_norm2(hidden))


def _apply_layer(layer: EncoderLayer, hidden: jax.Array, is_causal: bool) -> jax.Array:
    return layer(hidden, is_causal)


class Encoder(nnx.Module):
    """A stack of EncoderLayers (``layers.<i>``), optionally rematerialized per block."""

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
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        self.layers = nnx.List([
            EncoderLayer(width, heads, mlp_dim, act, eps=eps, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
            for _ in range(depth)])

    def __call__(self, hidden: jax.Array, *, is_causal: bool = False) -> jax.Array:
        """[B, T, width] -> [B, T, width]."""
        apply = nnx.remat(_apply_layer, static_argnums=(2,)) if self.remat else _apply_layer
        for layer in self.layers:
            hidden = apply(layer, hidden, is_causal)
        return hidden
