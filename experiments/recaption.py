"""The recaption pipeline alone (`vlm_jax.mllm.recaption`): an MLLM rewrites a corpus's captions into
<workdir>/recaptions (ArrayRecord shards keyed by example id, JSONL twins, summary.json), resumable.

    python -m vlm_jax.main --config=experiments/recaption.py                  # Shapes World, embedded
    python -m vlm_jax.main --config=experiments/recaption.py:corpus \\
        --config.recaption.data.paths='/data/cc12m/*.array_record' \\
        --config.mllm.base_url=http://localhost:8000/v1 --config.mllm.model=Qwen/Qwen2-VL-7B-Instruct
    python -m vlm_jax.main --config=experiments/recaption.py:rewrite \\
        --config.recaption.data.paths='/data/cc12m/*.array_record' \\
        --config.mllm.base_url=http://localhost:8000/v1 --config.mllm.model=meta-llama/Llama-3.1-8B-Instruct

Presets:
  shapes (default): Shapes World's `pretrain` split described by the embedded captioner
    (experiments/captioner.py, trained once into the shared cache) from the image alone.
  corpus: grounded recaptioning (image + alt-text + page title) of an ArrayRecord corpus written by
    `vlm_jax.data.corpora` through any OpenAI-compatible server, 64 requests in flight.
  rewrite: LaCLIP-style text-only rewriting of the same corpus's alt-text by a text LM endpoint.
Options: limit=N (the first N records; 0: all), smoke=True (shapes_world/test, a tiny captioner).
Kill it at any point and run the same command again: finished shards are kept and skipped.
"""

import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.mllm.config import mllm_config
from vlm_jax.mllm.recaption import recaption_config, shapes_world_recaption_config

PRESETS = ("shapes", "corpus", "rewrite")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, limit=0)
    config = ml_collections.ConfigDict()
    config.task = "recaption"  # vlm_jax.mllm.recaption.recaption_task
    config.preset = arg.preset
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.cache_dir = ""  # the shared cache of the captioner ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.mllm = mllm_config()
    config.mllm_config = ""  # the captioner experiment of the embedded MLLM (mllm.model_dir: a ready export)
    if arg.preset == "shapes":
        config.recaption = shapes_world_recaption_config("shapes_world/test" if arg.smoke else "shapes_world/default")
        config.recaption.data.data_dir = config.get_ref("data_dir")
        config.recaption.max_tokens = 24 if arg.smoke else 64
        config.mllm_config = str(pathlib.Path(__file__).with_name("captioner.py")) + (
            ":shapes,smoke=True" if arg.smoke else ":shapes")
    else:
        config.recaption = recaption_config()
        config.recaption.data.update(source="array_record", paths="")  # the corpus's shards
        config.recaption.update(mode="grounded" if arg.preset == "corpus" else "rewrite", id_key="id",
                                alt_text_key="caption", title_key="title", batch_size=256,
                                max_tokens=160 if arg.preset == "corpus" else 96)
        config.mllm.update(backend="openai", max_side=448, concurrency=64, cache_dir="")
    config.recaption.limit = int(arg.limit)
    return config
