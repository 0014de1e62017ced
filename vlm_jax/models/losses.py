"""Contrastive losses of two-tower models: CLIP's softmax InfoNCE and SigLIP's sigmoid loss.

Both losses take projected embeddings, L2-normalize them (so callers may pass raw projections or
already-normalized ones), and a log-space temperature `logit_scale` whose exponential is clamped at
`max_scale` (100, as in CLIP) so the learnable temperature cannot run away.

With `mesh=None` the dense forms run: the full [B, B] logits matrix, as in the papers' pseudo-code.
They are the reference the sharded forms are tested against, and fine on one device.

With a mesh, the batch is split over `axis` (the data axes) and each device only ever holds its own
rows of the logits:
- softmax: `jax.shard_map` all-gathers both modalities' embeddings, O(B x D) and cheap, and each device
  computes its [B_local, B] slice of the image->text and text->image logits; the gather's transpose
  (a reduce-scatter) carries gradients back to every shard, so this is the exact global-batch loss.
- sigmoid: every pair is an independent binary term, so no row needs the whole batch at once. Text
  chunks travel around a ring of devices with `jax.lax.ppermute` (the SigLIP paper's chunked loss);
  each step scores one [B_local, B_local] block. Blocks are rematerialized in the backward pass, so
  memory stays O(B_local^2) for logits plus the rotating [B_local, D] chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlm_jax.models.layers import l2_normalize

# Mesh axes a global batch is split over (the trainer's data-parallel axes).
DEFAULT_BATCH_AXES = ("data", "fsdp")


def clamped_scale(logit_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """exp(logit_scale) capped at `max_scale`; no gradient flows through the cap once reached."""
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), math.log(max_scale)))


def _axis_tuple(axis: str | Sequence[str]) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _shard_count(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[name] for name in axes)


def _smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-row cross entropy [N] of logits [N, C] against integer targets [N] with uniform smoothing."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    if not label_smoothing:
        return -target_log_probs
    return -(1.0 - label_smoothing) * target_log_probs - label_smoothing * jnp.mean(log_probs, axis=-1)


def _with_negatives(image_to_text: jax.Array, images: jax.Array, negatives: jax.Array | None,
                    negative_mask: jax.Array | None, scale: jax.Array) -> jax.Array:
    """Image -> text logits [N, B] extended by the hard negatives' columns [N, B + B_neg] (unit
    `negatives` [B_neg, D]; masked-out negatives score -inf, so they never count)."""
    if negatives is None:
        return image_to_text
    negative_logits = scale * images @ l2_normalize(negatives).T
    if negative_mask is not None:
        negative_logits = jnp.where(jnp.asarray(negative_mask, bool)[None, :], negative_logits, -jnp.inf)
    return jnp.concatenate([image_to_text, negative_logits], axis=1)


# --------------------------------------------------------------------------------------------------
# Softmax contrastive loss (CLIP, symmetric InfoNCE)
# --------------------------------------------------------------------------------------------------


def softmax_contrastive_loss_dense(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    label_smoothing: float = 0.0,
    max_scale: float = 100.0,
    negatives: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE with the full [B, B] logits matrix (the reference form).

    Args:
      image_emb, text_emb: [B, D] embeddings of matching pairs (row i of each belongs together).
      logit_scale: scalar, log of the inverse temperature.
      label_smoothing: mass spread uniformly over all B candidates.
      max_scale: cap on exp(logit_scale).
      negatives, negative_mask: optional [B, D] hard-negative text embeddings (NegCLIP) and bool [B]
        (False: example i has none). Each image is then classified against the B texts and every
        real negative of the batch; the text -> image direction is unchanged.

    Returns:
      (loss, metrics): scalar float32 mean of the image->text and text->image cross entropies;
      metrics has "i2t_accuracy", "t2i_accuracy" (in-batch top-1) and "scale".
    """
    images, texts = l2_normalize(image_emb), l2_normalize(text_emb)
    scale = clamped_scale(logit_scale, max_scale)
    logits = scale * images @ texts.T
    targets = jnp.arange(logits.shape[0])
    image_to_text = _with_negatives(logits, images, negatives, negative_mask, scale)
    loss = 0.5 * (
        jnp.mean(_smoothed_cross_entropy(image_to_text, targets, label_smoothing))
        + jnp.mean(_smoothed_cross_entropy(logits.T, targets, label_smoothing))
    )
    metrics = {
        "i2t_accuracy": jnp.mean(jnp.argmax(image_to_text, axis=1) == targets),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == targets),
        "scale": scale,
    }
    return loss, metrics


