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
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers config.json dict (CLIPModel or SiglipModel) for this config."""
        return _to_hf_config(self)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any], **overrides: Any) -> "CLIPConfig":
        """Reads a transformers CLIPModel / SiglipModel config.json dict; overrides set
        fields transformers does not store (dtype, param_dtype, remat)."""
        return _from_hf_config(hf_config, **overrides)


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


class VisionEmbeddings(nnx.Module):
    """Patchify + linear patch embedding, optional class token, learned positions.

    patch_embedding.kernel: [patch*patch*3, width] over patches flattened in (row, col,
    channel) order; position_embedding: [num_patches (+1 with a class token), width].
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        width = config.width
        patch_dim = config.patch_size * config.patch_size * 3
        self.patch_embedding = Dense(
            patch_dim, width, ("patch", "embed"), use_bias=config.patch_bias,
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

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_eps
        self.embeddings = VisionEmbeddings(config, **kw)
        # transformers spells CLIP's pre-encoder norm "pre_layrnorm"; kept for a 1:1 name map.
        self.pre_layrnorm = LayerNorm(config.width, eps=eps, **kw) if config.pre_norm else None
        self.encoder = Encoder(config.width, config.depth, config.heads, config.mlp_dim, config.act,
                               eps=eps, remat=remat, **kw)
        self.post_layernorm = LayerNorm(config.width, eps=eps, **kw)
        self.head = MAPHead(config, **kw) if config.pooling == "map" else None

    def tokens(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> post-norm tokens [B, T, width] (class token first if any)."""
        hidden = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            hidden = self.pre_layrnorm(hidden)
        return self.post_layernorm(self.encoder(hidden))

    def pool(self, tokens: jax.Array) -> jax.Array:
        """post-norm tokens [B, T, width] -> pooled [B, width]."""
        if self.head is not None:
            return self.head(tokens)
        return tokens[:, 0]

    def patch_tokens(self, tokens: jax.Array) -> jax.Array:
        """post-norm tokens [B, T, width] -> patch tokens [B, num_patches, width]."""
        return tokens[:, 1:] if self.config.pooling == "cls" else tokens


class TextTransformer(nnx.Module):
    """Text tower: embeddings -> encoder -> final_layer_norm -> pooling [-> head]."""

    def __init__(self, config: TextConfig, *, head_dim: int | None, dtype, param_dtype, remat: bool,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = TextEmbeddings(config, **kw)
        self.encoder = Encoder(config.width, config.depth, config.heads, config.mlp_dim, config.act,
                               eps=config.layer_norm_eps, remat=remat, **kw)
        self.final_layer_norm = LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.head = (Dense(config.width, head_dim, ("embed", "proj"), **kw)
                     if head_dim is not None else None)

    def tokens(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> final-norm tokens [B, L, width]."""
        hidden = self.encoder(self.embeddings(ids), is_causal=self.config.causal)
        return self.final_layer_norm(hidden)

    def pool(self, tokens: jax.Array, ids: jax.Array) -> jax.Array:
        """tokens [B, L, width], ids [B, L] -> pooled [B, width] (or [B, head_dim] with a head)."""
        config = self.config
        if config.pooling == "last":
            pooled = tokens[:, -1]
        else:
            if config.eos_token_id == LEGACY_EOS_TOKEN_ID:
                positions = jnp.argmax(ids, axis=-1)
            else:
                positions = jnp.argmax(ids == config.eos_token_id, axis=-1)
            pooled = jnp.take_along_axis(tokens, positions[:, None, None], axis=1)[:, 0]
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
        self.vision_model = VisionTransformer(config.vision, remat=config.remat, **kw)
        self.text_model = TextTransformer(
            config.text, head_dim=config.embed_dim if siglip else None, remat=config.remat, **kw)
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
        pooled = self.vision_model.pool(self.vision_model.tokens(pixels))
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)
        return pooled.astype(jnp.float32)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """ids int32 [B, L] -> unnormalized embeddings float32 [B, embed_dim]."""
        pooled = self.text_model.pool(self.text_model.tokens(ids), ids)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return pooled.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# transformers config.json conversion

_HF_ACT_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                 "gelu_new": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# Defaults of transformers 5.x config classes, used where a config.json omits a field.
_HF_DEFAULTS = {
    "clip": {
        "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, num_channels=3),
    },
    "siglip": {
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
                       vision_use_head=True),
    },
}


