"""Two-tower CLIP and SigLIP: ViT image tower, text transformer, pooling and projection.

Module and parameter names mirror transformers' CLIPModel / SiglipModel
(``vision_model.encoder.layers.0.self_attn.q_proj``, ``text_model.final_layer_norm``,
``visual_projection``, ...), so the checkpoint mapping in ``vlm_jax.weights`` reads as a
table of renames plus a handful of layout conversions.

The two variants differ only in configuration:
  CLIP:   class-token pooling, pre-norm before the encoder, causal text tower pooled at
          the EOT token, bias-free linear projections into ``embed_dim``.
  SigLIP: multihead-attention pooling head (MAP), no pre-norm, bidirectional text tower
          pooled at the last position followed by a linear ``head``, and a learned
          ``logit_bias`` next to ``logit_scale``.

``encode_image`` / ``encode_text`` return unnormalized projected embeddings, the same
numbers as transformers' ``get_image_features`` / ``get_text_features`` pooler output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.layers import (
    ACTIVATIONS,
    MLP,
    Attention,
    Dense,
    Embedding,
    REMAT_POLICIES,
    Encoder,
    LayerNorm,
    partitioned_param,
)

# transformers kept this wrong eos id in early CLIP configs and pools those at argmax(ids).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT image tower.

    pooling: "cls" (class token, CLIP) or "map" (multihead attention pooling head, SigLIP).
    pre_norm: LayerNorm on the embedded tokens before the encoder (CLIP's ``pre_layrnorm``).
    patch_bias: whether the patch embedding has a bias (SigLIP: yes, CLIP: no).
    stem: "patch" (patchify + linear, the transformers layout) or "conv" (Xiao et al. 2021: one
      3x3 stride-2 conv, LayerNorm and activation per entry of ``stem_channels``, then the linear
      ``patch_embedding`` as a 1x1 conv; 2**len(stem_channels) must equal patch_size, so the token
      grid is the same; "Early convolutions help transformers see better"). transformers'
      CLIPModel has no conv stem, so such a model saves in vlm_jax's own format.
    stem_channels: output channels of the conv stem's stride-2 convolutions.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    pooling: str = "cls"
    pre_norm: bool = True
    patch_bias: bool = False
    layer_norm_eps: float = 1e-5
    stem: str = "patch"
    stem_channels: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self):
        # ml_collections hands tuples back as lists; the config stays hashable and comparable.
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"vision.stem {self.stem!r} is not 'patch' or 'conv'")
        if self.stem == "conv" and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(f"vision.stem='conv' halves the image once per stem_channels entry, so "
                             f"{len(self.stem_channels)} entries make {2 ** len(self.stem_channels)} px "
                             f"tokens but patch_size is {self.patch_size}; give log2(patch_size) channels")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text transformer.

    pooling: "eot" (CLIP: the EOS position; argmax of ids when eos_token_id == 2, as
    transformers does for legacy configs, else the first eos_token_id) or "last" (SigLIP:
    the final position, which may be padding).
    causal: causal self-attention mask (CLIP) or none (SigLIP).
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    causal: bool = True
    pooling: str = "eot"
    eos_token_id: int = 49407
    pad_token_id: int = 1
    bos_token_id: int | None = 49406
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A two-tower model.

    kind: "clip" (bias-free ``visual_projection`` / ``text_projection`` into embed_dim) or
    "siglip" (no image projection: the MAP head output is the embedding, so embed_dim must
    equal vision.width; text ``head`` with bias; ``logit_bias``).
    logit_scale_init / logit_bias_init: initial values in log space for the scale
    (scale = exp(logit_scale)), like transformers' ``logit_scale_init_value``.
    dtype / param_dtype: compute and storage dtypes ("float32", "bfloat16", ...).
    remat: rematerialize each transformer block in the backward pass.
    remat_policy: what a rematerialized block keeps for the backward, one of `REMAT_POLICIES` (names
      in `jax.checkpoint_policies`): "nothing_saveable" recomputes the whole block;
      "dots_with_no_batch_dims_saveable" keeps the projection and MLP matmul outputs and recomputes
      the norms, activations and attention, which halves ViT-B/32's freshly touched step memory (page
      faults 1.10M -> 0.54M per step at batch 32, about 4.5 -> 2.2 GB) for at most the step's non-matmul
      FLOPs (~0.3%) again, and is the faster step on CPU (RESULTS.md, profile_towers).
    scan_layers: run each tower's blocks (but the last) as a `jax.lax.scan` (`layers.Encoder`); the
      params are the same either way. Unrolled, XLA's CPU backend recomputes LayerNorm gradients
      across blocks and ViT-B/32's train step is 1.4x slower.
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 512
    kind: str = "clip"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = True

    def __post_init__(self):
        problems = []
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                problems.append(f"{name}.width {tower.width} is not divisible by {name}.heads {tower.heads}")
            if tower.act not in ACTIVATIONS:
                problems.append(f"{name}.act {tower.act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.vision.pooling not in ("cls", "map"):
            problems.append(f"vision.pooling {self.vision.pooling!r} is not 'cls' or 'map'")
        if self.vision.image_size % self.vision.patch_size:
            problems.append(f"vision.image_size {self.vision.image_size} is not a multiple of "
                            f"patch_size {self.vision.patch_size}")
        if self.text.pooling not in ("eot", "last"):
            problems.append(f"text.pooling {self.text.pooling!r} is not 'eot' or 'last'")
        if self.kind not in ("clip", "siglip"):
            problems.append(f"kind {self.kind!r} is not 'clip' or 'siglip'")
        if self.kind == "siglip" and self.embed_dim != self.vision.width:
            problems.append(f"siglip has no image projection, so embed_dim ({self.embed_dim}) must equal "
                            f"vision.width ({self.vision.width})")
        if (self.kind == "siglip") != (self.logit_bias_init is not None):
            problems.append("logit_bias_init must be set for kind='siglip' and None for kind='clip'")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} is not one of {list(REMAT_POLICIES)}")
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)


def vit_b32(**overrides: Any) -> CLIPConfig:
    """OpenAI CLIP ViT-B/32 shapes (openai/clip-vit-base-patch32)."""
    return CLIPConfig().replace(**overrides)


def vit_b16(**overrides: Any) -> CLIPConfig:
    """OpenAI CLIP ViT-B/16 shapes (openai/clip-vit-base-patch16)."""
    return CLIPConfig(vision=VisionConfig(patch_size=16)).replace(**overrides)


def vit_l14(**overrides: Any) -> CLIPConfig:
    """OpenAI CLIP ViT-L/14 shapes (openai/clip-vit-large-patch14)."""
    return CLIPConfig(
        vision=VisionConfig(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
        text=TextConfig(width=768, heads=12, mlp_dim=3072),
        embed_dim=768).replace(**overrides)


def siglip_b16(**overrides: Any) -> CLIPConfig:
    """SigLIP base patch16-224 shapes (google/siglip-base-patch16-224)."""
    return CLIPConfig(
        vision=VisionConfig(patch_size=16, act="gelu_tanh", pooling="map", pre_norm=False,
                            patch_bias=True, layer_norm_eps=1e-6),
        text=TextConfig(vocab_size=32000, context_length=64, width=768, heads=12, mlp_dim=3072,
                        act="gelu_tanh", causal=False, pooling="last", eos_token_id=1,
                        pad_token_id=1, bos_token_id=None, layer_norm_eps=1e-6),
        embed_dim=768, kind="siglip", logit_scale_init=math.log(10.0),
        logit_bias_init=-10.0).replace(**overrides)


def tiny(kind: str = "clip", **overrides: Any) -> CLIPConfig:
    """A CPU-sized model (width 64, depth 2, 32 px images) for tests and the embedded task."""
    if kind == "siglip":
        base = siglip_b16()
        vision = dataclasses.replace(base.vision, image_size=32, patch_size=8, width=64, depth=2,
                                     heads=4, mlp_dim=128)
        text = dataclasses.replace(base.text, vocab_size=1000, context_length=16, width=64, depth=2,
                                   heads=4, mlp_dim=128)
        return base.replace(vision=vision, text=text, embed_dim=64).replace(**overrides)
    vision = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)
    text = TextConfig(vocab_size=1000, context_length=16, width=64, depth=2, heads=4, mlp_dim=128,
                      eos_token_id=999, pad_token_id=0, bos_token_id=998)
    return CLIPConfig(vision=vision, text=text, embed_dim=32).replace(**overrides)


class ConvStage(nnx.Module):
    """3x3 stride-2 convolution, LayerNorm over channels, activation.

    conv.kernel: [3, 3, in_channels, out_channels] (HWIO); conv.bias, norm: [out_channels].
    """

    def __init__(self, in_channels: int, out_channels: int, act: str, *, eps: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.act = ACTIVATIONS[act]
        self.kernel = partitioned_param(
            rngs, nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2),
                                                    out_axis=3),
            (3, 3, in_channels, out_channels), (None, None, "patch", "embed"), param_dtype)
        self.bias = partitioned_param(rngs, nnx.initializers.zeros, (out_channels,), ("embed",), param_dtype)
        self.norm = LayerNorm(out_channels, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, H, W, in_channels] -> [B, H/2, W/2, out_channels]."""
        outputs = jax.lax.conv_general_dilated(
            features.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(2, 2),
            padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return self.act(self.norm(outputs + self.bias[...].astype(self.dtype)))


class VisionEmbeddings(nnx.Module):
    """Image -> tokens (patchify or a conv stem), optional class token, learned positions.

    stem="patch": patch_embedding.kernel [patch*patch*3, width] over patches flattened in
    (row, col, channel) order. stem="conv": stem.<i> (``ConvStage``) down to the token grid, then
    patch_embedding.kernel [stem_channels[-1], width] per grid cell. position_embedding:
    [num_patches (+1 with a class token), width].
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        width = config.width
        if config.stem == "conv":
            channels = (3, *config.stem_channels)
            self.stem = nnx.List([
                ConvStage(c_in, c_out, config.act, eps=config.layer_norm_eps, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
                for c_in, c_out in zip(channels[:-1], channels[1:])])
            token_dim = channels[-1]
        else:
            self.stem = None
            token_dim = config.patch_size * config.patch_size * 3
        self.patch_embedding = Dense(
            token_dim, width, ("patch", "embed"), use_bias=config.patch_bias,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        num_positions = config.num_patches
        if config.pooling == "cls":
            self.class_embedding = partitioned_param(
                rngs, nnx.initializers.normal(width**-0.5), (width,), ("embed",), param_dtype)
            num_positions += 1
        self.position_embedding = Embedding(
            num_positions, width, (None, "embed"), init=nnx.initializers.normal(0.02),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> tokens [B, T, width] (T = num_patches + class token)."""
        config = self.config
        batch, height, width, channels = pixels.shape
        if (height, width, channels) != (config.image_size, config.image_size, 3):
            raise ValueError(f"expected images [B, {config.image_size}, {config.image_size}, 3], "
                             f"got {pixels.shape}")
        grid, patch = config.grid_size, config.patch_size
        if self.stem is not None:
            features = pixels
            for stage in self.stem:
                features = stage(features)
            tokens = self.patch_embedding(features.reshape(batch, grid * grid, features.shape[-1]))
        else:
            patches = pixels.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
            tokens = self.patch_embedding(patches.reshape(batch, grid * grid, patch * patch * 3))
        if config.pooling == "cls":
            class_token = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                                           (batch, 1, config.width))
            tokens = jnp.concatenate([class_token, tokens], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(self.dtype)


class MAPHead(nnx.Module):
    """SigLIP's multihead attention pooling: a learned probe attends over all tokens.

    probe: [1, 1, width]; attention is transformers' torch.nn.MultiheadAttention split into
    q/k/v projections; then a residual MLP on the layer-normed result.
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.probe = partitioned_param(
            rngs, nnx.initializers.xavier_uniform(), (1, 1, config.width), (None, None, "embed"),
            param_dtype)
        self.attention = Attention(config.width, config.heads, **kw)
        self.layernorm = LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.mlp = MLP(config.width, config.mlp_dim, config.act, **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T, width] -> pooled [B, width]."""
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (tokens.shape[0], 1, tokens.shape[2]))
        pooled = self.attention(probe, tokens)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class VisionTransformer(nnx.Module):
    """ViT: embeddings -> [pre_layrnorm] -> encoder -> post_layernorm -> pooling."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs,
                 scan: bool = False, remat_policy: str = "nothing_saveable"):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_eps
        self.embeddings = VisionEmbeddings(config, **kw)
        # transformers spells CLIP's pre-encoder norm "pre_layrnorm"; kept for a 1:1 name map.
        self.pre_layrnorm = LayerNorm(config.width, eps=eps, **kw) if config.pre_norm else None
        self.encoder = Encoder(config.width, config.depth, config.heads, config.mlp_dim, config.act,
                               eps=eps, remat=remat, remat_policy=remat_policy, scan=scan, **kw)
        self.post_layernorm = LayerNorm(config.width, eps=eps, **kw)
        self.head = MAPHead(config, **kw) if config.pooling == "map" else None

    def _embedded(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> encoder input [B, T, width] (embedded, pre-normed when configured)."""
        hidden = self.embeddings(pixels)
        return self.pre_layrnorm(hidden) if self.pre_layrnorm is not None else hidden

    def tokens(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> post-norm tokens [B, T, width] (class token first if any)."""
        return self.post_layernorm(self.encoder(self._embedded(pixels)))

    def pool(self, tokens: jax.Array) -> jax.Array:
        """post-norm tokens [B, T, width] -> pooled [B, width]."""
        if self.head is not None:
            return self.head(tokens)
        return tokens[:, 0]

    def pooled(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> pooled [B, width], the same as pool(tokens(pixels)).

        Class-token pooling reads one row, so the last block computes that row alone (its keys still
        come from every token): a 12-block ViT-B forward is 7% smaller. The MAP head attends over all
        tokens, so they are all computed.
        """
        if self.head is not None:
            return self.head(self.tokens(pixels))
        return self.post_layernorm(self.encoder(self._embedded(pixels), num_queries=1))[:, 0]

    def patch_tokens(self, tokens: jax.Array) -> jax.Array:
        """post-norm tokens [B, T, width] -> patch tokens [B, num_patches, width]."""
        return tokens[:, 1:] if self.config.pooling == "cls" else tokens


class TextTransformer(nnx.Module):
    """Text tower: embeddings -> encoder -> final_layer_norm -> pooling [-> head]."""

    def __init__(self, config: TextConfig, *, head_dim: int | None, dtype, param_dtype, remat: bool,
                 rngs: nnx.Rngs, scan: bool = False, remat_policy: str = "nothing_saveable"):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = TextEmbeddings(config, **kw)
        self.encoder = Encoder(config.width, config.depth, config.heads, config.mlp_dim, config.act,
                               eps=config.layer_norm_eps, remat=remat, remat_policy=remat_policy, scan=scan,
                               **kw)
        self.final_layer_norm = LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.head = (Dense(config.width, head_dim, ("embed", "proj"), **kw)
                     if head_dim is not None else None)

    def tokens(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> final-norm tokens [B, L, width]."""
        hidden = self.encoder(self.embeddings(ids), is_causal=self.config.causal)
        return self.final_layer_norm(hidden)

    def pooled_positions(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> int32 [B]: the position each sequence is pooled at."""
        config = self.config
        if config.pooling == "last":
            return jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.int32)
        if config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(ids, axis=-1).astype(jnp.int32)
        return jnp.argmax(ids == config.eos_token_id, axis=-1).astype(jnp.int32)

    def pool(self, tokens: jax.Array, ids: jax.Array) -> jax.Array:
        """tokens [B, L, width], ids [B, L] -> pooled [B, width] (or [B, head_dim] with a head)."""
        positions = self.pooled_positions(ids)
        pooled = jnp.take_along_axis(tokens, positions[:, None, None], axis=1)[:, 0]
        return self.head(pooled) if self.head is not None else pooled

    def pooled(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> pooled [B, width] (or [B, head_dim]), the same as pool(tokens(ids), ids).

        Pooling reads one position, so the last block computes that row alone (its keys still come
        from every position): the 12-block CLIP text forward is 7% smaller at 77 tokens.
        """
        rows = self.pooled_positions(ids)[:, None]
        hidden = self.encoder(self.embeddings(ids), is_causal=self.config.causal, query_rows=rows)
        pooled = self.final_layer_norm(hidden)[:, 0]
        return self.head(pooled) if self.head is not None else pooled


class TextEmbeddings(nnx.Module):
    """token_embedding [vocab, width] + position_embedding [context_length, width]."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = Embedding(config.vocab_size, config.width, ("vocab", "embed"),
                                         init=nnx.initializers.normal(0.02), **kw)
        self.position_embedding = Embedding(config.context_length, config.width, (None, "embed"),
                                            init=nnx.initializers.normal(0.01), **kw)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] (L <= context_length) -> [B, L, width]."""
        length = ids.shape[-1]
        positions = self.position_embedding.embedding[...]
        if length > positions.shape[0]:
            raise ValueError(f"text length {length} exceeds context_length {positions.shape[0]}")
        return self.token_embedding(ids) + positions[:length].astype(self.dtype)


class CLIP(nnx.Module):
    """Two-tower CLIP / SigLIP model (see module docstring)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        siglip = config.kind == "siglip"
        remat = dict(remat=config.remat, remat_policy=config.remat_policy, scan=config.scan_layers)
        self.vision_model = VisionTransformer(config.vision, **remat, **kw)
        self.text_model = TextTransformer(config.text, head_dim=config.embed_dim if siglip else None, **remat, **kw)
        if siglip:
            self.visual_projection = None
            self.text_projection = None
        else:
            self.visual_projection = Dense(config.vision.width, config.embed_dim, ("embed", "proj"),
                                           use_bias=False, **kw)
            self.text_projection = Dense(config.text.width, config.embed_dim, ("embed", "proj"),
                                         use_bias=False, **kw)
        self.logit_scale = partitioned_param(
            rngs, nnx.initializers.constant(config.logit_scale_init), (), (), param_dtype)
        self.logit_bias = (
            partitioned_param(rngs, nnx.initializers.constant(config.logit_bias_init), (), (),
                              param_dtype)
            if siglip else None)

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """pixels float32 [B, H, W, 3] normalized -> final-norm patch tokens [B, N, vision.width]."""
        return self.vision_model.patch_tokens(self.vision_model.tokens(pixels))

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """pixels float32 [B, H, W, 3] normalized -> unnormalized embeddings float32 [B, embed_dim]."""
        pooled = self.vision_model.pooled(pixels)
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)
        return pooled.astype(jnp.float32)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> unnormalized embeddings float32 [B, embed_dim]."""
        pooled = self.text_model.pooled(ids)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return pooled.astype(jnp.float32)

