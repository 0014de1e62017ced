"""GRAIN (Halbe et al.): region queries grounded in boxes and descriptions, next to the same-budget CLIP.

    python -m vlm_jax.main --config=experiments/grain_clip.py                     # Shapes World, 1 seed
    python -m vlm_jax.main --config=experiments/grain_clip.py:shapes,seeds=3      # the README's table
    python -m vlm_jax.main --config=experiments/grain_clip.py:shapes,smoke=True   # CI-sized
    python -m vlm_jax.main --config=experiments/grain_clip.py:cc3m_b16 \\
        --config.data.paths='/data/cc3m/*.array_record' --config.grain.annotations=/data/cc3m/grain.jsonl \\
        --config.tokenizer_dir=/ckpt/clip-vit-base-patch16 --config.evals.cifar10.descriptors=/data/descriptors/cifar10.json ...

What runs (`vlm_jax.methods.grain_clip.grain_task`): the base CLIP (clip_dir, else the cached CLIP of
clip_config), the annotation pipeline when a row trains on its output (`vlm_jax.mllm.annotate`), then
every row x seed through the shared runner with the same steps, batch, learning rate and captions.

Preset shapes (default): every row fine-tunes the weak-caption CLIP of experiments/clip.py (same
pretrain data: weak captions and their "a photo of a <name>." form) for the same steps:
  clip:      the plain CLIP objective;
  grain:     + the region decoder on Shapes World's ground-truth regions (boxes and descriptions);
  pipeline:  + the region decoder on the annotation pipeline's regions: the embedded captioner
             describes each ground-truth crop, so the descriptions carry the captioner's errors;
  no_box:    grain without the box loss;  no_region: grain without the region-description loss.
Every row trains on the first 6,144 pretrain images (the annotated ones) for 200 steps. Columns:
classification by description (GRAIN's rule: "a photo of a zorvid, which is a striped red star", the
class score the mean over descriptors x templates) of novel entities (never named in pre-training)
among the novel entities, the same mixed with GRAIN's region score (weight 0.5), common entities
among all 256, zero-shot by name, and box quality of the matched region queries (mean IoU,
recall@0.5) with region-description accuracy on eval_retrieval's objects.
Options: seeds=N (default 1), smoke=True (tiny models on shapes_world/test, a few steps).

Real presets (TPU): cc3m_b16 and cc12m_b16 train ViT-B/16 GRAIN from scratch with the paper's recipe
(batch 2048, AdamW (0.9, 0.98), wd 0.1 without biases, norms and temperature, lr 1e-3, one epoch of
warmup, cosine, 35 epochs) on an ArrayRecord corpus with a JSONL annotation file written by the
`annotate` task (experiments/annotate.py:cc3m) or any detector + MLLM pipeline, and classify the 11
datasets by description from descriptor files.
"""

import importlib.util
import math
import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.evaluate.suite import eval_spec
from vlm_jax.methods.grain_clip import PIPELINE, grain_config
from vlm_jax.mllm.annotate import annotate_config, shapes_world_annotate_config
from vlm_jax.mllm.config import mllm_config

PRESETS = ("shapes", "cc3m_b16", "cc12m_b16")
HERE = pathlib.Path(__file__)
# The 11 zero-shot datasets of the paper (ImageNet reported apart), by registry name.
DATASETS = ("cifar10", "cifar100", "sun397", "cars", "dtd", "pets", "caltech101", "flowers", "cub200", "places365",
            "food101")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", HERE.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(config) -> None:
    config.variants = ml_collections.ConfigDict({
        "clip": {"method": "clip"},
        "grain": {},
        "pipeline": {"grain": {"annotations": PIPELINE}},
        "no_box": {"grain": {"box_l1_weight": 0.0, "box_giou_weight": 0.0}},
        "no_region": {"grain": {"region_weight": 0.0}},
    })
    config.variant_labels = ml_collections.ConfigDict({
        "clip": "CLIP, same data and steps", "grain": "GRAIN, true regions", "pipeline": "GRAIN, pipeline regions",
        "no_box": "GRAIN without box loss", "no_region": "GRAIN without region loss"})
    config.row_order = ("clip", "grain", "pipeline", "no_box", "no_region")


