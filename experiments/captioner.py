"""The embedded MLLM: a small image-conditioned decoder trained with teacher forcing (CapPa / LocCa style).

    python -m vlm_jax.main --config=experiments/captioner.py                      # Shapes World
    python -m vlm_jax.main --config=experiments/captioner.py:shapes,smoke=True    # CI-sized
    python -m vlm_jax.main --config=experiments/captioner.py:shapes --config.clip_dir=/ckpt/clip-vit-base-patch16

What runs (`vlm_jax.methods.runner.captioner_task`): the base CLIP (clip_dir, or the Shapes World CLIP
of experiments/clip.py from the shared cache), whose image tower, tokenizer and preprocessing the
captioner starts from; then the captioner trained by the shared trainer on `captions` (method
"captioner", `vlm_jax.mllm.training.CaptionerMethod`); its export in <workdir>/export is what the
`embedded` MLLM backend and `python -m vlm_jax.mllm.serve` load. Methods that use it (RAR, the
recaption pipeline) train it once into the shared cache, keyed by this resolved config.

Preset shapes (default): Shapes World's `caption_seed` dense captions ("Describe the image."), the
names of the `memory` split's main objects ("What is this?" -> the entity name; novel entities are
never named) and the `pretrain` split's alt-text ("Write the alt text." -> the weak caption, the
data the base CLIP saw), a third of each batch each; held-out captions of `eval_retrieval` scored
at the end (exact match, per-attribute accuracy). Without the alt-text (5,100 examples) the model
memorized them (train loss 0.02) and named held-out shapes at chance (14.4% of objects). Option smoke=True: a tiny model on `shapes_world/test`, a few steps.
"""

import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.mllm.training import caption_eval_config, caption_source_config, captioner_model_config
from vlm_jax.train.trainer import trainer_config

NAME_PROMPT = "What is this?"
CAPTION_PROMPT = "Describe the image."
ALT_TEXT_PROMPT = "Write the alt text."


def captions(tfds_name: str, data_dir, *, limit: int = 0) -> ml_collections.ConfigDict:
    """Shapes World's dense captions of `caption_seed`, the memory split's entity names and the
    `pretrain` split's alt-text (CapPa's data: web alt-text)."""
    seed, names, alt_text = caption_source_config(), caption_source_config(), caption_source_config()
    for section in (seed, names, alt_text):
        section.update(tfds_name=tfds_name, data_dir=data_dir, limit=limit, weight=1.0)
    seed.update(split="caption_seed", prompt=CAPTION_PROMPT, answer="dense_caption")
    names.update(split="memory", prompt=NAME_PROMPT, answer="entity_name")
    alt_text.update(split="pretrain", prompt=ALT_TEXT_PROMPT, answer="weak_caption")
    return ml_collections.ConfigDict({"caption_seed": seed, "names": names, "alt_text": alt_text})


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=("shapes",), default="shapes", smoke=False)
    smoke = arg.smoke
    config = trainer_config()
    config.task = "captioner"
    config.method = "captioner"
    config.preset = arg.preset
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    # The base CLIP: a Hugging Face CLIP directory, or "" with clip_config naming the experiment that trains it.
    config.clip_dir = ""
    config.clip_config = str(pathlib.Path(__file__).with_name("clip.py")) + (":shapes,smoke=True" if smoke else
                                                                             ":shapes")
    config.cache_dir = ""  # where the base CLIP is cached ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax)
    config.init_vision = True  # the image tower starts from the base CLIP's
    config.init_from = ""  # a captioner export to start from (fine-tuning), "" none

    config.model = captioner_model_config()
    # Room for RAR's ranking prompts and answers (20 candidates: about 240 tokens); training sequences
    # are cut to the longest example, so a longer context costs nothing until it is used.
    config.model.context_length = 160 if smoke else 320
    config.model.width = 32 if smoke else 128
    config.model.depth = 1 if smoke else 2
    config.model.heads = 2 if smoke else 4
    config.model.mlp_dim = 64 if smoke else 512
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    config.captions = captions(tfds_name, config.get_ref("data_dir"))
    config.caption_eval = caption_eval_config()
    config.caption_eval.update(tfds_name=tfds_name, split="eval_retrieval", data_dir=config.get_ref("data_dir"),
                               limit=16 if smoke else 256, max_tokens=24 if smoke else 64)

    config.global_batch_size = 16 if smoke else 128
    config.total_steps = 4 if smoke else 1500
    config.log_every = 1 if smoke else 100
    config.eval_every = 0
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 100
    config.optim.weight_decay = 0.05
    config.checkpoint.save_interval_steps = 4 if smoke else 250
    config.checkpoint.max_to_keep = 2
    return config