def _single_int(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{field}={value}: only square images/patches are supported")
        value = value[0]
    return int(value)


def _hf_act(name: str, field: str) -> str:
    if name not in _HF_ACT_NAMES:
        raise ValueError(f"{field}={name!r} is not supported; expected one of {sorted(_HF_ACT_NAMES)}")
    return _HF_ACT_NAMES[name]


def _from_hf_config(hf_config: dict[str, Any], **overrides: Any) -> CLIPConfig:
    model_type = hf_config.get("model_type")
    if model_type not in ("clip", "siglip"):
        raise ValueError(f"config.json model_type is {model_type!r}; expected 'clip' or 'siglip' "
                         "(a CLIPModel or SiglipModel checkpoint)")
    defaults = _HF_DEFAULTS[model_type]
    # Old CLIP configs carry the real values in text_config_dict / vision_config_dict.
    text = {**defaults["text"], **(hf_config.get("text_config") or {}),
            **(hf_config.get("text_config_dict") or {})}
    vision = {**defaults["vision"], **(hf_config.get("vision_config") or {}),
              **(hf_config.get("vision_config_dict") or {})}
    if int(vision.get("num_channels", 3)) != 3:
        raise ValueError(f"vision_config.num_channels={vision['num_channels']}; only RGB (3) is supported")
    eos = text["eos_token_id"]
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    siglip = model_type == "siglip"
    if siglip and not vision.get("vision_use_head", True):
        raise ValueError("SigLIP vision_config.vision_use_head=False has no pooled image embedding; "
                         "only checkpoints with the attention pooling head are supported")
    vision_config = VisionConfig(
        image_size=_single_int(vision["image_size"], "vision_config.image_size"),
        patch_size=_single_int(vision["patch_size"], "vision_config.patch_size"),
        width=vision["hidden_size"], depth=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
        act=_hf_act(vision["hidden_act"], "vision_config.hidden_act"),
        pooling="map" if siglip else "cls", pre_norm=not siglip, patch_bias=siglip,
        layer_norm_eps=float(vision["layer_norm_eps"]))
    text_config = TextConfig(
        vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
        width=text["hidden_size"], depth=text["num_hidden_layers"], heads=text["num_attention_heads"],
        mlp_dim=text["intermediate_size"], act=_hf_act(text["hidden_act"], "text_config.hidden_act"),
        causal=not siglip, pooling="last" if siglip else "eot", eos_token_id=int(eos),
        pad_token_id=text["pad_token_id"], bos_token_id=text["bos_token_id"],
        layer_norm_eps=float(text["layer_norm_eps"]))
    if siglip:
        projection = text.get("projection_size") or text_config.width
        fields = dict(embed_dim=projection, kind="siglip", logit_scale_init=math.log(10.0),
                      logit_bias_init=-10.0)
    else:
        fields = dict(embed_dim=hf_config.get("projection_dim", 512), kind="clip",
                      logit_scale_init=hf_config.get("logit_scale_init_value", 2.6592),
                      logit_bias_init=None)
    return CLIPConfig(vision=vision_config, text=text_config, **{**fields, **overrides})


def _to_hf_config(config: CLIPConfig) -> dict[str, Any]:
    siglip = config.kind == "siglip"
    vision, text = config.vision, config.text
    expected = {
        "vision.pooling": (vision.pooling, "map" if siglip else "cls"),
        "vision.pre_norm": (vision.pre_norm, not siglip),
        "vision.patch_bias": (vision.patch_bias, siglip),
        "text.causal": (text.causal, not siglip),
        "text.pooling": (text.pooling, "last" if siglip else "eot"),
    }
    mismatched = [f"{name}={found!r} (needs {want!r})" for name, (found, want) in expected.items()
                  if found != want]
    if mismatched:
        model = "SiglipModel" if siglip else "CLIPModel"
        raise ValueError(f"this config has no transformers {model} equivalent: " + ", ".join(mismatched))
    text_hf = {
        "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": text.mlp_dim,
        "num_hidden_layers": text.depth, "num_attention_heads": text.heads,
        "max_position_embeddings": text.context_length, "hidden_act": _ACT_TO_HF[text.act],
        "layer_norm_eps": text.layer_norm_eps, "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
    }
    vision_hf = {
        "hidden_size": vision.width, "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads, "num_channels": 3,
        "image_size": vision.image_size, "patch_size": vision.patch_size,
        "hidden_act": _ACT_TO_HF[vision.act], "layer_norm_eps": vision.layer_norm_eps,
    }
    dtype = str(jnp.dtype(config.param_dtype))
    if siglip:
        return {
            "architectures": ["SiglipModel"], "model_type": "siglip", "dtype": dtype,
            "text_config": {"model_type": "siglip_text_model", **text_hf,
                            "projection_size": config.embed_dim},
            "vision_config": {"model_type": "siglip_vision_model", **vision_hf,
                              "vision_use_head": True},
        }
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "dtype": dtype,
        "projection_dim": config.embed_dim, "logit_scale_init_value": config.logit_scale_init,
        "text_config": {"model_type": "clip_text_model", **text_hf, "projection_dim": config.embed_dim},
        "vision_config": {"model_type": "clip_vision_model", **vision_hf,
                          "projection_dim": config.embed_dim},
    }
