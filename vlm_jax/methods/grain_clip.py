"""GRAIN: "Grounding Descriptions in Images Informs Zero-Shot Visual Recognition" (Halbe et al.; WACV 2026).

A CLIP whose image side is a DETR-style decoder over the image tower's tokens (`models.regions`):
R region queries predict boxes and region embeddings, one image query the global image embedding.
Per image, the region queries are matched to its annotated boxes (Hungarian, on the last decoder
layer, cost `match_l1` * L1 + `match_giou` * (-GIoU) in cx, cy, w, h / x0, y0, x1, y1), and

    L = caption_weight * L_image-caption      symmetric InfoNCE over the global batch (the shared loss)
      + box_l1_weight * L1 + box_giou_weight * (1 - GIoU)        on matched boxes, mean over boxes
      + region_weight * L_region-description  each matched region embedding classified against the
                                              descriptions of its local batch (shared temperature)

The local batch is `region_group` consecutive examples (0: the per-device batch, as the paper's
per-GPU batch). Fixing the group, not the device count, makes the loss the same on 1 or 8 devices.
Two descriptions with the same tokens are the same text: a region's duplicates are not its
negatives (Shapes World's frequent entities repeat many times in a batch).

Annotations: per-example boxes and descriptions through the shared pipeline (`data.regions_key`):
Shapes World's ground-truth regions, or a JSONL annotation file (`grain.annotations`, written by the
`annotate` task or by any external detector + MLLM pipeline), joined by example id
(`AnnotatedSource`). Zero-shot by description: the `descriptions` evaluator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from vlm_jax.config_lib import ConfigError, check_fields, require_path
from vlm_jax.methods.clip import ClipMethod, clamped_scale, softmax_contrastive_loss
from vlm_jax.models import boxes as box_ops
from vlm_jax.models.layers import l2_normalize
from vlm_jax.models.regions import GrainCLIP, RegionDecoderConfig

# Decoder fields a run may set; token_width and embed_dim come from the CLIP.
DECODER_FIELDS = tuple(field.name for field in dataclasses.fields(RegionDecoderConfig)
                       if field.name not in ("token_width", "embed_dim", "dtype", "param_dtype"))


def grain_config() -> ml_collections.ConfigDict:
    """`config.grain`: the decoder, the matching and the loss weights (paper values)."""
    decoder = {name: getattr(RegionDecoderConfig(), name) for name in DECODER_FIELDS}
    return ml_collections.ConfigDict({
        "decoder": decoder,
        "match_l1": 5.0, "match_giou": 2.0,  # matching cost
        "caption_weight": 1.0, "box_l1_weight": 1.5, "box_giou_weight": 1.5, "region_weight": 1.0,
        "region_group": 0,  # examples per region-description softmax (0: the per-device batch)
        "annotations": "",  # JSONL annotation file(s) joined by data.id_key into data.regions_key ("": the data's own)
        "annotation_captions": False,  # train on each annotation's "caption" (the original or its rewrite)
    })


def decoder_config(section, clip_config=None, dtype: str = "float32", param_dtype: str = "float32",
                   where: str = "grain.decoder") -> RegionDecoderConfig:
    """`grain.decoder` as the `RegionDecoderConfig` over the tokens and into the embedding space of
    `clip_config` (None: the defaults', to check the section alone); a bad value is a one-line ConfigError."""
    fields = {name: section[name] for name in DECODER_FIELDS}
    if clip_config is not None:
        fields.update(token_width=clip_config.vision.width, embed_dim=clip_config.embed_dim)
    try:
        return RegionDecoderConfig(dtype=dtype, param_dtype=param_dtype, **fields)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


class AnnotatedSource:
    """Records of `source` with their annotation (by id) in `key`, in the TFDS layout the decoder
    reads ({"bbox": (ymin, xmin, ymax, xmax) normalized, "description"}); a record without one gets
    no boxes. With `caption_key`, the annotation's caption (else the record's `fallback_key`)."""

    def __init__(self, source, annotations, *, id_key: str, key: str, caption_key: str = "", fallback_key: str = ""):
        from vlm_jax.mllm.recaption import normalize_id  # noqa: PLC0415

        self.source, self.annotations, self.normalize = source, annotations, normalize_id
        self.id_key, self.key, self.caption_key, self.fallback_key = id_key, key, caption_key, fallback_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        record = dict(self.source[index])
        annotation = self.annotations.get(self.normalize(record.get(self.id_key)))
        boxes = np.zeros((0, 4), np.float32) if annotation is None else np.asarray(annotation.boxes, np.float32)
        record[self.key] = {"bbox": list(boxes[:, [1, 0, 3, 2]]),
                            "description": list(annotation.descriptions) if annotation is not None else []}
        if self.caption_key:
            caption = annotation.caption if annotation is not None else None
            record[self.caption_key] = caption or record.get(self.fallback_key)
        return record


def matched(outputs_boxes, outputs_regions, gt_boxes, gt_mask, *, l1: float, giou: float):
    """(matched boxes [B, N, 4], matched region embeddings [B, N, D]) of the queries the Hungarian
    matching assigns to each ground-truth box (padded rows: arbitrary queries, to be masked)."""
    cost = box_ops.matching_cost(jax.lax.stop_gradient(outputs_boxes), gt_boxes, l1_weight=l1, giou_weight=giou)
    index = box_ops.hungarian_match(cost, gt_mask)
    take = lambda values: jnp.take_along_axis(values, index[..., None], axis=1)  # noqa: E731
    return take(outputs_boxes), take(outputs_regions)


def box_losses(pred, gt, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(L1 summed over the 4 coordinates, 1 - GIoU, IoU) per matched box, means over the valid ones."""
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    l1 = jnp.sum(jnp.abs(pred - gt), axis=-1)
    pred_xyxy, gt_xyxy = box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(gt)
    giou = jnp.diagonal(box_ops.generalized_box_iou(pred_xyxy, gt_xyxy), axis1=-2, axis2=-1)
    iou = jnp.diagonal(box_ops.pairwise_iou(pred_xyxy, gt_xyxy), axis1=-2, axis2=-1)
    mean = lambda values: jnp.sum(values * mask) / count  # noqa: E731
    return mean(l1), mean(1.0 - giou), mean(iou)


def region_description_loss(regions, descriptions, ids, mask, logit_scale, group: int) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy): each valid region embedding [B, N, D] classified against the valid descriptions
    [B, N, D] of its group of `group` examples; `ids` [B, N, L] tell equal texts apart from negatives."""
    batch, count = mask.shape
    if batch % group:
        raise ConfigError(f"grain.region_group={group} does not divide the batch of {batch}.")
    shape = (batch // group, group * count)
    regions = l2_normalize(regions).reshape(*shape, -1)
    descriptions = l2_normalize(descriptions).reshape(*shape, -1)
    ids, mask = ids.reshape(*shape, -1), mask.reshape(shape)
    logits = clamped_scale(logit_scale) * jnp.einsum("gid,gjd->gij", regions, descriptions)
    same_text = jnp.all(ids[:, :, None, :] == ids[:, None, :, :], axis=-1)
    # A row's own column always counts (a padding row then has one finite logit and no NaN to
    # mask); its duplicates and the padding columns never do.
    own = jnp.eye(shape[1], dtype=bool)[None]
    columns = own | (mask[:, None, :] & ~same_text)
    logits = jnp.where(columns, logits, -1e9)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_row = -jnp.diagonal(log_probs, axis1=-2, axis2=-1)
    weights = mask.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = jnp.argmax(logits, axis=-1) == jnp.arange(shape[1])[None]
    return jnp.sum(jnp.where(mask, per_row, 0.0)) / total, jnp.sum(correct * weights) / total


class GrainMethod(ClipMethod):
    """GRAIN pre-training (the trainer's method "grain"): ClipMethod's fields, `grain` (`grain_config`)
    and a data section with `regions_key` set. Export: `<workdir>/export/clip` (the towers, a Hugging
    Face CLIP directory) and `<workdir>/export/regions` (the decoder); `load_grain` reads both."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._grain = grain_config()
        self._group = 1

    def check_config(self, config) -> None:
        super().check_config(config)
        check_fields(config.grain, grain_config(), "grain")
        decoder_config(config.grain.decoder)
        if not config.data.regions_key:
            raise ConfigError("data.regions_key is empty: GRAIN trains on per-example boxes; set it to the field with "
                              "them (Shapes World: 'regions').")
        if config.grain.annotations:
            require_path(config.grain.annotations, "the annotation file", field="grain.annotations")
        for name in ("caption_weight", "box_l1_weight", "box_giou_weight", "region_weight", "match_l1", "match_giou"):
            if float(config.grain[name]) < 0:
                raise ConfigError(f"grain.{name}={config.grain[name]} is negative.")
        if config.loss != "softmax":
            raise ConfigError(f"GRAIN's caption loss is the softmax InfoNCE; loss={config.loss!r} is not supported.")

    def create_model(self, config, rngs):
        clip = super().create_model(config, rngs)
        model = GrainCLIP(clip, decoder_config(config.grain.decoder, clip.config, config.model.dtype,
                                               config.model.param_dtype), rngs=rngs)
        return model

    def constants(self, config, mesh):
        super().constants(config, mesh)
        self._grain = config.grain
        group = int(config.grain.region_group)
        if not group:
            shards = 1 if mesh is None else int(np.prod([mesh.shape[axis] for axis in config.sharding.batch_axes
                                                         if axis in mesh.shape]))
            group = max(1, int(config.global_batch_size) // shards)
        self._group = group
        return None

    def loss_fn(self, model: GrainCLIP, batch, constants, rng):
        del constants, rng
        grain = self._grain
        outputs = model.decode(batch["image"])
        text = model.encode_text(batch["text_ids"])
        caption_loss, metrics = softmax_contrastive_loss(outputs.image, text, model.logit_scale[...],
                                                         mesh=self._mesh, axis=self._batch_axes)
        metrics = {"caption_loss": caption_loss, "logit_scale": metrics.pop("scale"), **metrics}
        mask = batch["box_mask"]
        boxes, regions = matched(outputs.boxes, outputs.regions, batch["boxes"], mask,
                                 l1=float(grain.match_l1), giou=float(grain.match_giou))
        l1, giou, iou = box_losses(boxes, batch["boxes"], mask)
        ids = batch["region_ids"]
        descriptions = model.encode_text(ids.reshape(-1, ids.shape[-1])).reshape(*ids.shape[:2], -1)
        region_loss, accuracy = region_description_loss(regions, descriptions, ids, mask, model.logit_scale[...],
                                                        self._group)
        loss = (float(grain.caption_weight) * caption_loss + float(grain.box_l1_weight) * l1
                + float(grain.box_giou_weight) * giou + float(grain.region_weight) * region_loss)
        metrics.update({"box_l1": l1, "box_giou_loss": giou, "box_iou": iou, "region_loss": region_loss,
                        "region_accuracy": accuracy, "boxes_per_image": jnp.mean(jnp.sum(mask, axis=1))})
        return loss, metrics

    def train_source(self, config):
        data, source = super().train_source(config)
        if not config.grain.annotations:
            return data, source
        from vlm_jax.data import pipeline  # noqa: PLC0415
        from vlm_jax.data.annotations import read_annotations  # noqa: PLC0415

        caption_key = "annotation_caption" if config.grain.annotation_captions else ""
        source = AnnotatedSource(source if source is not None else pipeline.make_source(data),
                                 read_annotations(config.grain.annotations), id_key=data.id_key,
                                 key=data.regions_key, caption_key=caption_key, fallback_key=data.text_keys[0])
        if caption_key:
            data = ml_collections.ConfigDict(data.to_dict())
            data.text_keys, data.text_weights = (caption_key,), None
        return data, source

    def export(self, model: GrainCLIP, workdir):
        from vlm_jax.weights import heads, save_pretrained  # noqa: PLC0415

        export = epath.Path(workdir) / "export"
        save_pretrained(model.clip, export / "clip", tokenizer=self._tokenizer, preprocess=self._preprocess)
        heads.save_head(model, export / "regions", dataclasses.asdict(model.regions.config), include="regions/")


def load_grain(directory) -> tuple[GrainCLIP, Any]:
    """(the GrainCLIP `GrainMethod.export` wrote to `directory`, its `Pretrained` CLIP bundle with the
    tokenizer and preprocessing)."""
    from vlm_jax.weights import heads, load_pretrained  # noqa: PLC0415

    directory = epath.Path(directory)
    pretrained = load_pretrained(directory / "clip")
    config = RegionDecoderConfig(**heads.read_head_config(directory / "regions"))
    model = GrainCLIP(pretrained.model, config, rngs=nnx.Rngs(0))
    heads.load_head(model, directory / "regions", include="regions/")
    return model, pretrained


# Fields of the experiment that its runs do not read.
EXPERIMENT_ONLY = ("clip_config", "cache_dir", "mllm", "mllm_config", "annotate", "seeds", "variants",
                   "variant_labels", "table", "row_order", "baseline_label", "preset", "region_evals")
PIPELINE = "pipeline"  # grain.annotations of a row trained on the `annotate` stage's output


def check_grain_experiment(config) -> None:
    """Every field of the experiment, variants included, and the paths it names, before any work."""
    from vlm_jax.config_lib import require_data_files, require_eval_files  # noqa: PLC0415
    from vlm_jax.methods import runner  # noqa: PLC0415
    from vlm_jax.methods.clip import model_config_dict  # noqa: PLC0415
    from vlm_jax.mllm import annotate as annotate_lib  # noqa: PLC0415
    from vlm_jax.mllm.config import mllm_config  # noqa: PLC0415
    from vlm_jax.models.clip import CLIPConfig  # noqa: PLC0415

    check_fields(config, runner.experiment_schema(
        grain=grain_config(), annotate=annotate_lib.annotate_config(), mllm=mllm_config(), mllm_config="",
        model=model_config_dict(CLIPConfig()), tokenizer_dir="", loss="softmax", label_smoothing=0.0,
        named_caption_weight=0.0, text_context_length=0, text_trainable_layers=-1, region_evals=()))
    for name, variant in runner.variant_configs(config, config).items():
        check_fields(variant.grain, grain_config(), f"variants.{name}.grain")
        decoder_config(variant.grain.decoder, where=f"variants.{name}.grain.decoder")
        if variant.method not in ("grain", "clip"):
            raise ConfigError(f"variants.{name}.method={variant.method!r} is not 'grain' or 'clip'.")
        if variant.method == "grain" and not variant.data.regions_key:
            raise ConfigError(f"variants.{name}: data.regions_key is empty; GRAIN rows train on boxes.")
        annotations = variant.grain.annotations
        if annotations and annotations != PIPELINE:
            require_path(annotations, "the annotation file", field=f"variants.{name}.grain.annotations")
    missing = [name for name in config.region_evals if name not in config.evals]
    if missing:
        raise ConfigError(f"region_evals names {missing}, which config.evals lacks.")
    if _uses_pipeline(config):
        annotate_lib.check_annotate_config(_annotate_task(config))
    require_data_files(config.data, "data")
    require_eval_files(config.evals)
    from vlm_jax.evaluate.suite import check_among  # noqa: PLC0415

    check_among(config.evals)


def _annotate_task(config) -> ml_collections.ConfigDict:
    """The `annotate` task config of the experiment's annotation stage."""
    return ml_collections.ConfigDict({name: config[name].to_dict() if hasattr(config[name], "to_dict") else config[name]
                                      for name in ("annotate", "mllm", "mllm_config", "data_dir", "cache_dir")})


def _uses_pipeline(config) -> bool:
    from vlm_jax.methods import runner  # noqa: PLC0415

    return any(variant.grain.annotations == PIPELINE for variant in runner.variant_configs(config, config).values())


def _run_config(config, variant, context) -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict(variant.to_dict())
    run.task, run.clip_dir = "train", context["clip_dir"]
    if run.grain.annotations == PIPELINE:
        run.grain.annotations = context["annotations"]
    if run.method == "clip":  # the same data and steps, without boxes or the region evaluators
        run.data.regions_key = ""
        del run["grain"]
        for name in config.region_evals:
            del run.evals[name]
    for name in [name for name in run if name in EXPERIMENT_ONLY]:
        del run[name]
    return run


def grain_task(config, workdir) -> dict[str, float]:
    """The `grain` task (experiments/grain_clip.py): the base CLIP (cached), the annotation pipeline
    when a row trains on its output (`vlm_jax.mllm.annotate`, into <workdir>/annotations), then every
    row x seed (GRAIN and the same-budget CLIP) through the shared runner, and one table."""
    from vlm_jax.methods import runner  # noqa: PLC0415
    from vlm_jax.train.trainer import train  # noqa: PLC0415

    workdir = epath.Path(workdir)
    check_grain_experiment(config)

    def stages(steps):
        # From scratch (the real presets) when neither clip_dir nor clip_config names a base CLIP.
        clip_dir = steps.run("clip", lambda: runner.base_model_dir(config, workdir)) \
            if config.clip_dir or config.clip_config else ""
        annotations = ""
        if _uses_pipeline(config):
            from vlm_jax.mllm import annotate as annotate_lib  # noqa: PLC0415

            task = _annotate_task(config)
            if task.mllm.backend == "embedded" and not task.mllm.model_dir:
                task.mllm.model_dir = steps.run("mllm", lambda: runner.captioner_dir(config))
            directory = workdir / "annotations"
            steps.run("annotate", lambda: annotate_lib.annotate_dir(task, directory))
            annotations = str(directory)
        return {"clip_dir": clip_dir, "annotations": annotations}

    baseline_evals = ml_collections.ConfigDict({name: spec for name, spec in config.evals.items()
                                                if name not in config.region_evals})
    return runner.run_experiment(
        config, workdir, None, stages=stages,
        run_config=lambda variant, context: _run_config(config, variant, context),
        baseline_metrics=lambda context: runner.baseline(baseline_evals, context["clip_dir"]) if context["clip_dir"]
        else {},
        run=lambda run, run_dir: train(run, run_dir, GrainMethod() if run.method == "grain" else ClipMethod()))