def _shapes(config, smoke: bool) -> None:
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    data = dict(source="tfds", tfds_name=tfds_name, data_dir=config.get_ref("data_dir"))
    # model, data (pretrain's weak captions with named_caption_weight), batch: the base CLIP's, from
    # experiments/clip.py:shapes, whose config this one extends.
    config.clip_config = str(HERE.with_name("clip.py")) + (":shapes,smoke=True" if smoke else ":shapes")
    config.mllm_config = str(HERE.with_name("captioner.py")) + (":shapes,smoke=True" if smoke else ":shapes")
    config.data.id_key = "index"
    config.data.regions_key = "regions"
    config.data.max_regions = 4  # Shapes World scenes hold at most 4 objects
    config.data.region_context_length = 8  # descriptions are at most 6 tokens ("a striped red star" + BOS, EOS)
    config.grain.decoder.update(width=128, depth=2, heads=4, mlp_dim=256, num_regions=5, global_residual=True)

    config.data.max_examples = 64 if smoke else 6144  # every row trains on the same first pretrain images
    config.annotate = shapes_world_annotate_config(tfds_name)
    config.annotate.data.data_dir = config.get_ref("data_dir")
    config.annotate.update(limit=config.data.max_examples, batch_size=64)
    # The region descriptions only: every row keeps the same weak captions (rewrites would hand the
    # pipeline row the captioner's dense captions, a different caption source from the CLIP row's).
    config.annotate.rewrite_p = 0.0
    config.mllm.batch_size = 64

    # 200 steps of batch 128 (4 epochs of the 6,144 images) keep the default run of five rows near 25
    # minutes on 2 cores: a GRAIN step costs about 1.25 CLIP steps (the decoder and 512 short region texts).
    config.total_steps = 4 if smoke else 200
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 20
    config.optim.weight_decay = 0.1
    config.log_every = 1 if smoke else 50
    config.checkpoint.save_interval_steps = 4 if smoke else 200
    config.checkpoint.max_to_keep = 1

    shapes = _sibling("zero_shot").shapes_evals(smoke=smoke, data_dir=config.get_ref("data_dir"))
    config.evals = ml_collections.ConfigDict({"shapes": shapes.shapes})  # zero-shot by entity name
    classification = dict(data, split="eval_classification")
    by_description = dict(type="descriptions", classes="shapes_world", subsets="frequency", descriptors="builder",
                          data=classification)
    # All 256 entities: novel names were never seen, so "a photo of a <novel name>, which is ..." loses to
    # the texts of known names for every model (top1_novel ~0 there); novel entities are therefore also
    # scored as their own closed set (GRAIN's novel-concept protocol: Products-2023 among its own classes).
    config.evals.descriptions = eval_spec(**by_description)
    config.evals.descriptions_novel = eval_spec(**by_description, among="novel")
    config.evals.descriptions_novel_regions = eval_spec(**by_description, among="novel", region_weight=0.5)
    config.evals.regions = eval_spec(type="regions", data=dict(data, split="eval_retrieval", regions_key="regions",
                                                               max_regions=4), max_examples=256 if smoke else 0)
    config.region_evals = ("descriptions_novel_regions", "regions")
    _rows(config)
    config.table = (
        ("descriptions_novel/top1", "novel"),
        ("descriptions_novel_regions/top1", "novel+regions"),
        ("descriptions/top1_common", "common"),
        ("shapes/top1", "by name"),
        ("regions/mean_iou", "box mIoU"),
        ("regions/recall@0.5", "box R@0.5"),
        ("regions/description_accuracy", "region desc"),
    )


def _real(config, preset: str, smoke: bool) -> None:
    base = _sibling("clip").get_config(f"{preset},smoke=True" if smoke else preset)
    for name in ("model", "data", "sharding", "checkpoint"):
        config[name] = base[name]
    config.clip_config = ""
    examples = 3_000_000 if preset == "cc3m_b16" else 12_000_000
    config.global_batch_size = 64 if smoke else 2048
    steps_per_epoch = math.ceil(examples / config.global_batch_size)
    config.total_steps = 10 if smoke else 35 * steps_per_epoch
    config.optim.learning_rate = 1e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.98
    config.optim.weight_decay = 0.1  # kernels only: the default decay policy spares biases, norms and the temperature
    config.optim.warmup_steps = 1 if smoke else steps_per_epoch
    config.log_every = 1 if smoke else 100
    config.data.augment = "none"  # boxes stay where the annotation put them
    config.data.regions_key = "regions"
    config.grain.annotations = ""  # the JSONL annotation file (experiments/annotate.py:cc3m writes one)
    config.grain.annotation_captions = True  # each sample's caption: the original or its rewrite, 50/50
    config.evals = ml_collections.ConfigDict({
        name: eval_spec(type="descriptions", descriptors="", data=dict(dataset=name, data_dir=config.get_ref("data_dir")))
        for name in DATASETS})
    config.evals.imagenet = eval_spec(type="descriptions", descriptors="",
                                      data=dict(dataset="imagenet1k", data_dir=config.get_ref("data_dir")))
    config.region_evals = ()
    config.variants = ml_collections.ConfigDict({"grain": {}, "clip": {"method": "clip"}})
    config.variant_labels = ml_collections.ConfigDict({"grain": "GRAIN", "clip": "CLIP, same data and steps"})
    config.row_order = ("clip", "grain")
    config.table = tuple((f"{name}/top1", name) for name in (*DATASETS, "imagenet"))


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, seeds=1)
    config = _sibling("clip").get_config("shapes,smoke=True" if arg.smoke else "shapes")
    config.task = "grain"  # vlm_jax.methods.grain_clip.grain_task
    config.method = "grain"
    config.preset = arg.preset
    config.clip_config = ""
    config.cache_dir = ""  # the shared cache of base models ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.grain = grain_config()
    config.annotate = annotate_config()
    config.mllm = mllm_config()
    config.mllm_config = ""  # the captioner experiment of the embedded MLLM
    config.region_evals = ()  # evaluators that need region queries (left out of CLIP rows and the baseline)
    config.baseline_label = "base CLIP (no fine-tune)"
    if arg.preset == "shapes":
        _shapes(config, arg.smoke)
    else:
        _real(config, arg.preset, arg.smoke)
        config.baseline_label = "-"
    config.seeds = int(arg.seeds)
    return config
