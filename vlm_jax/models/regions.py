"""GRAIN's region decoder: learned queries that read a CLIP's image tokens, boxes and region embeddings.

A DETR-style pre-norm transformer decoder (the shared ``layers.Block`` with cross-attention) runs
R region queries and one image query over the image tower's final tokens:

    context = LayerNorm(token_proj(tokens))                        [B, T, width]  (no positions added)
    hidden  = queries (learned)                                    [B, R + 1, width]
    hidden  = Block(self-attn over queries, cross-attn to context, MLP)  x depth
    hidden  = final_norm(hidden)
    boxes   = sigmoid(box_mlp(hidden[:, :R]))                      [B, R, 4]  (cx, cy, w, h) in [0, 1]
    regions = region_proj(hidden[:, :R])                           [B, R, D]  region embeddings
    image   = image_proj(hidden[:, R])                             [B, D]     the global image embedding

The image tokens get no positional encoding here: the ViT added its own at its input, and the
paper's decoder adds none. Every decoder layer's outputs are returned by ``__call__`` when
``all_layers`` is set (DETR's auxiliary losses read them); GRAIN matches and scores the last one.

`GrainCLIP` is the two-tower CLIP with this decoder on its image tower: ``encode_image`` is the
image query's embedding, so every evaluator that scores a CLIP scores it unchanged;
``encode_regions`` gives the boxes and region embeddings the region evaluators read.
``global_residual`` (a choice for fine-tuning a pretrained CLIP, off in the paper's from-scratch
setting): the image embedding is the CLIP's own pooled embedding plus the image query's projection,
which starts at zero, so an untrained decoder leaves the CLIP's zero-shot accuracy exactly where it
was instead of replacing its image embedding by a random one.

Params carry the logical axes of the CLIP's ("embed" the decoder width, "mlp", "heads", "kv",
"proj" the embedding dim D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.clip import CLIP
from vlm_jax.models.layers import Block, Dense, LayerNorm, partitioned_param


@dataclasses.dataclass(frozen=True)
class RegionDecoderConfig:
    """The region decoder (paper scale: 6 layers, width 512, 8 heads, FFN 2048, 5 region queries).

    token_width: width of the image tokens it reads (the ViT's width).
    embed_dim: D of the image-text embedding space (the CLIP's embed_dim).
    width, depth, heads, mlp_dim, act: the decoder's blocks.
    num_regions: R region queries (one image query besides).
    box_layers: layers of the box MLP (the last one outputs 4 numbers).
    dropout: residual dropout in the blocks (training only).
    global_residual: image embedding = the CLIP's pooled embedding + the image query's (zero-init)
      projection (see the module docstring); False: the image query's projection alone.
    """

    token_width: int = 768
    embed_dim: int = 512
    width: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "gelu"
    num_regions: int = 5
    box_layers: int = 3
    dropout: float = 0.0
    global_residual: bool = False
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"regions.width {self.width} is not divisible by regions.heads {self.heads}.")
        if self.depth < 1 or self.num_regions < 1 or self.box_layers < 1:
            raise ValueError(f"regions.depth, num_regions and box_layers must be >= 1, got {self.depth}, "
                             f"{self.num_regions}, {self.box_layers}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"regions.dropout must be in [0, 1), got {self.dropout}.")


@dataclasses.dataclass(frozen=True)
class RegionOutputs:
    """One decoder layer's predictions (float32)."""

    boxes: jax.Array  # [B, R, 4] cx, cy, w, h in [0, 1] of the input image
    regions: jax.Array  # [B, R, D] region embeddings (not normalized)
    image: jax.Array  # [B, D] image embedding (before global_residual's pooled term)


jax.tree_util.register_dataclass(RegionOutputs, data_fields=["boxes", "regions", "image"], meta_fields=[])


class RegionDecoder(nnx.Module):
    """The decoder and its heads (module docstring)."""

    def __init__(self, config: RegionDecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width, eps = config.width, config.layer_norm_eps
        self.token_proj = Dense(config.token_width, width, ("proj", "embed"), **kw)
        self.token_norm = LayerNorm(width, eps=eps, **kw)
        self.queries = partitioned_param(rngs, nnx.initializers.normal(0.02), (config.num_regions + 1, width),
                                         (None, "embed"), param_dtype)
        self.layers = nnx.List([
            Block(width, config.heads, config.mlp_dim, config.act, eps=eps, dropout=config.dropout,
                  cross_attention=True, context_width=width, **kw)
            for _ in range(config.depth)])
        self.final_norm = LayerNorm(width, eps=eps, **kw)
        last = config.box_layers - 1
        self.box_mlp = nnx.List([
            Dense(width, 4 if index == last else width,
                  ("embed" if index == 0 else "mlp", None if index == last else "mlp"), **kw)
            for index in range(config.box_layers)])
        self.region_proj = Dense(width, config.embed_dim, ("embed", "proj"), use_bias=False, **kw)
        image_init = nnx.initializers.zeros if config.global_residual else None
        self.image_proj = Dense(width, config.embed_dim, ("embed", "proj"), use_bias=False,
                                kernel_init=image_init, **kw)

    def heads(self, hidden: jax.Array) -> RegionOutputs:
        """Decoder outputs [B, R + 1, width] (before final_norm) -> the predictions."""
        hidden = self.final_norm(hidden)
        regions = hidden[:, : self.config.num_regions]
        boxes = regions
        for index, layer in enumerate(self.box_mlp):
            boxes = layer(boxes)
            if index < len(self.box_mlp) - 1:
                boxes = jax.nn.relu(boxes)
        return RegionOutputs(boxes=jax.nn.sigmoid(boxes.astype(jnp.float32)),
                             regions=self.region_proj(regions).astype(jnp.float32),
                             image=self.image_proj(hidden[:, self.config.num_regions]).astype(jnp.float32))

    def __call__(self, tokens: jax.Array, *, rng: jax.Array | None = None,
                 all_layers: bool = False) -> RegionOutputs | list[RegionOutputs]:
        """tokens [B, T, token_width] (the image tower's final tokens) -> the last layer's predictions,
        or every layer's (first to last) with `all_layers`. rng enables dropout."""
        context = self.token_norm(self.token_proj(tokens))
        hidden = jnp.broadcast_to(self.queries[...].astype(context.dtype)[None],
                                  (tokens.shape[0], *self.queries.shape))
        outputs = []
        for index, layer in enumerate(self.layers):
            layer_rng, rng = jax.random.split(rng) if rng is not None else (None, None)
            hidden = layer(hidden, context=context, rng=layer_rng)
            if all_layers or index == len(self.layers) - 1:
                outputs.append(self.heads(hidden))
        return outputs if all_layers else outputs[-1]


class GrainCLIP(nnx.Module):
    """A CLIP (``clip``) with a `RegionDecoder` (``regions``) over its image tower's tokens."""

    def __init__(self, clip: CLIP, config: RegionDecoderConfig, *, rngs: nnx.Rngs):
        if config.token_width != clip.config.vision.width or config.embed_dim != clip.config.embed_dim:
            raise ValueError(f"the region decoder reads {config.token_width}-wide tokens into {config.embed_dim}-d "
                             f"embeddings, but the CLIP has vision width {clip.config.vision.width} and embed_dim "
                             f"{clip.config.embed_dim}.")
        self.clip = clip
        self.regions = RegionDecoder(config, rngs=rngs)

    @property
    def config(self):
        return self.clip.config

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    @property
    def logit_bias(self):
        return self.clip.logit_bias

    def decode(self, pixels: jax.Array, *, rng: jax.Array | None = None) -> RegionOutputs:
        """pixels [B, H, W, 3] -> the last layer's predictions; with global_residual, `image` already
        includes the CLIP's pooled embedding."""
        vision = self.clip.vision_model
        tokens = vision.tokens(pixels)
        outputs = self.regions(tokens, rng=rng)
        if not self.regions.config.global_residual:
            return outputs
        pooled = vision.pool(tokens)
        if self.clip.visual_projection is not None:
            pooled = self.clip.visual_projection(pooled)
        return dataclasses.replace(outputs, image=outputs.image + pooled.astype(jnp.float32))

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> the global image embedding float32 [B, D] (not normalized)."""
        return self.decode(pixels).image

    def encode_text(self, ids: jax.Array) -> jax.Array:
        return self.clip.encode_text(ids)

    def encode_regions(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, 3] -> (boxes [B, R, 4] cx, cy, w, h in [0, 1], region embeddings [B, R, D])."""
        outputs = self.decode(pixels)
        return outputs.boxes, outputs.regions
