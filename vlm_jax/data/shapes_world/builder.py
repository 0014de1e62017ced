"""The `shapes_world` TFDS builder, its configs, and accessors for entities, prompts and tokenizer.

Images are PNG bytes in a `Tensor(shape=(), dtype=object)` so that building needs no TensorFlow;
decode them with `world.decode_png` (or PIL) in the input pipeline. Every split shares one feature
dict; fields a split does not use hold empty strings (see `FIELDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.data.shapes_world import tokenizer as sw_tokenizer
from vlm_jax.data.shapes_world import world

FIELDS = """\
Fields (every split):
  index: int64, the example's index in its split (examples are a function of seed, split, index).
  image: PNG bytes of a uint8 [image_size, image_size, 3] image.
  weak_caption: alt-text style bag of words (pretrain, caption_seed, eval_retrieval; else "").
  dense_caption: every object with size, pattern, colour, shape and the chain of relations.
  name_caption: "a photo of a <name>." style text (memory only; novel entities described, not named).
  label: entity of the main object (ClassLabel over the 256 entity names).
  frequency: "common" | "rare" | "novel" class of the main object's entity.
  regions: per object: bbox (BBoxFeature, normalized ymin, xmin, ymax, xmax), description
    ("a striped red star"), entity, shape, colour, pattern, size, is_main.
  relations: predicate of regions[subject] to regions[object] (chained in caption order).
  negatives: swap_attribute, replace_attribute, replace_object, swap_relation hard-negative
    captions (eval_compositional only; else "").
Splits: pretrain, caption_seed, memory, eval_classification, eval_compositional, eval_retrieval.
"""


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A `tfds` config holding one `world.WorldConfig`."""

    world: world.WorldConfig = world.WorldConfig()


def _describe(config: world.WorldConfig) -> str:
    fields = ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))
    return (
        f"Shapes World generator {world.GENERATOR_VERSION}: {fields}; {config.num_common} common, "
        f"{config.num_rare} rare and {config.num_novel} novel entities. Pre-training entities follow "
        f"p(rank) ~ (rank + 1)^-{config.zipf_exponent}; rare entities are named in 0-"
        f"{config.rare_max_name_count} pre-training captions and {config.memory_per_entity} memory texts; "
        f"novel entities are never named in pre-training or memory."
    )


