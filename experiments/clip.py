"""Plain CLIP / SigLIP pre-training: the baseline every method in vlm_jax starts from.

    python -m vlm_jax.main --config=experiments/clip.py                      # Shapes World, CPU-sized
    python -m vlm_jax.main --config=experiments/clip.py:shapes,smoke=True    # CI-sized, < 1 min
    python -m vlm_jax.main --config=experiments/clip.py:cc12m_b16 \\
        --config.data.paths='/data/cc12m/*.array_record' --config.tokenizer_dir=/ckpt/clip-vit-base-patch16 \\
        --config.data_dir=/data/tfds
    python -m vlm_jax.main --config=experiments/clip.py:lit_b16 --config.clip_dir=/ckpt/clip-vit-base-patch16 ...

Presets:
  shapes (default): a small CLIP trained from scratch on Shapes World's `pretrain` split with its
    web-alt-text-like `weak_caption`s only (no dense captions: those are the recaption method's
    ground truth), then zero-shot classification (all / common / rare / novel entities) and
    image<->dense-caption retrieval. Sized for two CPU cores (about 11 minutes, dataset build
    included). Weak captions name the main object of common entities (60% of the time) and never
    the rare ones more than a few times, so common-entity zero-shot is good and rare-entity
    zero-shot is poor: the gap RECO's retrieval closes.
  cc3m_b16, cc12m_b16: ViT-B/16 CLIP from scratch on an ArrayRecord corpus written by
    `vlm_jax.data.corpora` (field "caption"), bfloat16 compute with float32 master weights, FSDP
    mesh, AdamW with warmup + cosine; zero-shot ImageNet and RECO's datasets during training.
  lit_b16: LiT (locked-image tuning): the image tower of `clip_dir` is frozen through the
    `optim.trainable` policy and a text tower is trained against it.
Options: smoke=True (a tiny model, `shapes_world/test`, a handful of steps).

Every field is documented where it is set; the trainer's fields are in `vlm_jax/train/trainer.py`,
the method's in `vlm_jax.methods.clip.ClipMethod`.
"""

import dataclasses
import importlib.util
import math
import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.data import pipeline
from vlm_jax.evaluate.suite import eval_spec
from vlm_jax.methods.clip import model_config_dict
from vlm_jax.models import clip as clip_models
from vlm_jax.train.trainer import trainer_config

PRESETS = ("shapes", "cc3m_b16", "cc12m_b16", "lit_b16")


