"""Shapes World: entities, scene layout, captions and hard negatives (rendering: `render.py`).

Pure numpy and PIL, usable without TFDS. Every example is a function of
(`WorldConfig`, split, index): each draws from its own `np.random.Generator`
seeded by (seed, split, index, stream), so splits and examples can be generated
in any order or in parallel and still give the same bytes.

Streams are separate so that cheap questions stay cheap: the entity and naming
draws of a pre-training example (stream `_ENTITY`) do not depend on its layout
or pixels, which is how `World.pretrain_name_counts` counts names without
rendering anything.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from vlm_jax.data.shapes_world.render import (COLOUR_RGB, COLOURS, PATTERNS, SHAPES, decode_png, encode_png,
                                               pattern_mask, pattern_period, render, second_shade, shape_mask)

# Bump (and add a release note in builder.py) whenever any output of this module changes.
GENERATOR_VERSION = "1.0.0"

SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
FREQUENCIES = ("common", "rare", "novel")
HARD_NEGATIVE_KINDS = ("swap_attribute", "replace_attribute", "replace_object", "swap_relation")
SPLITS = (
    "pretrain",
    "caption_seed",
    "memory",
    "eval_classification",
    "eval_compositional",
    "eval_retrieval",
)
NUM_ENTITIES = len(SHAPES) * len(COLOURS) * len(PATTERNS)

# Zero-shot prompts and the memory's naming texts share these, as web alt-text and prompts do.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a photo of the {}.",
    "a {}.",
)

# Alt-text filler: words that carry no information about the objects.
NOISE_WORDS = (
    "photo", "image", "picture", "stock", "free", "download", "wallpaper", "hd", "vector",
    "illustration", "clipart", "design", "art", "background", "cool", "new", "best", "simple",
    "shapes", "geometry", "icon", "logo", "poster", "print", "sale", "cute", "modern", "abstract",
)


_SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}
_ENTITY, _LAYOUT, _TEXT, _RENDER, _NEGATIVE = range(5)
_ENTITY_TABLE_STREAM = 1_000_003
_NAME_SEED = 20_240_611  # names are fixed by the generator version, not by the config seed

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "pl", "sk", "st", "tr", "sh", "th", "zh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "x", "k", "d", "m", "th")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the generated data.

    Attributes:
      seed: seeds every example, the entity ranking and the rare naming plan.
      image_size: canvas side in pixels.
      zipf_exponent: pre-training objects draw entities with p(rank) ~ (rank + 1) ** -zipf_exponent
        over the fixed entity ranking, so name counts of common entities follow the same law.
      num_rare: entities just after the common head of the ranking; each is named in exactly
        0..`rare_max_name_count` pre-training captions (RECO's tail, RAR's close confusions).
      num_novel: entities at the end of the ranking; never named in pre-training or memory texts,
        known only from their descriptions (GRAIN's novel concepts).
      rare_max_name_count: most pre-training captions that name one rare entity.
      weak_name_rate: chance that a weak caption names its main object when that is common.
      weak_drop_rate: chance that each attribute word is dropped from a weak caption.
      weak_wrong_rate: chance that a kept attribute word is replaced by a wrong value.
      weak_noise_words: mean (Poisson) number of noise words in a weak caption.
      background_noise: standard deviation of the blocky background noise (0-255 scale).
      num_pretrain, num_caption_seed, num_compositional, num_retrieval: split sizes.
      memory_per_entity: memory examples per entity (all entities, rare and novel included).
      eval_per_entity: classification eval examples per entity (balanced).
    """

    seed: int = 0
    image_size: int = 64
    zipf_exponent: float = 0.7
    num_rare: int = 64
    num_novel: int = 32
    rare_max_name_count: int = 3
    weak_name_rate: float = 0.6
    weak_drop_rate: float = 0.3
    weak_wrong_rate: float = 0.05
    weak_noise_words: float = 1.0
    background_noise: float = 10.0
    num_pretrain: int = 24_000
    num_caption_seed: int = 1_000
    memory_per_entity: int = 16
    eval_per_entity: int = 10
    num_compositional: int = 1_000
    num_retrieval: int = 1_000

    def __post_init__(self):
        if self.num_rare + self.num_novel >= NUM_ENTITIES:
            raise ValueError(
                f"num_rare + num_novel must leave common entities: got {self.num_rare} + "
                f"{self.num_novel} >= {NUM_ENTITIES}; lower one of them."
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 for patterns to be visible, got {self.image_size}.")

    @property
    def num_common(self) -> int:
        return NUM_ENTITIES - self.num_rare - self.num_novel

    def num_examples(self, split: str) -> int:
        sizes = {
            "pretrain": self.num_pretrain,
            "caption_seed": self.num_caption_seed,
            "memory": self.memory_per_entity * NUM_ENTITIES,
            "eval_classification": self.eval_per_entity * NUM_ENTITIES,
            "eval_compositional": self.num_compositional,
            "eval_retrieval": self.num_retrieval,
        }
        return sizes[split]


@dataclasses.dataclass(frozen=True)
class Entity:
    """A fine-grained class: one (shape, colour, pattern) combination with an invented name."""

    id: int
    name: str
    shape: str
    colour: str
    pattern: str
    frequency: str  # "common" | "rare" | "novel"
    rank: int  # position in the Zipf ranking of pre-training frequency (0 = most frequent)

    @property
    def attributes(self) -> str:
        return f"{self.pattern} {self.colour} {self.shape}"

    @property
    def description(self) -> str:
        return f"a {self.name} is a {self.attributes}"


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object; `box` is (x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

    shape: str
    colour: str
    pattern: str
    size: str
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def entity_id(self) -> int:
        return entity_id(self.shape, self.colour, self.pattern)

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.pattern} {self.colour} {self.shape}"

    @property
    def region_description(self) -> str:
        return f"a {self.pattern} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects in caption order; relation k links objects k and k + 1 (a chain)."""

    objects: tuple[SceneObject, ...]
    relations: tuple[str, ...]
    main: int  # index of the object a weak caption may name and whose entity is the label
    background: tuple[int, int, int] = (128, 128, 128)


def entity_id(shape: str, colour: str, pattern: str) -> int:
    return (SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)) * len(PATTERNS) + PATTERNS.index(pattern)


