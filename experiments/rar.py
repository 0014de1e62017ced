"""RAR: a frozen CLIP retrieves top-k candidate classes from a memory, an MLLM ranks them.

    python -m vlm_jax.main --config=experiments/rar.py                        # Shapes World (start here)
    python -m vlm_jax.main --config=experiments/rar.py:shapes,smoke=True      # CI-sized
    python -m vlm_jax.main --config=experiments/rar.py:shapes_http            # the same through mllm.serve
    python -m vlm_jax.main --config=experiments/rar.py:fewshot,dataset=caltech101 \\
        --config.clip_dir=/ckpt/clip-vit-base-patch16 --config.data_dir=/data/tfds \\
        --config.mllm.base_url=http://localhost:8000/v1 --config.mllm.model=Qwen/Qwen2-VL-7B-Instruct
    python -m vlm_jax.main --config=experiments/rar.py:lvis --config.clip_dir=... \\
        --config.regions.annotations=/data/lvis/lvis_v1_val.json --config.regions.image_dir=/data/coco/val2017 \\
        --config.mllm.base_url=... --config.mllm.model=...

What runs (`vlm_jax.methods.rar.rar_task` on the shared runner, each stage resumable): the frozen CLIP
(clip_dir, or the Shapes World CLIP of experiments/clip.py from the shared cache); the few-shot
split embedded with its labels into <workdir>/memory and the eval split into <workdir>/eval_memory;
the MLLM: the embedded captioner of experiments/captioner.py, fine-tuned on RAR's ranking data
made from the memory (<workdir>/ranking_data/ranking.jsonl, LLaVA-format conversations), both
trained once into the shared cache, or any OpenAI-compatible server (`mllm.backend=openai`); then every
setting x seed: CLIP+kNN, recall@k (RAR's ceiling), RAR ranking (parsed answers, fallbacks counted)
and RAR scoring (the MLLM's likelihood of each name), in one table; then region recognition with
given boxes (CLIP vs RAR AP).

Presets:
  shapes (default): Shapes World, all 256 entities; few-shot memory = N seeded shots per entity of
    the `memory` split (N = 1, 2, 4, 8, 16) and zero-shot (entity names); the 4-shot setting with
    k = 5, 10, 20 candidates; 3 seeds (which shots); regions: the objects of `eval_retrieval`'s
    multi-object scenes with their true boxes.
  shapes_http: the same with the fine-tuned embedded model served by `vlm_jax.mllm.serve` on loopback
    and reached through the OpenAI-compatible client (png images, so predictions equal in-process).
  fewshot: a registry dataset (option dataset=, one of the paper's 11), the N-shot memory from its
    train split, any OpenAI-compatible MLLM; no fine-tune (give a ranking-tuned model).
  lvis: recognition of LVIS's given boxes (`regions.annotations`, `regions.image_dir`) against its
    class names; the classification runs are off.
Options: smoke=True (tiny models, shapes_world/test, one seed, few settings).
Plots (`vlm_jax.plots`): rar_candidates.png, accuracy and recall against the candidate count k.
"""

import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.evaluate.suite import eval_spec
from vlm_jax.memory.build import memory_config
from vlm_jax.methods.rar import rar_config, regions_config
from vlm_jax.mllm.config import mllm_config
from vlm_jax.train.trainer import trainer_config

PRESETS = ("shapes", "shapes_http", "fewshot", "lvis")
PAPER_DATASETS = ("imagenet1k", "caltech101", "pets", "cars", "flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
                  "eurosat", "ucf101")
SHOTS = (1, 2, 4, 8, 16)


def _memory(data: dict, split: str, shard_size: int) -> ml_collections.ConfigDict:
    section = memory_config()
    for key, value in {**data, "split": split, "label_key": "label", "text_keys": ()}.items():
        setattr(section.data, key, value)
    section.update(shard_size=shard_size, batch_size=256)
    return section


def _variants(config, shots, ks) -> None:
    """The method (4 shots, k 5) first, the other shot counts, zero-shot, then k growing at 4 shots."""
    config.variants = ml_collections.ConfigDict({"rar": {}})
    config.variant_labels = ml_collections.ConfigDict({"rar": f"{config.rar.shots}-shot, k={config.rar.k}"})
    for shots_n in shots:
        if shots_n != config.rar.shots:
            config.variants[f"shots_{shots_n:02d}"] = {"rar": {"shots": shots_n}}
            config.variant_labels[f"shots_{shots_n:02d}"] = f"{shots_n}-shot"
    config.variants.zero_shot = {"rar": {"shots": 0}}
    config.variant_labels.zero_shot = "zero-shot (names)"
    for k in ks:
        # An answer lists k names: room for them (plain lists of Shapes World names: ~5.4 tokens each).
        name = f"shots_{config.rar.shots:02d}_k{k}"  # variants are listed by name: beside the 4-shot rows
        config.variants[name] = {"rar": {"k": k, "max_tokens": 6 * k + 16}}
        config.variant_labels[name] = f"{config.rar.shots}-shot, k={k}"