_DEFAULT_WORLD = world.WorldConfig()
# All splits of the default build in under two minutes on two cores.
_CONFIGS = {
    "default": _DEFAULT_WORLD,
    # Builds in seconds, for tests.
    "test": world.WorldConfig(
        image_size=32,
        num_pretrain=256,
        num_caption_seed=32,
        memory_per_entity=1,
        eval_per_entity=1,
        num_compositional=32,
        num_retrieval=32,
    ),
}


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Shapes World: procedural scenes of named entities with dense ground truth."""

    VERSION = tfds.core.Version(world.GENERATOR_VERSION)
    RELEASE_NOTES = {
        "1.0.0": "First release: 256 entities, Zipf pre-training tail with rare and novel sets, six splits.",
    }
    BUILDER_CONFIGS = [
        ShapesWorldConfig(name=name, description=_describe(config), world=config)
        for name, config in _CONFIGS.items()
    ]
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 finds this through `importlib_resources`, which recent etils no longer installs.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        # ArrayRecord is what `tfds.data_source` reads; TFRecord would need TensorFlow to read.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config.world
        names = world.entity_names()
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict({
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "weak_caption": text,
            "dense_caption": text,
            "name_caption": text,
            "label": tfds.features.ClassLabel(names=names),
            "frequency": tfds.features.ClassLabel(names=world.FREQUENCIES),
            "regions": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "description": text,
                "entity": tfds.features.ClassLabel(names=names),
                "shape": tfds.features.ClassLabel(names=world.SHAPES),
                "colour": tfds.features.ClassLabel(names=world.COLOURS),
                "pattern": tfds.features.ClassLabel(names=world.PATTERNS),
                "size": tfds.features.ClassLabel(names=world.SIZES),
                "is_main": tfds.features.Tensor(shape=(), dtype=np.bool_),
            }),
            "relations": tfds.features.Sequence({
                "subject": tfds.features.Tensor(shape=(), dtype=np.int32),
                "predicate": tfds.features.ClassLabel(names=world.RELATIONS),
                "object": tfds.features.Tensor(shape=(), dtype=np.int32),
            }),
            "negatives": tfds.features.FeaturesDict({kind: text for kind in world.HARD_NEGATIVE_KINDS}),
        })
        return self.dataset_info_from_configs(
            description=f"{_describe(config)}\n\n{FIELDS}",
            features=features,
            metadata=tfds.core.MetadataDict(
                generator_version=world.GENERATOR_VERSION,
                world_config=dataclasses.asdict(config),
                context_length=sw_tokenizer.CONTEXT_LENGTH,
                prompt_templates=list(world.PROMPT_TEMPLATES),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config.world
        # self.data_dir is the build's temporary directory here, renamed into place on success.
        with open(os.path.join(self.data_dir, "entities.json"), "w") as f:
            json.dump(entity_table(config), f, indent=1)
        sw_tokenizer.save_tokenizer(os.path.join(self.data_dir, "tokenizer"))
        return {split: self._generate_examples(split) for split in world.SPLITS}

    def _generate_examples(self, split: str):
        generator = _world(self.builder_config.world)
        for index in range(generator.num_examples(split)):
            yield index, generator.example(split, index)


@functools.lru_cache(maxsize=8)
def _world(config: world.WorldConfig) -> world.World:
    return world.World(config)


def get_config(config: str | world.WorldConfig = "default") -> world.WorldConfig:
    """A config name ("default", "test") or a WorldConfig -> WorldConfig."""
    if isinstance(config, world.WorldConfig):
        return config
    if config not in _CONFIGS:
        raise ValueError(f"Unknown shapes_world config {config!r}; expected one of {sorted(_CONFIGS)}.")
    return _CONFIGS[config]


def prepare(data_dir: str | os.PathLike | None = None, config: str = "default") -> tfds.core.DatasetBuilder:
    """Builds `shapes_world/<config>` under data_dir unless it is there already; returns the builder.

    Read splits with `tfds.data_source("shapes_world/<config>", split=..., data_dir=data_dir)` or
    `builder.as_data_source(split)`.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder = tfds.builder(f"shapes_world/{config}", data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def tokenizer_dir(data_dir: str | os.PathLike | None = None, config: str = "default") -> str:
    """The directory holding the dataset's tokenizer.json (+ configs); builds the dataset if needed."""
    return os.fspath(prepare(data_dir, config).data_path / "tokenizer")


def entities(config: str | world.WorldConfig = "default") -> tuple[world.Entity, ...]:
    """The 256 entities, indexed by label id."""
    config = get_config(config)
    return world.make_entities(config.seed, config.num_rare, config.num_novel)


@functools.lru_cache(maxsize=8)
def _name_counts(config: world.WorldConfig) -> tuple[int, ...]:
    return tuple(int(c) for c in _world(config).pretrain_name_counts())


def entity_table(config: str | world.WorldConfig = "default") -> list[dict]:
    """Per entity: id, name, shape, colour, pattern, description, frequency, rank, pretrain_name_count.

    The same table is written as entities.json next to the built data.
    """
    config = get_config(config)
    counts = _name_counts(config)
    return [
        {**dataclasses.asdict(e), "description": e.description, "pretrain_name_count": counts[e.id]}
        for e in entities(config)
    ]


def class_names() -> tuple[str, ...]:
    """Entity names in label order (the same for every config)."""
    return world.entity_names()


def descriptions(config: str | world.WorldConfig = "default") -> tuple[str, ...]:
    """'a zorvid is a striped red star' per entity, in label order."""
    return tuple(e.description for e in entities(config))


def attribute_phrases() -> tuple[str, ...]:
    """'striped red star' per entity, in label order: each entity described by its attributes, unnamed."""
    return tuple(f"{pattern} {colour} {shape}"
                 for shape, colour, pattern in map(world.entity_attributes, range(world.NUM_ENTITIES)))


def descriptors() -> tuple[tuple[str, ...], ...]:
    """Per entity, its visual descriptors for classification by description ('<prompt>, which is <d>')."""
    return tuple((f"a {shape}", colour, pattern) for shape, colour, pattern in map(world.entity_attributes, range(world.NUM_ENTITIES)))


def prompt_templates() -> tuple[str, ...]:
    """Zero-shot prompt templates, '{}' standing for the class name."""
    return world.PROMPT_TEMPLATES


def frequency_ids(config: str | world.WorldConfig = "default") -> dict[str, np.ndarray]:
    """{'common' | 'rare' | 'novel': int64 [n] entity ids}."""
    table = entities(config)
    return {f: np.asarray([e.id for e in table if e.frequency == f], dtype=np.int64) for f in world.FREQUENCIES}
