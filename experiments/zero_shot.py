"""Zero-shot classification and retrieval of a pretrained CLIP/SigLIP directory.

    python -m vlm_jax.main --config=experiments/zero_shot.py                 # Shapes World, the CLIP
                                                                            # that experiments/clip.py exports
    python -m vlm_jax.main --config=experiments/zero_shot.py:cars \\
        --config.clip_dir=/ckpt/clip-vit-base-patch32 --config.data_dir=/data/tfds
    python -m vlm_jax.main --config=experiments/zero_shot.py:suite --config.clip_dir=...   # RECO's table

Presets: shapes (default), or any registry dataset name, or suite (the datasets RECO reports).
Options: smoke=True evaluates the tiny `shapes_world/test` build (CI-sized).
"""

import ml_collections

from vlm_jax import config_lib
from vlm_jax.evaluate.suite import eval_spec

# Datasets RECO reports zero-shot top-1 on (METHODS.md), by registry name.
RECO_SUITE = ("cars", "cub200", "flowers", "imagenet1k", "places365", "stanford_dogs")
REAL = ("imagenet1k", "caltech101", "pets", "cars", "flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
        "eurosat", "ucf101", "cub200", "stanford_dogs", "places365", "cifar10", "cifar100")


def shapes_evals(*, smoke: bool, data_dir=None) -> ml_collections.ConfigDict:
    """Shapes World zero-shot (all / common / rare / novel) by entity name and by description, and retrieval.

    "shapes" builds the classifier from entity names ("a photo of a zorvid."); "shapes_by_description"
    from each entity's attributes ("a photo of a striped red star."), which needs no name, so its
    `top1_novel` is the zero-shot accuracy on novel entities (never named in pre-training or memory)
    and says whether the text tower binds pattern, colour and shape into one embedding.
    """
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    data = dict(source="tfds", tfds_name=tfds_name, data_dir=data_dir, download=True)
    return ml_collections.ConfigDict(
        {
            "shapes": eval_spec(
                type="zero_shot", classes="shapes_world", subsets="frequency", batch_size=256,
                data=dict(data, split="eval_classification"),
            ),
            "shapes_by_description": eval_spec(
                type="zero_shot", classes="shapes_world_descriptions", subsets="frequency", batch_size=256,
                data=dict(data, split="eval_classification"),
            ),
            "shapes_retrieval": eval_spec(
                type="retrieval", batch_size=256,
                data=dict(data, split="eval_retrieval", text_keys=("dense_caption",), texts_per_example=1),
            ),
        }
    )


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=("shapes", "suite", *REAL), default="shapes", smoke=False)
    config = ml_collections.ConfigDict()
    config.task = "zero_shot_eval"
    config.preset = arg.preset
    config.dtype = "float32"
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    if arg.preset == "shapes":
        config.clip_dir = "workdirs/clip/export"
        config.evals = shapes_evals(smoke=arg.smoke, data_dir=config.get_ref("data_dir"))
        return config
    config.clip_dir = ""
    names = RECO_SUITE if arg.preset == "suite" else (arg.preset,)
    config.evals = ml_collections.ConfigDict(
        {name: eval_spec(type="zero_shot", data=dict(dataset=name, data_dir=config.get_ref("data_dir"))) for name in names}
    )
    return config
