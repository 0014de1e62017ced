"""GRAIN's annotation pipeline alone (`vlm_jax.mllm.annotate`): per image up to 10 short MLLM descriptions, boxed by
an open-vocabulary detector (score > 0.3, top 5), the caption the original or an MLLM rewrite (50/50), written to
<workdir>/annotations (JSONL in the `vlm_jax.data.annotations` format, summary.json), resumable.

    python -m vlm_jax.main --config=experiments/annotate.py                          # Shapes World, embedded
    python -m vlm_jax.main --config=experiments/annotate.py:shapes,smoke=True,limit=64
    python -m vlm_jax.main --config=experiments/annotate.py:cc3m \\
        --config.annotate.data.paths='/data/cc3m/*.array_record' \\
        --config.mllm.base_url=http://localhost:8000/v1 --config.mllm.model=Qwen/Qwen2-VL-7B-Instruct \\
        --config.annotate.detector.model_dir=/models/owlv2-base-patch16-ensemble

Presets:
  shapes (default): Shapes World's `pretrain` split in crops mode: the ground-truth boxes cropped and described
    by the embedded captioner (experiments/captioner.py, trained once into the shared cache) with its training
    prompt; rewrites are its caption of the whole image. summary.json compares the descriptions with the ground
    truth (the "pipeline-made regions" row).
  cc3m: an ArrayRecord corpus written by `vlm_jax.data.corpora` (CC3M/CC12M) in image mode: an OpenAI-compatible
    MLLM server writes the descriptions and the text-only rewrites, OWLv2 (a transformers
    Owlv2ForObjectDetection directory) boxes them.
Options: limit=N (the first N records; 0: all), smoke=True (shapes_world/test, a tiny captioner).
Kill it at any point and run the same command again: finished shards are kept and skipped.
"""

import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.mllm.annotate import annotate_config, shapes_world_annotate_config
from vlm_jax.mllm.config import mllm_config

PRESETS = ("shapes", "cc3m")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, limit=0)
    config = ml_collections.ConfigDict()
    config.task = "annotate"  # vlm_jax.mllm.annotate.annotate_task
    config.preset = arg.preset
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.cache_dir = ""  # the shared cache of the captioner ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.mllm = mllm_config()
    config.mllm_config = ""  # the captioner experiment of the embedded MLLM (mllm.model_dir: a ready export)
    if arg.preset == "shapes":
        config.annotate = shapes_world_annotate_config("shapes_world/test" if arg.smoke else "shapes_world/default")
        config.annotate.data.data_dir = config.get_ref("data_dir")
        config.annotate.batch_size = 64
        config.mllm_config = str(pathlib.Path(__file__).with_name("captioner.py")) + (
            ":shapes,smoke=True" if arg.smoke else ":shapes")
    else:
        config.annotate = annotate_config()
        config.annotate.data.update(source="array_record", paths="")  # the corpus's shards
        config.annotate.update(mode="image", id_key="id", caption_key="caption", rewrite_input="text",
                               batch_size=256, max_tokens=160)
        config.annotate.detector.update(backend="owlv2", model_dir="", batch_size=16)
        config.mllm.update(backend="openai", max_side=448, concurrency=64, cache_dir="")
    config.annotate.limit = int(arg.limit)
    return config