def softmax_contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    axis: str | Sequence[str] = DEFAULT_BATCH_AXES,
    max_scale: float = 100.0,
    negatives: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch; each device builds only its [B_local, B] logits.

    Args:
      image_emb, text_emb: [B, D] global embeddings, split over `axis` of `mesh` on the batch dim
        (any dtype; computed in float32). B must divide by the number of shards.
      logit_scale: scalar, log of the inverse temperature (replicated).
      label_smoothing: mass spread uniformly over all B candidates.
      mesh: the device mesh; None runs the dense reference form.
      axis: mesh axes the batch is split over.
      max_scale: cap on exp(logit_scale).
      negatives, negative_mask: hard negatives as in `softmax_contrastive_loss_dense`, split like
        the batch; all-gathered with the texts, so every image meets every negative of the global batch.

    Returns:
      (loss, metrics) as `softmax_contrastive_loss_dense`, replicated scalars.
    """
    if mesh is None:
        return softmax_contrastive_loss_dense(
            image_emb, text_emb, logit_scale, label_smoothing=label_smoothing, max_scale=max_scale,
            negatives=negatives, negative_mask=negative_mask,
        )
    if negatives is not None and negative_mask is None:
        negative_mask = jnp.ones(negatives.shape[0], bool)
    axes = _axis_tuple(axis)
    global_batch = image_emb.shape[0]
    _check_divisible(global_batch, _shard_count(mesh, axes), axes)
    rows = PartitionSpec(axes, None)

    with_negatives = negatives is not None
    negative_inputs = (negatives, negative_mask) if with_negatives else ()
    negative_specs = (rows, PartitionSpec(axes)) if with_negatives else ()

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(rows, rows, PartitionSpec(), *negative_specs), out_specs=PartitionSpec()
    )
    def local_loss(local_images, local_texts, log_scale, *local_negatives):
        images, texts = l2_normalize(local_images), l2_normalize(local_texts)
        scale = clamped_scale(log_scale, max_scale)
        all_images = jax.lax.all_gather(images, axes, tiled=True)
        all_texts = jax.lax.all_gather(texts, axes, tiled=True)
        local_batch = images.shape[0]
        targets = jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)
        image_to_text = scale * images @ all_texts.T
        if local_negatives:
            all_negatives = jax.lax.all_gather(l2_normalize(local_negatives[0]), axes, tiled=True)
            all_mask = jax.lax.all_gather(local_negatives[1], axes, tiled=True)
            image_to_text = _with_negatives(image_to_text, images, all_negatives, all_mask, scale)
        text_to_image = scale * texts @ all_images.T
        loss_sum = jnp.sum(_smoothed_cross_entropy(image_to_text, targets, label_smoothing)) + jnp.sum(
            _smoothed_cross_entropy(text_to_image, targets, label_smoothing)
        )
        correct = jnp.stack(
            [
                jnp.sum(jnp.argmax(image_to_text, axis=1) == targets),
                jnp.sum(jnp.argmax(text_to_image, axis=1) == targets),
            ]
        ).astype(jnp.float32)
        loss_sum, correct = jax.lax.psum((loss_sum, correct), axes)
        return loss_sum / (2 * global_batch), correct / global_batch, scale

    loss, accuracy, scale = local_loss(image_emb, text_emb, logit_scale, *negative_inputs)
    return loss, {"i2t_accuracy": accuracy[0], "t2i_accuracy": accuracy[1], "scale": scale}


# --------------------------------------------------------------------------------------------------
# Sigmoid loss (SigLIP)
# --------------------------------------------------------------------------------------------------


def sigmoid_loss_dense(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    max_scale: float = 100.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pairwise sigmoid loss with the full [B, B] logits matrix (the reference form).

    loss = -1/B * sum_ij log sigmoid(z_ij * (scale * <x_i, y_j> + bias)), z_ij = +1 if i == j else -1.

    Args:
      image_emb, text_emb: [B, D] embeddings of matching pairs.
      logit_scale: scalar, log of the scale (SigLIP initializes it at log 10).
      logit_bias: scalar bias (SigLIP initializes it at -10).
      max_scale: cap on exp(logit_scale).

    Returns:
      (loss, metrics): scalar float32; metrics "i2t_accuracy", "t2i_accuracy", "scale", "bias".
    """
    images, texts = l2_normalize(image_emb), l2_normalize(text_emb)
    scale = clamped_scale(logit_scale, max_scale)
    bias = jnp.asarray(logit_bias, jnp.float32)
    logits = scale * images @ texts.T + bias
    signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
    targets = jnp.arange(logits.shape[0])
    metrics = {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == targets),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == targets),
        "scale": scale,
        "bias": bias,
    }
    return loss, metrics


def sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    mesh: Mesh | None = None,
    axis: str | Sequence[str] = DEFAULT_BATCH_AXES,
    max_scale: float = 100.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's pairwise sigmoid loss over the global batch, computed on a ring of devices.

    Every pair (i, j) is an independent binary term, so the loss is a sum of [B_local, B_local]
    blocks: each device keeps its images and passes text chunks to its ring neighbour n times.
    Positives (the diagonal) sit only in the block a device scores against its own texts, so every
    block is scored as all-negative and the diagonal is corrected once, using
    log sigmoid(x) - log sigmoid(-x) = x.

    Args:
      image_emb, text_emb: [B, D] global embeddings, split over `axis` of `mesh` on the batch dim.
      logit_scale, logit_bias: scalars (replicated), as in `sigmoid_loss_dense`.
      mesh: the device mesh; None runs the dense reference form.
      axis: mesh axes the batch is split over.
      max_scale: cap on exp(logit_scale).

    Returns:
      (loss, metrics) as `sigmoid_loss_dense`, replicated scalars.
    """
    if mesh is None:
        return sigmoid_loss_dense(image_emb, text_emb, logit_scale, logit_bias, max_scale=max_scale)
    axes = _axis_tuple(axis)
    shards = _shard_count(mesh, axes)
    global_batch = image_emb.shape[0]
    _check_divisible(global_batch, shards, axes)
    rows = PartitionSpec(axes, None)
    ring = [(source, (source + 1) % shards) for source in range(shards)]

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(rows, rows, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    def local_loss(local_images, local_texts, log_scale, bias):
        images, texts = l2_normalize(local_images), l2_normalize(local_texts)
        scale = clamped_scale(log_scale, max_scale)
        bias = bias.astype(jnp.float32)
        local_batch = images.shape[0]
        shard = jax.lax.axis_index(axes)
        own_rows = shard * local_batch + jnp.arange(local_batch)

        @jax.checkpoint
        def negative_block(chunk):
            logits = scale * images @ chunk.T + bias
            return -jnp.sum(jax.nn.log_sigmoid(-logits)), jax.lax.stop_gradient(logits)

        def step(carry, hop):
            chunk, loss_sum, image_best, text_best = carry
            block_loss, logits = negative_block(chunk)
            # After `hop` passes along the ring this chunk came from shard (shard - hop).
            chunk_rows = ((shard - hop) % shards) * local_batch + jnp.arange(local_batch)
            image_best = _keep_best(image_best, logits.max(axis=1), chunk_rows[jnp.argmax(logits, axis=1)])
            text_best = _keep_best(text_best, logits.max(axis=0), own_rows[jnp.argmax(logits, axis=0)])
            # The chunk's per-text best match travels with it, so it is complete when the chunk is home.
            chunk, text_best = jax.lax.ppermute((chunk, text_best), axes, ring)
            return (chunk, loss_sum + block_loss, image_best, text_best), None

        no_match = (jnp.full((local_batch,), -jnp.inf), jnp.zeros((local_batch,), jnp.int32))
        # The running sums and best matches differ per shard from the first step on.
        initial = jax.lax.pcast((jnp.zeros((), jnp.float32), no_match, no_match), axes, to="varying")
        carry = (texts, *initial)
        (_, loss_sum, image_best, text_best), _ = jax.lax.scan(step, carry, jnp.arange(shards))
        positives = scale * jnp.sum(images * texts, axis=1) + bias
        loss_sum = loss_sum - jnp.sum(positives)
        correct = jnp.stack([jnp.sum(image_best[1] == own_rows), jnp.sum(text_best[1] == own_rows)])
        loss_sum, correct = jax.lax.psum((loss_sum, correct.astype(jnp.float32)), axes)
        return loss_sum / global_batch, correct / global_batch, scale, bias

    loss, accuracy, scale, bias = local_loss(image_emb, text_emb, logit_scale, logit_bias)
    return loss, {"i2t_accuracy": accuracy[0], "t2i_accuracy": accuracy[1], "scale": scale, "bias": bias}


def _keep_best(best: tuple[jax.Array, jax.Array], scores: jax.Array, indices: jax.Array):
    """Running (max score, its global index) per row; on a tie the first block visited keeps it."""
    best_scores, best_indices = best
    better = scores > best_scores
    return jnp.where(better, scores, best_scores), jnp.where(better, indices, best_indices)


def _check_divisible(global_batch: int, shards: int, axes: tuple[str, ...]) -> None:
    if global_batch % shards:
        raise ValueError(
            f"Global batch {global_batch} does not split over the {shards} shards of mesh axes {axes}; "
            f"use a batch size that is a multiple of {shards}."
        )


# --------------------------------------------------------------------------------------------------
# The plain CLIP / SigLIP pre-training method (the trainer's `Method` protocol)
# --------------------------------------------------------------------------------------------------