def _sibling(name: str):
    """Another config file of experiments/ (a folder of config files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shapes(config: ml_collections.ConfigDict, smoke: bool) -> None:
    from vlm_jax.data.shapes_world import CONTEXT_LENGTH

    # Model: the full 64 px images in 8 px patches (64 tokens) and a 32-token text context (weak
    # captions are under 20 tokens; dense captions of 3-4 objects are cut for retrieval). Measured on
    # this data (README, Results): 8 px patches double the step time of 16 px ones (~0.3 s vs ~0.15 s
    # on 2 idle cores) and double zero-shot top-1 (common entities 22.9% vs 11.7%); image neighbours
    # then share their query's pattern 89% of the time (16 px: 49%). Shape is what neither resolves
    # (linear probe 0.17, chance 0.125; benchmarks/attribute_probe.py). `--config.model.vision.stem=conv`
    # (three 3x3 stride-2 convs to the same 8x8 grid, no HF export) measured no better on shape after
    # 400 and 500 steps (0.17, 0.16; RESULTS.md, attribute_probe), so the HF-exportable patchify stays.
    # Even told the shapes directly, a small CNN is at 0.58 held-out after 400 steps, and the conv
    # stem's per-pixel LayerNorm halves that speed (benchmarks/shape_learning.py).
    if smoke:
        model = clip_models.tiny(text=dataclasses.replace(clip_models.tiny().text, context_length=CONTEXT_LENGTH))
    else:
        model = clip_models.tiny(
            vision=clip_models.VisionConfig(image_size=64, patch_size=8, width=128, depth=3, heads=4, mlp_dim=256),
            text=clip_models.TextConfig(context_length=32, width=128, depth=2, heads=4, mlp_dim=256),
            embed_dim=128)
    config.model = model_config_dict(model)
    config.tokenizer_dir = ""  # "": the Shapes World tokenizer built with the data

    # Data: pretrain split, weak (alt-text-like) captions only.
    config.data = pipeline.default_config()
    config.data.source = "tfds"
    config.data.tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    config.data.split = "pretrain"
    config.data.data_dir = config.get_ref("data_dir")
    config.data.text_keys = ("weak_caption",)
    config.data.augment = "none"  # procedural images: crops would cut objects out of the caption's scene
    # One decode process: PNG decoding and tokenizing overlap the train step instead of taking turns.
    config.data.worker_count = 0 if smoke else 1
    config.named_caption_weight = 0.5

    config.global_batch_size = 32 if smoke else 128
    config.total_steps = 6 if smoke else 1500
    config.log_every = 1 if smoke else 50
    config.eval_every = 0 if smoke else 500
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 100
    config.optim.weight_decay = 0.1
    config.checkpoint.save_interval_steps = 3 if smoke else 500
    config.checkpoint.max_to_keep = 2

    config.evals = _sibling("zero_shot").shapes_evals(smoke=smoke, data_dir=config.get_ref("data_dir"))


def _web_corpus(config: ml_collections.ConfigDict, *, examples: int, smoke: bool) -> None:
    # ViT-B/16 CLIP as in OpenCLIP's CC3M/CC12M baselines: batch 4096 (32k for CC12M at scale),
    # lr 1e-3 (5e-4 x batch/4096 scaling is common), 2k warmup steps, 32 epochs.
    model = clip_models.vit_b16(dtype="bfloat16", param_dtype="float32", remat=True)
    if smoke:
        model = clip_models.tiny()
    config.model = model_config_dict(model)
    config.tokenizer_dir = ""  # a directory with tokenizer.json, e.g. openai/clip-vit-base-patch16

    config.data = pipeline.default_config()
    config.data.source = "array_record"
    config.data.paths = ""  # glob of the corpus shards written by vlm_jax.data.corpora
    config.data.text_keys = ("caption",)
    config.data.augment = "random_resized_crop"
    config.data.crop_scale = (0.9, 1.0)
    config.data.worker_count = 16  # grain decode processes per host
    config.data.worker_buffer_size = 4

    config.global_batch_size = 64 if smoke else 4096
    epochs = 32
    config.total_steps = 10 if smoke else math.ceil(epochs * examples / config.global_batch_size)
    config.log_every = 1 if smoke else 100
    config.eval_every = 0 if smoke else 5000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 2000
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.weight_decay = 0.2
    config.checkpoint.save_interval_steps = 5 if smoke else 2000
    config.checkpoint.max_to_keep = 3
    # FSDP over the whole slice: params, grads and Adam moments split 1/N per device; the batch is
    # split over the same axis (pure ZeRO-3 data parallelism).
    config.sharding.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))

    zero_shot = _sibling("zero_shot")
    config.evals = ml_collections.ConfigDict({
        name: eval_spec(type="zero_shot", data=dict(dataset=name, data_dir=config.get_ref("data_dir")))
        for name in zero_shot.RECO_SUITE
    })


def dataset_version(config: ml_collections.ConfigDict) -> str:
    """Names the training data of a run of `config`, for the base-model cache key
    (`vlm_jax.train.cache.cached_run`): Shapes World's build and generator version, else the TFDS
    name or the corpus paths."""
    data = config.data
    if data.get("source") == "tfds" and str(data.get("tfds_name") or "").startswith("shapes_world"):
        from vlm_jax.data.shapes_world import world

        return f"{data.tfds_name}@generator-{world.GENERATOR_VERSION}"
    return str(data.get("tfds_name") or data.get("paths") or "")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False)
    config = trainer_config()
    config.method = "clip"  # vlm_jax.methods.clip.ClipMethod
    config.preset = arg.preset
    config.seed = 0
    # TFDS data_dir for the training data (Shapes World is built there on first use) and the evals.
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.clip_dir = ""  # Hugging Face CLIP/SigLIP directory to start from ("": from scratch)
    config.loss = "softmax"  # "softmax" (CLIP) | "sigmoid" (SigLIP; needs model.kind="siglip")
    config.label_smoothing = 0.0
    # Shapes World: chance of the "a photo of a <name>." rewrite of a weak caption that names its main
    # object (methods/clip.py NamedCaptionSource); 0 trains on the weak captions as they are.
    config.named_caption_weight = 0.0
    # Text context in tokens (0: the model's own; with clip_dir, longer stretches its positions by
    # Long-CLIP's rule) and how much of the text tower trains (-1: all; N: its last N blocks only).
    config.text_context_length = 0
    config.text_trainable_layers = -1
    config.progress = not arg.smoke
    if arg.preset == "shapes":
        _shapes(config, arg.smoke)
    elif arg.preset in ("cc3m_b16", "cc12m_b16"):
        _web_corpus(config, examples=3_000_000 if arg.preset == "cc3m_b16" else 12_000_000, smoke=arg.smoke)
    else:
        _web_corpus(config, examples=12_000_000, smoke=arg.smoke)
        config.clip_dir = ""  # required: a pretrained CLIP whose image tower is locked
        config.optim.trainable = ((r"^vision_model/", False), (r"^visual_projection/", False), (r".*", True))
        config.total_steps = 10 if arg.smoke else 20_000
        config.data.augment = "none"  # a locked tower sees its pretraining preprocessing
    return config
