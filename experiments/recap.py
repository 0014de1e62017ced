"""Recaptioned-data CLIP (Stone et al.; Recap-DataComp's mixture): the same CLIP trained on weak
captions, on MLLM recaptions, on their mixture and on the true dense captions, side by side.

    python -m vlm_jax.main --config=experiments/recap.py                         # Shapes World, 1 seed
    python -m vlm_jax.main --config=experiments/recap.py:shapes,seeds=3          # the README's table
    python -m vlm_jax.main --config=experiments/recap.py:shapes,smoke=True       # CI-sized
    python -m vlm_jax.main --config=experiments/recap.py:datacomp_b16 \\
        --config.data.paths='/data/datacomp/*.array_record' --config.tokenizer_dir=/ckpt/clip-vit-base-patch16 \\
        --config.mllm.base_url=http://localhost:8000/v1 --config.mllm.model=Qwen/Qwen2-VL-7B-Instruct \\
        --config.evals.sugarcrepe.path=/data/sugarcrepe --config.evals.aro_relation.path=/data/aro ...

What runs (`vlm_jax.methods.recap.recap_task`): the base CLIP (clip_dir, else the cached CLIP of
clip_config), the embedded MLLM (cached; or any OpenAI-compatible server), the recaption pipeline over
`recaption.data` into <workdir>/recaptions (resumable), then every row x seed through the shared
runner with the same steps, batch and learning rate; the table holds Shapes World's hard-negative
accuracy by kind, retrieval R@1 both ways and zero-shot top-1.

Preset shapes (default): rows fine-tune the weak-caption CLIP of experiments/clip.py for 250 steps
on the first `recap.examples` pretrain images (the recaptioned ones, the same images for every row):
  weak:    its weak captions (and their "a photo of a <name>." form, as the base CLIP trained);
  recap:   recaptions only (p = 0), written by the embedded captioner from the image alone;
  mix:     the original with p = 0.8, else the recaption (Recap-DataComp's default);
  oracle:  the true dense captions (the upper bound the recaptions approach);
  hardneg (option hard_negatives=True; in smoke): recap + each caption's swapped-attribute negative
           in the batch (NegCLIP-style).
The captioner (experiments/captioner.py) learns dense descriptions from `caption_seed` alone (1,000
images); it also reads the corpus's alt-text and the memory split's names, the data the CLIP has.
Options: seeds=N (default 1), hard_negatives=True (the hardneg row), smoke=True (tiny models on
shapes_world/test, a few steps, every row).

Real presets (TPU): datacomp_b16 (ViT-B/16 from scratch on a DataComp/CC12M-style ArrayRecord corpus
recaptioned grounded through the HTTP backend, p = 0.8, 128-token text; Recap-DataComp's recipe) and
longclip_b16 (a pretrained CLIP ViT-B/16 directory fine-tuned on recaptions only, its text context
stretched 77 -> 248 by Long-CLIP's rule, sentence sampling, the text tower frozen but its last 4
blocks; Stone et al.'s text-side recipe on a CLIP text tower). Both evaluate SugarCrepe, ARO,
Winoground and DOCCI from the folders their `path` fields name.
"""

import importlib.util
import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.evaluate.suite import eval_spec
from vlm_jax.methods.recap import recap_config
from vlm_jax.mllm.config import mllm_config
from vlm_jax.mllm.recaption import recaption_config

PRESETS = ("shapes", "datacomp_b16", "longclip_b16")
HERE = pathlib.Path(__file__)


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", HERE.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(config, dense_key: str | None, hard_negatives: bool) -> None:
    config.variants = ml_collections.ConfigDict({
        "weak": {"recap": {"p": 1.0}},
        "recap": {"recap": {"p": 0.0}},
        "mix": {"recap": {"p": 0.8}},
    })
    config.variant_labels = ml_collections.ConfigDict({
        "weak": "CLIP, original captions", "recap": "recaptions (p=0)", "mix": "mixture p=0.8"})
    if dense_key:
        config.variants.oracle = {"recap": {"p": 1.0}, "data": {"text_keys": (dense_key,)}, "named_caption_weight": 0.0}
        config.variant_labels.oracle = "oracle dense captions"
    if hard_negatives:
        config.variants.hardneg = {"recap": {"p": 0.0}, "data": {"hard_negatives": ("swap_attribute",)}}
        config.variant_labels.hardneg = "recaptions + hard negatives"
    config.row_order = ("weak", "recap", "mix", "oracle", "hardneg")