def _shapes(config, smoke: bool, http: bool) -> None:
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    data = dict(source="tfds", tfds_name=tfds_name, data_dir=config.get_ref("data_dir"))
    config.clip_config = str(pathlib.Path(__file__).with_name("clip.py")) + (":shapes,smoke=True" if smoke else
                                                                             ":shapes")
    config.mllm_config = str(pathlib.Path(__file__).with_name("captioner.py")) + (":shapes,smoke=True" if smoke
                                                                                  else ":shapes")
    config.memory = _memory(data, "memory", 1024)
    config.eval = eval_spec(type="zero_shot", classes="shapes_world", subsets="frequency",
                            data=dict(data, split="eval_classification"))
    config.eval_memory = _memory(data, "eval_classification", 1024)
    # The embedded model's prompt: short, names unquoted (the paper's prompt and quoted list take 149
    # tokens at k = 5 with this tokenizer, the plain one 51); real MLLMs get the paper's.
    config.rar.prompt = "Sort the {k} categories by similarity to the image: {names}."
    config.rar.list_style = "plain"
    config.rar.max_tokens = 6 * config.rar.k + 16
    config.ranking_data = True
    # shapes_world/test holds one memory image per entity, so no neighbour shares its class: smoke
    # writes the (empty) ranking data and skips the fine-tune.
    # At lr 3e-4, 400 steps left 23% of the answer tokens wrong (names not copied whole).
    config.finetune.update(total_steps=0 if smoke else 600, global_batch_size=64, log_every=100)
    config.finetune.optim = {"learning_rate": 1e-3}
    for key, value in {**data, "split": "eval_retrieval"}.items():
        setattr(config.regions.data, key, value)
    config.regions.limit = 16 if smoke else 256  # images
    config.seeds = 1 if smoke else 3
    _variants(config, (1,) if smoke else SHOTS, (10,) if smoke else (10, 20))
    if http:
        config.serve = True
        # png: the pixels arrive unchanged; 64 requests in flight fill the server's batches of 64.
        config.mllm.update(image_format="png", max_side=1024, concurrency=64)
        # Scoring over HTTP asks VQAScore's yes/no question, which the embedded model was not trained on.
        config.rar_modes = ("generate",)


def _real(config, preset: str, dataset: str) -> None:
    data = dict(source="tfds", dataset=dataset, data_dir=config.get_ref("data_dir"))
    config.clip_dir = ""  # a Hugging Face CLIP ViT-B/16 directory (the paper's retriever)
    config.memory = _memory(data, "train", 1 << 16)
    config.eval = eval_spec(type="zero_shot", data=dict(data, split=""))
    config.eval_memory = _memory(data, "", 1 << 16)
    config.rar.index = {"backend": "scann"}  # the paper: HNSW (M = 64) inner product
    # Any OpenAI-compatible server; answers cached on disk so a rerun sends nothing.
    config.mllm.update(backend="openai", structured_output=True, max_side=448, concurrency=16,
                       cache_dir="workdirs/rar_mllm_cache")
    config.rar_modes = ("generate",)  # scoring over HTTP is VQAScore-style (`mllm.score_question`)
    config.ranking_data = True  # <workdir>/ranking_data/ranking.jsonl: fine-tune data for LLaVA/Qwen-VL scripts
    config.finetune.total_steps = 0  # the served model is fine-tuned outside (e.g. on FGVC-Aircraft's data)
    config.seeds = 1
    _variants(config, (1, 2, 8, 16) if preset == "fewshot" else (), ())
    config.regions.enabled = preset == "lvis"
    config.regions.annotations = ""  # lvis preset: lvis_v1_val.json (categories with r/c/f frequency)
    config.regions.image_dir = ""  # lvis preset: the COCO images its file_name entries name


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, dataset="caltech101")
    if arg.dataset not in PAPER_DATASETS:
        raise config_lib.ConfigError(f"dataset={arg.dataset!r} is not one of the paper's {list(PAPER_DATASETS)}.")
    config = trainer_config()
    config.task = "rar"  # vlm_jax.methods.rar.rar_task
    config.preset = arg.preset
    config.seed = 0
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.clip_dir = ""
    config.clip_config = ""
    config.cache_dir = ""  # the shared cache of base models ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.mllm = mllm_config()
    config.mllm_config = ""  # the captioner experiment of the embedded MLLM (mllm.model_dir: a ready export)
    config.serve = False  # serve the embedded MLLM on loopback and rank through the HTTP client
    config.rar = rar_config()
    config.rar.sweep = True  # recall and scoring of every candidate prefix, from the same MLLM calls (plots)
    config.rar_modes = ("generate", "score")  # ranking by parsed answers / by likelihood
    config.ranking_data = False  # write the ranking fine-tune data of the memory split (the fine-tune needs it)
    # Trainer fields of the ranking fine-tune of the embedded MLLM (0 steps: none).
    config.finetune = ml_collections.ConfigDict({"total_steps": 0, "global_batch_size": 64, "log_every": 100,
                                                 "optim": {"learning_rate": 3e-4}})
    config.regions = regions_config()
    config.baseline_label = "CLIP zero-shot (frozen)"
    config.table = (("knn_top1", "CLIP+kNN"), ("recall", "recall@k"), ("rar_top1", "RAR"),
                    ("rar_score_top1", "RAR (score)"), ("fallback_rate", "fallbacks"))
    if arg.preset in ("shapes", "shapes_http"):
        _shapes(config, arg.smoke, arg.preset == "shapes_http")
    else:
        _real(config, arg.preset, arg.dataset)
    return config