def entity_attributes(index: int) -> tuple[str, str, str]:
    """Entity id -> (shape, colour, pattern)."""
    shape, rest = divmod(index, len(COLOURS) * len(PATTERNS))
    colour, pattern = divmod(rest, len(PATTERNS))
    return SHAPES[shape], COLOURS[colour], PATTERNS[pattern]


@functools.lru_cache(maxsize=None)
def entity_names() -> tuple[str, ...]:
    """The 256 invented names, indexed by entity id; fixed by `GENERATOR_VERSION`."""
    rng = np.random.default_rng(_NAME_SEED)
    reserved = set(caption_words())
    names: list[str] = []
    while len(names) < NUM_ENTITIES:
        syllables = [
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(int(rng.integers(2, 4)))
        ]
        syllables[-1] += _CODAS[rng.integers(len(_CODAS))]
        name = "".join(syllables)
        if 4 <= len(name) <= 9 and name not in reserved and name not in names:
            names.append(name)
    return tuple(names)


def caption_words() -> tuple[str, ...]:
    """Every word a caption can use besides entity names."""
    words = set(SHAPES + COLOURS + PATTERNS + SIZES + NOISE_WORDS)
    for phrase in RELATIONS + PROMPT_TEMPLATES + ("a is", "which is"):
        words.update(re.findall(r"[a-z]+", phrase))
    return tuple(sorted(words))


@functools.lru_cache(maxsize=16)
def make_entities(seed: int, num_rare: int, num_novel: int) -> tuple[Entity, ...]:
    """The entity table, indexed by id. The ranking is a seeded permutation of all entities."""
    order = np.random.default_rng([seed, _ENTITY_TABLE_STREAM]).permutation(NUM_ENTITIES)
    rank_of = np.empty(NUM_ENTITIES, dtype=np.int64)
    rank_of[order] = np.arange(NUM_ENTITIES)
    num_common = NUM_ENTITIES - num_rare - num_novel
    names = entity_names()
    table = []
    for index in range(NUM_ENTITIES):
        rank = int(rank_of[index])
        frequency = "common" if rank < num_common else "rare" if rank < num_common + num_rare else "novel"
        table.append(Entity(index, names[index], *entity_attributes(index), frequency=frequency, rank=rank))
    return tuple(table)


def relation(a: SceneObject, b: SceneObject) -> str:
    """The relation of `a` to `b` along the axis where their centres differ most."""
    dx = (b.box[0] + b.box[2]) - (a.box[0] + a.box[2])
    dy = (b.box[1] + b.box[3]) - (a.box[1] + a.box[3])
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


_INVERSE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


