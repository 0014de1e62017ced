"""Shapes World, the embedded procedural dataset (see SHAPES_WORLD.md).

Importing this package registers the TFDS builder `shapes_world` (configs "default" and "test"):

    from vlm_jax.data import shapes_world
    shapes_world.prepare(data_dir)                      # builds once
    source = tfds.data_source("shapes_world", split="pretrain", data_dir=data_dir)
    tokenizer_dir = shapes_world.tokenizer_dir(data_dir)
"""

from vlm_jax.data.shapes_world.builder import (
    FIELDS,
    ShapesWorld,
    ShapesWorldConfig,
    attribute_phrases,
    class_names,
    descriptions,
    descriptors,
    entities,
    entity_table,
    frequency_ids,
    get_config,
    prepare,
    prompt_templates,
    tokenizer_dir,
)
from vlm_jax.data.shapes_world.tokenizer import CONTEXT_LENGTH, save_tokenizer
from vlm_jax.data.shapes_world.world import (
    FREQUENCIES,
    HARD_NEGATIVE_KINDS,
    SPLITS,
    Entity,
    World,
    WorldConfig,
    decode_png,
    parse_dense_caption,
)

__all__ = [
    "CONTEXT_LENGTH",
    "FIELDS",
    "FREQUENCIES",
    "HARD_NEGATIVE_KINDS",
    "SPLITS",
    "Entity",
    "ShapesWorld",
    "ShapesWorldConfig",
    "World",
    "WorldConfig",
    "attribute_phrases",
    "class_names",
    "decode_png",
    "descriptions",
    "descriptors",
    "entities",
    "entity_table",
    "frequency_ids",
    "get_config",
    "parse_dense_caption",
    "prepare",
    "prompt_templates",
    "save_tokenizer",
    "tokenizer_dir",
]