def _shapes(config, smoke: bool, hard_negatives: bool) -> None:
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    data = dict(source="tfds", tfds_name=tfds_name, data_dir=config.get_ref("data_dir"))
    # model, data (pretrain's weak captions), named_caption_weight and batch: the base CLIP's, from
    # experiments/clip.py:shapes, whose config this one extends.
    config.clip_config = str(HERE.with_name("clip.py")) + (":shapes,smoke=True" if smoke else ":shapes")
    config.mllm_config = str(HERE.with_name("captioner.py")) + (":shapes,smoke=True" if smoke else ":shapes")
    config.data.id_key = "index"
    config.recap.examples = 64 if smoke else 8192
    for key, value in {**data, "split": "pretrain", "shuffle": False}.items():
        setattr(config.recaption.data, key, value)
    config.recaption.update(mode="ungrounded", id_key="index", alt_text_key="weak_caption",
                            limit=config.recap.examples, max_tokens=24 if smoke else 64, batch_size=64)
    config.recaption.prompts.ungrounded = "Describe the image."  # the captioner's dense-caption prompt
    config.recaption.filters.update(min_words=3, max_words=80)
    config.mllm.batch_size = 64

    # 250 steps a row (about 4.5 minutes here, eval included) keeps the default run of four rows near
    # 20 minutes; lr 1e-3 (3e-4 moved swap-attribute accuracy half as far in 400 steps of dense captions).
    config.total_steps = 4 if smoke else 250
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 25
    config.optim.weight_decay = 0.1
    config.log_every = 1 if smoke else 50
    config.checkpoint.save_interval_steps = 4 if smoke else 250
    config.checkpoint.max_to_keep = 1

    config.evals = _sibling("zero_shot").shapes_evals(smoke=smoke, data_dir=config.get_ref("data_dir"))
    config.evals.compositional = eval_spec(type="shapes_compositional",
                                           data=dict(data, split="eval_compositional"))
    _rows(config, "dense_caption", hard_negatives)
    config.table = (
        ("compositional/swap_attribute", "swap attr"),
        ("compositional/swap_relation", "swap rel"),
        ("compositional/replace_attribute", "replace attr"),
        ("compositional/replace_object", "replace obj"),
        ("shapes_retrieval/image_retrieval_recall@1", "T->I R@1"),
        ("shapes_retrieval/text_retrieval_recall@1", "I->T R@1"),
        ("shapes/top1", "zero-shot"),
    )


def _benchmark_evals(config, data_dir) -> None:
    config.evals = ml_collections.ConfigDict({
        "sugarcrepe": eval_spec(type="sugarcrepe", path=""),  # folder of the seven JSON files (+ val2017/)
        "aro_relation": eval_spec(type="aro_relation", path=""),  # visual_genome_relation.json
        "aro_attribution": eval_spec(type="aro_attribution", path=""),  # visual_genome_attribution.json
        "coco_order": eval_spec(type="coco_order", path=""),  # coco_karpathy_test.json
        "winoground": eval_spec(type="winoground", path=""),  # examples.jsonl + images/
        "docci": eval_spec(type="long_retrieval", path=""),  # docci_descriptions.jsonlines + images/
        "imagenet": eval_spec(type="zero_shot", data=dict(dataset="imagenet", data_dir=data_dir)),
    })
    config.table = (("sugarcrepe/mean", "SugarCrepe"), ("aro_relation/macro", "ARO-R"),
                    ("aro_attribution/macro", "ARO-A"), ("winoground/group", "Wino group"),
                    ("docci/image_retrieval_recall@1", "DOCCI T->I"), ("imagenet/top1", "ImageNet"))


def _real(config, preset: str, smoke: bool) -> None:
    base = _sibling("clip").get_config("cc12m_b16,smoke=True" if smoke else "cc12m_b16")
    for name in ("model", "data", "global_batch_size", "total_steps", "optim", "sharding", "checkpoint"):
        config[name] = base[name]
    config.clip_config = ""
    config.data.text_keys = ("caption",)
    config.recaption.data = ml_collections.ConfigDict(config.data.to_dict())
    config.recaption.data.update(shuffle=False, augment="none", num_epochs=1)
    config.recaption.update(mode="grounded", id_key="id", alt_text_key="caption", title_key="title",
                            batch_size=256, max_tokens=160)
    # Any OpenAI-compatible server; 64 requests in flight.
    config.mllm.update(backend="openai", max_side=448, concurrency=64)
    _benchmark_evals(config, config.get_ref("data_dir"))
    _rows(config, None, hard_negatives=True)
    if preset == "datacomp_b16":
        config.recap.init = "scratch"
        config.model.text.context_length = 128  # Recap-DataComp's text length
    else:
        config.recap.init = "base"
        config.clip_dir = ""  # a Hugging Face CLIP ViT-B/16 directory
        config.text_context_length = 248  # Long-CLIP: 20 positions kept, the other 57 stretched 4x
        config.text_trainable_layers = 4  # Stone et al.: the text tower frozen but its last 4 blocks
        config.data.sentence_sampling = True
        config.total_steps = 20 if smoke else 30_000
    config.seeds = 1


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, seeds=1, hard_negatives=False)
    config = _sibling("clip").get_config("shapes,smoke=True" if arg.smoke else "shapes")
    config.task = "recap"  # vlm_jax.methods.recap.recap_task
    config.method = "recap"
    config.preset = arg.preset
    config.clip_config = ""
    config.cache_dir = ""  # the shared cache of base models ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.recap = recap_config()
    config.recaption = recaption_config()
    config.mllm = mllm_config()
    config.mllm_config = ""  # the captioner experiment of the embedded MLLM (mllm.model_dir: a ready export)
    config.baseline_label = "base CLIP (no fine-tune)"
    if arg.preset == "shapes":
        _shapes(config, arg.smoke, arg.hard_negatives or arg.smoke)
        config.seeds = int(arg.seeds)
    else:
        _real(config, arg.preset, arg.smoke)
        config.seeds = int(arg.seeds)
        config.baseline_label = "base CLIP"
    return config