# ---------------------------------------------------------------- captions


def dense_caption(objects: Sequence[SceneObject], relations: Sequence[str]) -> str:
    """'a large striped red star to the left of a small solid blue circle, which is above ...'."""
    text = objects[0].phrase
    for k, rel in enumerate(relations):
        text += (" " if k == 0 else ", which is ") + f"{rel} {objects[k + 1].phrase}"
    return text


_PHRASE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(PATTERNS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
)
_REL = "|".join(RELATIONS)
_HEAD = re.compile(rf"^({_PHRASE.pattern})(?: ({_REL}) ({_PHRASE.pattern}))?$")
_LINK = re.compile(rf"^({_REL}) ({_PHRASE.pattern})$")


def parse_dense_caption(text: str) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Inverse of `dense_caption`: -> ([(size, pattern, colour, shape), ...], [relation, ...])."""
    head, *links = text.split(", which is ")
    match = _HEAD.match(head)
    if match is None:
        raise ValueError(f"Not a Shapes World dense caption: {text!r}.")
    groups = match.groups()
    objects = [tuple(groups[1:5])]
    relations = []
    if groups[5] is not None:
        relations.append(groups[5])
        objects.append(tuple(groups[7:11]))
    for link in links:
        link_match = _LINK.match(link)
        if link_match is None or not relations:
            raise ValueError(f"Not a Shapes World dense caption: {text!r}.")
        relations.append(link_match.group(1))
        objects.append(tuple(link_match.groups()[2:6]))
    return objects, relations


def weak_caption(scene: Scene, name: str | None, config: WorldConfig, rng: np.random.Generator) -> str:
    """A shuffled bag of attribute words, maybe the main entity's name, and noise words."""
    words = []
    for obj in scene.objects:
        for values, word in ((SIZES, obj.size), (PATTERNS, obj.pattern), (COLOURS, obj.colour), (SHAPES, obj.shape)):
            if rng.random() < config.weak_drop_rate:
                continue
            if rng.random() < config.weak_wrong_rate:
                word = values[rng.integers(len(values))]
            words.append(word)
    if name is not None:
        words.append(name)
    num_noise = int(rng.poisson(config.weak_noise_words))
    words.extend(NOISE_WORDS[i] for i in rng.integers(len(NOISE_WORDS), size=num_noise))
    if not words:
        words.append(NOISE_WORDS[rng.integers(len(NOISE_WORDS))])
    rng.shuffle(words)
    return " ".join(words)


