"""OWLv2 open-vocabulary detection heads on the CLIP towers (Minderer et al. 2023, "Scaling
open-vocabulary object detection").

Every patch token of the image tower is a box proposal. The towers are `vlm_jax.models.clip.CLIP`
(kind "clip", class token); module and parameter names mirror transformers'
``Owlv2ForObjectDetection`` (``owlv2.vision_model...``, ``class_head.dense0``, ``box_head.dense2``,
``objectness_head``, ``layer_norm``), so `vlm_jax.weights.hf_owlv2` maps a checkpoint by renames:

  image features   post_layernorm over all tokens, each patch token times the class token,
                   ``layer_norm``: [B, P, width], P = grid * grid in row-major patch order.
  boxes            ``box_head`` (dense0, gelu, dense1, gelu, dense2) plus a fixed bias that puts
                   each box at its patch (inverse sigmoid of the patch's corner and size), sigmoid:
                   (cx, cy, w, h) normalized to the square model input.
  class logits     cosine of ``class_head.dense0`` image embeddings with the text tower's projected
                   query embeddings, plus a per-patch learned shift, times a per-patch scale
                   (elu + 1); a padding query's logits are float32's most negative value.
  objectness       ``objectness_head`` on the image features, no gradient into them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models.clip import CLIP, CLIPConfig
from vlm_jax.models.layers import Dense, LayerNorm, gelu

# transformers' class head adds this to each norm before dividing.
NORM_EPS = 1e-6
# transformers' inverse sigmoid keeps away from log(0) with this offset.
BOX_BIAS_EPS = 1e-4


def check_config(config: CLIPConfig) -> None:
    """Raises ValueError for a config the OWLv2 heads cannot sit on."""
    problems = []
    if config.kind != "clip":
        problems.append(f"kind={config.kind!r} (needs 'clip')")
    if config.vision.pooling != "cls":
        problems.append(f"vision.pooling={config.vision.pooling!r} (needs 'cls': features merge the class token)")
    if config.vision.stem != "patch":
        problems.append(f"vision.stem={config.vision.stem!r} (needs 'patch')")
    if problems:
        raise ValueError("OWLv2 needs a CLIP with a class token and a patch stem; got " + ", ".join(problems))


def box_bias(grid_height: int, grid_width: int) -> np.ndarray:
    """The logit-space prior of each patch's box: float32 [grid_height * grid_width, 4] (cx, cy, w, h).

    Centres are the patches' bottom-right corners (transformers' ``normalize_grid_corner_coordinates``,
    which OWLv2 was trained with), sizes one patch; computed in float32 as transformers does.
    """
    xs = np.arange(1, grid_width + 1, dtype=np.float32) / np.float32(grid_width)
    ys = np.arange(1, grid_height + 1, dtype=np.float32) / np.float32(grid_height)
    xx, yy = np.meshgrid(xs, ys, indexing="xy")
    corners = np.clip(np.stack([xx, yy], axis=-1).reshape(-1, 2), 0.0, 1.0).astype(np.float32)
    sizes = np.broadcast_to(np.array([1.0 / grid_width, 1.0 / grid_height], np.float32), corners.shape)
    eps = np.float32(BOX_BIAS_EPS)

    def inverse_sigmoid(values: np.ndarray) -> np.ndarray:
        return np.log(values + eps) - np.log1p(-values + eps)

    return np.concatenate([inverse_sigmoid(corners), inverse_sigmoid(sizes)], axis=-1).astype(np.float32)


class BoxHead(nnx.Module):
    """dense0 -> gelu -> dense1 -> gelu -> dense2 (transformers' ``Owlv2BoxPredictionHead``).

    dense0 kernel [width, width] ("embed", "mlp"), dense1 [width, width] ("mlp", "embed"),
    dense2 [width, out_dim] ("embed", None).
    """

    def __init__(self, width: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense0 = Dense(width, width, ("embed", "mlp"), **kw)
        self.dense1 = Dense(width, width, ("mlp", "embed"), **kw)
        self.dense2 = Dense(width, out_dim, ("embed", None), **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [..., width] -> [..., out_dim]."""
        return self.dense2(gelu(self.dense1(gelu(self.dense0(features)))))


class ClassHead(nnx.Module):
    """transformers' ``Owlv2ClassPredictionHead``: dense0 kernel [vision width, text width]
    ("embed", "proj"); logit_shift, logit_scale kernels [vision width, 1] ("embed", None)."""

    def __init__(self, vision_width: int, text_width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense0 = Dense(vision_width, text_width, ("embed", "proj"), **kw)
        self.logit_shift = Dense(vision_width, 1, ("embed", None), **kw)
        self.logit_scale = Dense(vision_width, 1, ("embed", None), **kw)

    def class_embeddings(self, image_features: jax.Array) -> jax.Array:
        """image_features [B, P, vision width] -> unit-norm class embeddings float32 [B, P, text width]."""
        return _normalize(self.dense0(image_features).astype(jnp.float32))

    def __call__(self, image_features: jax.Array, query_embeddings: jax.Array,
                 query_mask: jax.Array) -> jax.Array:
        """Logits float32 [B, P, Q] of image_features [B, P, vision width] against query_embeddings
        [B, Q, embed_dim] (embed_dim == text width); query_mask bool [B, Q], False: padding."""
        class_embeddings = self.class_embeddings(image_features)
        queries = _normalize(query_embeddings.astype(jnp.float32))
        logits = jnp.einsum("bpd,bqd->bpq", class_embeddings, queries)
        shift = self.logit_shift(image_features).astype(jnp.float32)
        scale = jax.nn.elu(self.logit_scale(image_features).astype(jnp.float32)) + 1.0
        logits = (logits + shift) * scale
        return jnp.where(query_mask[:, None, :], logits, jnp.finfo(jnp.float32).min)


def _normalize(vectors: jax.Array) -> jax.Array:
    """vectors / (norm + 1e-6) over the last dim, as transformers' class head divides."""
    return vectors / (jnp.linalg.norm(vectors, axis=-1, keepdims=True) + NORM_EPS)


class Owlv2(nnx.Module):
    """OWLv2 detector: ``owlv2`` (the CLIP towers), ``class_head``, ``box_head``,
    ``objectness_head`` and ``layer_norm`` (module docstring)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        vision_width, text_width = config.vision.width, config.text.width
        if config.embed_dim != text_width:
            raise ValueError(f"OWLv2's class head compares its {text_width}-wide (text width) image embeddings "
                             f"with query embeddings of embed_dim {config.embed_dim}; they must be equal")
        self.owlv2 = CLIP(config, rngs=rngs)
        self.class_head = ClassHead(vision_width, text_width, **kw)
        self.box_head = BoxHead(vision_width, 4, **kw)
        self.objectness_head = BoxHead(vision_width, 1, **kw)
        self.layer_norm = LayerNorm(vision_width, eps=config.vision.layer_norm_eps, **kw)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float32 [B, S, S, 3] normalized -> image features [B, P, vision width]
        (transformers' ``image_embeds`` feature map, flattened over the grid)."""
        tokens = self.owlv2.vision_model.tokens(pixel_values)
        return self.layer_norm(tokens[:, 1:] * tokens[:, :1])

    def query_embeddings(self, query_ids: jax.Array) -> jax.Array:
        """query_ids int32 [B, Q, L] -> unit-norm query embeddings float32 [B, Q, embed_dim]."""
        batch, queries, length = query_ids.shape
        ids = query_ids.reshape(batch * queries, length)
        tokens = self.owlv2.text_model.tokens(ids)
        # OWL-ViT pools at the largest id (the EOT token of its tokenizer) whatever the config's eos id.
        pooled = jnp.take_along_axis(tokens, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
        embeddings = self.owlv2.text_projection(pooled).astype(jnp.float32)
        embeddings = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
        return embeddings.reshape(batch, queries, -1)

    def query_mask(self, query_ids: jax.Array) -> jax.Array:
        """query_ids [B, Q, L] -> bool [B, Q]: False for a padding query (its first token is padding,
        transformers' rule for its pad id 0)."""
        return query_ids[..., 0] != self.config.text.pad_token_id

    def boxes(self, image_features: jax.Array) -> jax.Array:
        """image_features [B, P, width] -> boxes float32 [B, P, 4] (cx, cy, w, h) in [0, 1] of the input."""
        grid = self.config.vision.grid_size
        offsets = self.box_head(image_features).astype(jnp.float32)
        return jax.nn.sigmoid(offsets + jnp.asarray(box_bias(grid, grid)))

    def objectness(self, image_features: jax.Array) -> jax.Array:
        """image_features [B, P, width] -> objectness logits float32 [B, P]."""
        return self.objectness_head(jax.lax.stop_gradient(image_features))[..., 0].astype(jnp.float32)

    def detect(self, pixel_values: jax.Array, query_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Detects the text queries in each image.

        Args:
          pixel_values: float32 [B, S, S, 3], normalized (`vlm_jax.weights.hf_owlv2.Owlv2Preprocess`).
          query_ids: int32 [B, Q, L], each image's Q tokenized queries; a query whose first token is
            the pad id (all padding) is masked.
        Returns:
          (boxes float32 [B, P, 4] (cx, cy, w, h) normalized to the square input,
           logits float32 [B, P, Q] (float32's minimum for masked queries),
           objectness logits float32 [B, P]).
        """
        features = self.image_features(pixel_values)
        logits = self.class_head(features, self.query_embeddings(query_ids), self.query_mask(query_ids))
        return self.boxes(features), logits, self.objectness(features)
