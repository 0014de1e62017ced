"""Plain CLIP / SigLIP pre-training: the contrastive losses over the global batch (softmax for CLIP,
sigmoid for SigLIP) and `ClipMethod`, the trainer's method for this task (bottom of the file).

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

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import Mesh, PartitionSpec

from vlm_jax.config_lib import ConfigError, require_data_files, require_eval_files, require_path
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlm_jax.models.layers import l2_normalize

DEFAULT_BATCH_AXES = ("data", "fsdp")
# What `vlm_jax.data.tokenizer.Tokenizer.from_dir` reads a tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE with the full [B, B] logits matrix (the reference form).

    Args:
      image_emb, text_emb: [B, D] embeddings of matching pairs (row i of each belongs together).
      logit_scale: scalar, log of the inverse temperature.
      label_smoothing: mass spread uniformly over all B candidates.
      max_scale: cap on exp(logit_scale).

    Returns:
      (loss, metrics): scalar float32 mean of the image->text and text->image cross entropies;
      metrics has "i2t_accuracy", "t2i_accuracy" (in-batch top-1) and "scale".
    """
    images, texts = l2_normalize(image_emb), l2_normalize(text_emb)
    scale = clamped_scale(logit_scale, max_scale)
    logits = scale * images @ texts.T
    targets = jnp.arange(logits.shape[0])
    loss = 0.5 * (
        jnp.mean(_smoothed_cross_entropy(logits, targets, label_smoothing))
        + jnp.mean(_smoothed_cross_entropy(logits.T, targets, label_smoothing))
    )
    metrics = {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == targets),
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

    Returns:
      (loss, metrics) as `softmax_contrastive_loss_dense`, replicated scalars.
    """
    if mesh is None:
        return softmax_contrastive_loss_dense(
            image_emb, text_emb, logit_scale, label_smoothing=label_smoothing, max_scale=max_scale
        )
    axes = _axis_tuple(axis)
    global_batch = image_emb.shape[0]
    _check_divisible(global_batch, _shard_count(mesh, axes), axes)
    rows = PartitionSpec(axes, None)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(rows, rows, PartitionSpec()), out_specs=PartitionSpec()
    )
    def local_loss(local_images, local_texts, log_scale):
        images, texts = l2_normalize(local_images), l2_normalize(local_texts)
        scale = clamped_scale(log_scale, max_scale)
        all_images = jax.lax.all_gather(images, axes, tiled=True)
        all_texts = jax.lax.all_gather(texts, axes, tiled=True)
        local_batch = images.shape[0]
        targets = jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)
        image_to_text = scale * images @ all_texts.T
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

    loss, accuracy, scale = local_loss(image_emb, text_emb, logit_scale)
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


def model_config_dict(config: CLIPConfig) -> ml_collections.ConfigDict:
    """A `CLIPConfig` as the nested `config.model` section of an experiment (every field overridable)."""
    return ml_collections.ConfigDict(dataclasses.asdict(config))


def _is_shapes_world(data_config) -> bool:
    return str(data_config.get("tfds_name", "") or "").startswith("shapes_world") or data_config.get("dataset") == "shapes_world"


def _shapes_world_build(data_config) -> str:
    name = str(data_config.get("tfds_name", "") or "shapes_world/default")
    return name.split("/", 1)[1].split(":")[0] if "/" in name else "default"


class NamedCaptionSource:
    """Shapes World records with a "named_caption": the weak caption's naming, as a short caption.

    Where a record's `weak_caption` contains the name of its main object's entity, "named_caption"
    is one of the dataset's prompt templates filled with that name ("a photo of a zorvid."), chosen
    by record index; elsewhere it is the weak caption itself. No entity is named more often than the
    weak captions name it (rare entities stay rare); only the wording changes, from a bag of words
    to the short "a photo of a ..." alt-text that web data has and that zero-shot prompts use.
    """

    def __init__(self, source, class_names, templates):
        self.source, self.class_names, self.templates = source, tuple(class_names), tuple(templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        record = dict(self.source[index])
        weak = record.get("weak_caption")
        weak = weak.decode("utf-8") if isinstance(weak, bytes) else str(weak)
        name = self.class_names[int(record["label"])]
        named = name in weak.split()
        record["named_caption"] = self.templates[index % len(self.templates)].format(name) if named else weak
        return record


class ClipMethod:
    """Contrastive image-text pre-training of a two-tower model: CLIP (softmax) or SigLIP (sigmoid).

    Config fields (besides the trainer's, see `vlm_jax.train.trainer`):
      model: a `CLIPConfig` as a nested section (`model_config_dict`); the text tower's vocab_size
        and eos/pad/bos ids are taken from the tokenizer. Ignored when `clip_dir` is set, except
        model.dtype / model.param_dtype (compute and storage dtypes).
      clip_dir: a Hugging Face CLIPModel/SiglipModel directory to start from ("" = from scratch);
        its tokenizer and preprocessing are used unless `tokenizer_dir` says otherwise.
      loss: "softmax" (CLIP's symmetric InfoNCE) or "sigmoid" (SigLIP; needs a model with a logit bias).
      label_smoothing: for the softmax loss.
      tokenizer_dir: directory with tokenizer.json; "" = the clip_dir directory, else the Shapes
        World tokenizer when training on Shapes World.
      data: pipeline section (`vlm_jax.data.pipeline.default_config()`); text_keys pick the captions.
      named_caption_weight: Shapes World only; the chance that an example's caption is its
        `NamedCaptionSource` "named_caption" instead of data.text_keys[0] (0: never).
      evals: evaluator specs (`vlm_jax.evaluate.suite`).

    Export: `<workdir>/export/` in the Hugging Face format (config.json, model.safetensors,
    tokenizer and preprocessor configs), readable by `load_pretrained` and transformers.
    """

    def __init__(self, *, tokenizer=None, preprocess=None):
        self._tokenizer = tokenizer
        self._preprocess = preprocess
        self._mesh = None
        self._batch_axes = DEFAULT_BATCH_AXES
        self._loss = "softmax"
        self._label_smoothing = 0.0

    # -- pieces derived from the config ---------------------------------------------------------

    def tokenizer(self, config):
        """The text tokenizer (loaded once; see `tokenizer_dir`)."""
        if self._tokenizer is None:
            from vlm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415

            directory = config.get("tokenizer_dir") or config.get("clip_dir")
            if not directory and _is_shapes_world(config.data):
                from vlm_jax.data import shapes_world  # noqa: PLC0415

                directory = shapes_world.tokenizer_dir(config.data.data_dir, _shapes_world_build(config.data))
            if not directory:
                raise ConfigError("No tokenizer: set --config.tokenizer_dir to a directory with tokenizer.json.")
            context_length = None if config.get("clip_dir") else int(config.model.text.context_length)
            self._tokenizer = Tokenizer.from_dir(directory, context_length=context_length)
        return self._tokenizer

    def preprocess(self, config):
        """The model's `PreprocessSpec`: the clip_dir directory's, else CLIP's or SigLIP's default."""
        if self._preprocess is None:
            from vlm_jax.data.preprocess import PreprocessSpec  # noqa: PLC0415

            if config.get("clip_dir"):
                from vlm_jax.weights import load_pretrained  # noqa: PLC0415

                self._preprocess = load_pretrained(config.clip_dir).preprocess
            else:
                size = int(config.model.vision.image_size)
                self._preprocess = (PreprocessSpec.siglip(size) if config.model.kind == "siglip"
                                    else PreprocessSpec.clip(size))
        return self._preprocess

    def model_config(self, config) -> CLIPConfig:
        """The `CLIPConfig` of a from-scratch model, with the tokenizer's vocabulary and special ids."""
        fields = config.model.to_dict()
        tokenizer = self.tokenizer(config)
        text = {**fields.pop("text"), "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id}
        return CLIPConfig(vision=VisionConfig(**fields.pop("vision")), text=TextConfig(**text), **fields)

    # -- the Method protocol --------------------------------------------------------------------

    def check_config(self, config) -> None:
        """One-line ConfigErrors for the paths `config` names, before any data is built or model made:
        clip_dir (with config.json; required when optim.trainable freezes params, as LiT does), the
        tokenizer (tokenizer_dir, else clip_dir's, else Shapes World's), and the data and eval files."""
        clip_dir = config.get("clip_dir")
        if clip_dir:
            require_path(clip_dir, "clip_dir", field="clip_dir", containing=("config.json",))
        else:
            frozen = [pattern for pattern, trains in config.optim.trainable if not trains] if "optim" in config else []
            if frozen:
                raise ConfigError(f"clip_dir is not set, but optim.trainable freezes {', '.join(frozen)}: frozen params "
                                  "must come from a pretrained CLIP; pass --config.clip_dir=DIR (a Hugging Face "
                                  "CLIP/SigLIP directory).")
        if config.get("tokenizer_dir"):
            require_path(config.tokenizer_dir, "tokenizer_dir", field="tokenizer_dir", containing=TOKENIZER_FILES)
        elif clip_dir:
            if not any((epath.Path(clip_dir) / name).exists() for name in TOKENIZER_FILES):
                raise ConfigError(f"clip_dir {clip_dir!r} has no {' or '.join(TOKENIZER_FILES)} and tokenizer_dir is "
                                  "not set; pass --config.tokenizer_dir=DIR (a directory with tokenizer.json).")
        elif not _is_shapes_world(config.data):
            raise ConfigError("tokenizer_dir is not set; pass --config.tokenizer_dir=DIR (a directory with "
                              "tokenizer.json).")
        require_data_files(config.data, "data")
        require_eval_files(config.get("evals"))

    def reads_weights(self, config) -> bool:
        return bool(config.get("clip_dir"))

    def create_model(self, config, rngs):
        if config.get("clip_dir"):
            from vlm_jax.weights import load_model  # noqa: PLC0415

            model = load_model(config.clip_dir, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
        else:
            model = CLIP(self.model_config(config), rngs=rngs)
        if config.loss not in ("softmax", "sigmoid"):
            raise ConfigError(f"config.loss={config.loss!r} is not 'softmax' or 'sigmoid'.")
        if config.loss == "sigmoid" and model.logit_bias is None:
            raise ConfigError("config.loss='sigmoid' needs a model with a logit bias; set model.kind='siglip'.")
        return model

    def constants(self, config, mesh):
        # The loss needs the mesh and loss settings at trace time; they are static, not arrays.
        self._mesh = mesh
        self._batch_axes = tuple(config.sharding.batch_axes)
        self._loss, self._label_smoothing = config.loss, float(config.get("label_smoothing", 0.0))
        return None

    def loss_fn(self, model, batch, constants, rng):
        """Contrastive loss over the global batch {"image": [B, S, S, 3], "text_ids": [B, L]}."""
        del constants, rng
        image_emb = model.encode_image(batch["image"])
        text_emb = model.encode_text(batch["text_ids"])
        if self._loss == "sigmoid":
            loss, metrics = sigmoid_loss(image_emb, text_emb, model.logit_scale[...], model.logit_bias[...],
                                         mesh=self._mesh, axis=self._batch_axes)
            metrics["logit_bias"] = metrics.pop("bias")
        else:
            loss, metrics = softmax_contrastive_loss(
                image_emb, text_emb, model.logit_scale[...], label_smoothing=self._label_smoothing,
                mesh=self._mesh, axis=self._batch_axes)
        metrics["logit_scale"] = metrics.pop("scale")
        return loss, metrics

    def train_iterator(self, config, process_index, process_count):
        from vlm_jax.data import pipeline  # noqa: PLC0415

        data, source = config.data, None
        if _is_shapes_world(config.data):
            from vlm_jax.data import shapes_world  # noqa: PLC0415

            shapes_world.prepare(config.data.data_dir, _shapes_world_build(config.data))
            weight = float(config.get("named_caption_weight", 0.0))
            if weight:
                source = NamedCaptionSource(pipeline.make_source(config.data), shapes_world.class_names(),
                                            shapes_world.prompt_templates())
                data = ml_collections.ConfigDict(config.data.to_dict())
                data.text_keys = (config.data.text_keys[0], "named_caption")
                data.text_weights = (1.0 - weight, weight)
        elif config.get("named_caption_weight", 0.0):
            raise ConfigError("named_caption_weight applies to Shapes World data only; set it to 0.")
        return pipeline.make_train_iterator(
            data, self.preprocess(config), self.tokenizer(config), int(config.global_batch_size),
            int(config.seed), process_index=process_index, process_count=process_count, source=source)

    def evaluators(self, config):
        from vlm_jax.evaluate import suite  # noqa: PLC0415

        return suite.build_evaluators(config.get("evals", {}), self.preprocess(config), self.tokenizer(config))

    def export(self, model, workdir):
        from vlm_jax.weights import save_pretrained  # noqa: PLC0415

        save_pretrained(model, epath.Path(workdir) / "export", tokenizer=self._tokenizer,
                        preprocess=self._preprocess)