def hard_negatives(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """One negative caption per kind, each differing from the positive only in that kind's way.

    swap_attribute: two objects exchange one attribute value (colour, pattern or size).
    replace_attribute: one object's colour, pattern or size becomes another value.
    replace_object: one object's shape becomes another shape.
    swap_relation: one relation is reversed (A left of B -> A right of B).
    Needs a scene with at least two objects that differ in colour, pattern or size.
    """
    objects = list(scene.objects)
    relations = list(scene.relations)
    attribute_values = {"size": SIZES, "pattern": PATTERNS, "colour": COLOURS}

    swaps = [
        (i, j, attr)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        for attr in attribute_values
        if getattr(objects[i], attr) != getattr(objects[j], attr)
    ]
    if not swaps or not relations:
        raise ValueError("hard_negatives needs two objects that differ in colour, pattern or size.")
    i, j, attr = swaps[rng.integers(len(swaps))]
    swapped = list(objects)
    swapped[i] = dataclasses.replace(objects[i], **{attr: getattr(objects[j], attr)})
    swapped[j] = dataclasses.replace(objects[j], **{attr: getattr(objects[i], attr)})

    k = int(rng.integers(len(objects)))
    attr = tuple(attribute_values)[rng.integers(len(attribute_values))]
    choices = [v for v in attribute_values[attr] if v != getattr(objects[k], attr)]
    replaced_attribute = list(objects)
    replaced_attribute[k] = dataclasses.replace(objects[k], **{attr: choices[rng.integers(len(choices))]})

    k = int(rng.integers(len(objects)))
    shapes = [s for s in SHAPES if s != objects[k].shape]
    replaced_object = list(objects)
    replaced_object[k] = dataclasses.replace(objects[k], shape=shapes[rng.integers(len(shapes))])

    k = int(rng.integers(len(relations)))
    swapped_relations = list(relations)
    swapped_relations[k] = _INVERSE_RELATION[relations[k]]

    return {
        "swap_attribute": dense_caption(swapped, relations),
        "replace_attribute": dense_caption(replaced_attribute, relations),
        "replace_object": dense_caption(replaced_object, relations),
        "swap_relation": dense_caption(objects, swapped_relations),
    }


# ---------------------------------------------------------------- rendering


class World:
    """Generates every split of one `WorldConfig`."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        self.entities = make_entities(config.seed, config.num_rare, config.num_novel)
        ranks = np.asarray([e.rank for e in self.entities], dtype=np.float64)
        weights = (ranks + 1.0) ** -config.zipf_exponent
        self._zipf_cdf = np.cumsum(weights / weights.sum())
        self._by_frequency = {f: [e.id for e in self.entities if e.frequency == f] for f in FREQUENCIES}
        self._rare_plan = self._plan_rare_names()

    def _plan_rare_names(self) -> dict[int, int]:
        """pre-training index -> rare entity named there; each rare entity gets 0..max indices."""
        rng = np.random.default_rng([self.config.seed, _ENTITY_TABLE_STREAM, 1])
        rare = self._by_frequency["rare"]
        counts = rng.integers(0, self.config.rare_max_name_count + 1, size=len(rare))
        wanted = [entity for entity, count in zip(rare, counts) for _ in range(count)]
        wanted = wanted[: self.config.num_pretrain // 2]
        indices = rng.choice(self.config.num_pretrain, size=len(wanted), replace=False)
        return {int(i): entity for i, entity in zip(indices, wanted)}

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, _SPLIT_CODE[split], index, stream])

    def num_examples(self, split: str) -> int:
        return self.config.num_examples(split)

    # -- entity and naming draws (stream _ENTITY)

    def _zipf_entities(self, rng: np.random.Generator, count: int) -> list[int]:
        draws = np.searchsorted(self._zipf_cdf, rng.random(count), side="right")
        return [int(min(d, NUM_ENTITIES - 1)) for d in draws]

    def entity_draw(self, split: str, index: int) -> tuple[list[int], bool]:
        """-> (entity ids, the first being the main object; whether the weak caption names it)."""
        if split not in _SPLIT_CODE:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        if not 0 <= index < self.num_examples(split):
            raise IndexError(f"{split} has {self.num_examples(split)} examples in this config, asked for index {index}.")
        rng = self._rng(split, index, _ENTITY)
        if split in ("pretrain", "caption_seed", "eval_retrieval", "eval_compositional"):
            low, high = (2, 3) if split == "eval_compositional" else (1, 4)
            count = int(rng.integers(low, high + 1))
            if split in ("pretrain", "caption_seed"):
                ids = self._zipf_entities(rng, count)
            else:
                ids = [int(i) for i in rng.integers(NUM_ENTITIES, size=count)]
            planned = self._rare_plan.get(index) if split == "pretrain" else None
            if planned is not None:
                ids[0] = planned
                return ids, True
            named = self.entities[ids[0]].frequency == "common" and rng.random() < self.config.weak_name_rate
            return ids, bool(named)
        if split == "memory":
            main = index // self.config.memory_per_entity
            ids = [main] + [int(i) for i in rng.integers(NUM_ENTITIES, size=int(rng.integers(0, 2)))]
            return ids, self.entities[main].frequency != "novel"
        return [index // self.config.eval_per_entity], False

    def pretrain_name_counts(self) -> np.ndarray:
        """int64 [NUM_ENTITIES]: how many pre-training captions name each entity."""
        counts = np.zeros(NUM_ENTITIES, dtype=np.int64)
        for index in range(self.config.num_pretrain):
            ids, named = self.entity_draw("pretrain", index)
            if named:
                counts[ids[0]] += 1
        return counts

    # -- layout (stream _LAYOUT)

    def layout(self, split: str, index: int) -> Scene:
        ids, _ = self.entity_draw(split, index)
        rng = self._rng(split, index, _LAYOUT)
        size = self.config.image_size
        grey = rng.uniform(70, 190)
        background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.uniform(-30, 30, size=3))
        objects = None
        minimum = 2 if split == "eval_compositional" else 1
        # A crowded draw rarely fails to fit; dropping its last objects keeps the example valid.
        for count in range(len(ids), minimum - 1, -1):
            for _ in range(50):
                objects = self._place(ids[:count], split, rng)
                if objects is not None:
                    break
            if objects is not None:
                break
        if objects is None:
            raise RuntimeError(f"Could not lay out {split}[{index}] at image_size {size}; use a larger image_size.")
        if split == "eval_compositional" and not self._differs(objects):
            objects[1] = dataclasses.replace(objects[1], size=SIZES[1 - SIZES.index(objects[1].size)])
        order = [int(i) for i in rng.permutation(len(objects))]
        ordered = tuple(objects[i] for i in order)
        relations = tuple(relation(a, b) for a, b in zip(ordered, ordered[1:]))
        return Scene(ordered, relations, main=order.index(0), background=background)

    @staticmethod
    def _differs(objects: Sequence[SceneObject]) -> bool:
        return any(
            (a.size, a.pattern, a.colour) != (b.size, b.pattern, b.colour)
            for k, a in enumerate(objects) for b in objects[k + 1:]
        )

    def _place(self, ids: list[int], split: str, rng: np.random.Generator, attempts: int = 30):
        """Boxes with little overlap and a clear dominant axis between every pair, or None."""
        size = self.config.image_size
        placed: list[SceneObject] = []
        for k, ident in enumerate(ids):
            shape, colour, pattern = entity_attributes(ident)
            if split == "memory" and k > 0:
                object_size = "small"
            else:
                object_size = SIZES[rng.integers(2)]
            low, high = (0.2, 0.28) if object_size == "small" else (0.34, 0.46)
            for _ in range(attempts):
                side = int(round(rng.uniform(low, high) * size))
                aspect = rng.uniform(0.85, 1.15)
                width, height = side, max(4, min(size, int(round(side * aspect))))
                x0 = int(rng.integers(0, size - width + 1))
                y0 = int(rng.integers(0, size - height + 1))
                candidate = SceneObject(shape, colour, pattern, object_size, (x0, y0, x0 + width, y0 + height))
                if all(self._compatible(candidate, other) for other in placed):
                    placed.append(candidate)
                    break
            else:
                return None
        return placed

    def _compatible(self, a: SceneObject, b: SceneObject) -> bool:
        ax0, ay0, ax1, ay1 = a.box
        bx0, by0, bx1, by1 = b.box
        overlap = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
        smaller = min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
        dx = abs((ax0 + ax1) - (bx0 + bx1)) / 2
        dy = abs((ay0 + ay1) - (by0 + by1)) / 2
        return overlap <= 0.1 * smaller and abs(dx - dy) >= 0.08 * self.config.image_size

    # -- texts and pixels

    def name_caption(self, entity: Entity, rng: np.random.Generator) -> str:
        """'a photo of a zorvid.'; novel entities are described, never named."""
        words = entity.attributes if entity.frequency == "novel" else entity.name
        return PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(words)

    def example(self, split: str, index: int) -> dict:
        """One example as the TFDS builder stores it (see builder.py for the field meanings)."""
        ids, named = self.entity_draw(split, index)
        scene = self.layout(split, index)
        text_rng = self._rng(split, index, _TEXT)
        main = self.entities[ids[0]]
        has_weak = split in ("pretrain", "caption_seed", "eval_retrieval")
        negatives = dict.fromkeys(HARD_NEGATIVE_KINDS, "")
        if split == "eval_compositional":
            negatives = hard_negatives(scene, self._rng(split, index, _NEGATIVE))
        pixels = render(scene, self.config.image_size, self.config.background_noise, self._rng(split, index, _RENDER))
        size = float(self.config.image_size)
        return {
            "index": index,
            "image": encode_png(pixels),
            "weak_caption": weak_caption(scene, main.name if named else None, self.config, text_rng) if has_weak else "",
            "dense_caption": dense_caption(scene.objects, scene.relations),
            "name_caption": self.name_caption(main, text_rng) if split == "memory" else "",
            "label": main.id,
            "frequency": main.frequency,
            "regions": {
                "bbox": [
                    np.asarray([o.box[1] / size, o.box[0] / size, o.box[3] / size, o.box[2] / size], np.float32)
                    for o in scene.objects
                ],
                "description": [o.region_description for o in scene.objects],
                "entity": [o.entity_id for o in scene.objects],
                "shape": [o.shape for o in scene.objects],
                "colour": [o.colour for o in scene.objects],
                "pattern": [o.pattern for o in scene.objects],
                "size": [o.size for o in scene.objects],
                "is_main": [k == scene.main for k in range(len(scene.objects))],
            },
            "relations": {
                "subject": list(range(len(scene.relations))),
                "predicate": list(scene.relations),
                "object": list(range(1, len(scene.relations) + 1)),
            },
            "negatives": negatives,
        }
