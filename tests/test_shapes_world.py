"""Shapes World: the premises hold in numbers, the ground truth is exact, the TFDS build reads back."""

import dataclasses
import json
import os
import re
import sys

import numpy as np
import pytest

from vlm_jax.data import shapes_world
from vlm_jax.data.shapes_world import tokenizer as sw_tokenizer
from vlm_jax.data.shapes_world import world

DEFAULT = shapes_world.get_config("default")
TEST = shapes_world.get_config("test")
NAMES = world.entity_names()


@pytest.fixture(scope="module")
def test_world():
    return world.World(TEST)


@pytest.fixture(scope="module")
def test_examples(test_world):
    return {split: [test_world.example(split, i) for i in range(test_world.num_examples(split))] for split in world.SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return shapes_world.prepare(data_dir, "test"), data_dir


def _texts(example):
    return [example["weak_caption"], example["dense_caption"], example["name_caption"],
            *example["regions"]["description"], *example["negatives"].values()]


def _named_entities(text):
    return [NAMES.index(word) for word in re.findall(r"[a-z]+", text) if word in NAMES]


def test_names_are_unique_pronounceable_and_not_caption_words():
    assert len(set(NAMES)) == world.NUM_ENTITIES == 256
    assert not set(NAMES) & set(world.caption_words())
    assert all(re.fullmatch(r"[a-z]{4,9}", name) and re.search(r"[aeiouy]", name) for name in NAMES)


def test_name_counts_match_the_names_written_in_pretraining_captions(test_world, test_examples):
    written = np.zeros(world.NUM_ENTITIES, dtype=np.int64)
    for example in test_examples["pretrain"]:
        for entity in (e for text in _texts(example) for e in _named_entities(text)):
            written[entity] += 1
    np.testing.assert_array_equal(written, test_world.pretrain_name_counts())
    assert written.sum() > 0


def test_default_pretraining_names_follow_a_zipf_tail_with_rare_and_novel_sets():
    counts = world.World(DEFAULT).pretrain_name_counts()
    table = shapes_world.entities("default")
    by_frequency = {f: np.asarray([counts[e.id] for e in table if e.frequency == f]) for f in world.FREQUENCIES}
    assert [len(by_frequency[f]) for f in world.FREQUENCIES] == [DEFAULT.num_common, DEFAULT.num_rare, DEFAULT.num_novel]
    assert by_frequency["rare"].max() <= DEFAULT.rare_max_name_count
    assert by_frequency["novel"].max() == 0
    # The least named common entity is still named several times more than any rare one.
    assert by_frequency["common"].min() >= 5 * DEFAULT.rare_max_name_count
    common = sorted(((e.rank, counts[e.id]) for e in table if e.frequency == "common"))
    ranks, common_counts = np.asarray(common, dtype=np.float64).T
    slope = np.polyfit(np.log(ranks + 1), np.log(common_counts), 1)[0]
    assert abs(slope + DEFAULT.zipf_exponent) < 0.15, slope


def test_memory_covers_every_entity_and_names_rare_ones_more_than_pretraining_does(test_examples):
    memory = test_examples["memory"]
    table = shapes_world.entities("test")
    assert sorted(example["label"] for example in memory) == list(range(world.NUM_ENTITIES))
    for example in memory:
        entity = table[example["label"]]
        named = _named_entities(example["name_caption"])
        assert named == ([] if entity.frequency == "novel" else [entity.id]), example["name_caption"]
        assert entity.attributes in example["name_caption"] or entity.frequency != "novel"
    assert DEFAULT.memory_per_entity >= 4 * DEFAULT.rare_max_name_count


def test_novel_entities_are_never_named_in_pretraining_caption_seed_or_memory(test_examples):
    novel = set(shapes_world.frequency_ids("test")["novel"].tolist())
    assert len(novel) == TEST.num_novel
    for split in ("pretrain", "caption_seed", "memory"):
        for example in test_examples[split]:
            assert not novel & {e for text in _texts(example) for e in _named_entities(text)}


def test_eval_classification_is_balanced_single_object_with_frequency_field(test_examples):
    examples = test_examples["eval_classification"]
    labels = np.asarray([example["label"] for example in examples])
    np.testing.assert_array_equal(np.bincount(labels, minlength=256), np.full(256, TEST.eval_per_entity))
    table = shapes_world.entities("test")
    for example in examples:
        assert len(example["regions"]["entity"]) == 1 and example["regions"]["entity"][0] == example["label"]
        assert example["frequency"] == table[example["label"]].frequency


def test_dense_caption_parses_back_to_the_regions_and_relations(test_examples):
    for split in world.SPLITS:
        for example in test_examples[split]:
            objects, relations = world.parse_dense_caption(example["dense_caption"])
            regions = example["regions"]
            assert objects == list(zip(regions["size"], regions["pattern"], regions["colour"], regions["shape"]))
            assert relations == example["relations"]["predicate"]
            for shape, colour, pattern, entity in zip(regions["shape"], regions["colour"], regions["pattern"], regions["entity"]):
                assert world.entity_attributes(entity) == (shape, colour, pattern)


def test_relations_follow_box_centres(test_examples):
    for example in test_examples["pretrain"]:
        boxes = example["regions"]["bbox"]  # ymin, xmin, ymax, xmax
        for subject, predicate, obj in zip(*(example["relations"][k] for k in ("subject", "predicate", "object"))):
            (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) = boxes[subject], boxes[obj]
            dx, dy = (bx0 + bx1) - (ax0 + ax1), (by0 + by1) - (ay0 + ay1)
            expected = {"to the left of": dx > abs(dy), "to the right of": -dx > abs(dy),
                        "above": dy > abs(dx), "below": -dy > abs(dx)}
            assert expected[predicate], (predicate, boxes[subject], boxes[obj])


def _difference(positive, negative):
    (p_objects, p_relations), (n_objects, n_relations) = map(world.parse_dense_caption, (positive, negative))
    assert len(p_objects) == len(n_objects)
    fields = ("size", "pattern", "colour", "shape")
    changed = [(k, f, p[i], n[i]) for k, (p, n) in enumerate(zip(p_objects, n_objects))
               for i, f in enumerate(fields) if p[i] != n[i]]
    changed_relations = [(k, p, n) for k, (p, n) in enumerate(zip(p_relations, n_relations)) if p != n]
    return changed, changed_relations


def test_hard_negatives_differ_from_the_positive_only_in_their_kind():
    generator = world.World(dataclasses.replace(TEST, num_compositional=200))
    inverse = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
    for index in range(200):
        scene = generator.layout("eval_compositional", index)
        positive = world.dense_caption(scene.objects, scene.relations)
        negatives = world.hard_negatives(scene, np.random.default_rng(index))
        assert set(negatives) == set(world.HARD_NEGATIVE_KINDS)
        assert all(negative != positive for negative in negatives.values())

        changed, relations = _difference(positive, negatives["swap_attribute"])
        assert not relations and len(changed) == 2
        (i, field_i, old_i, new_i), (j, field_j, old_j, new_j) = changed
        assert i != j and field_i == field_j != "shape" and (old_i, new_i) == (new_j, old_j)

        changed, relations = _difference(positive, negatives["replace_attribute"])
        assert not relations and len(changed) == 1 and changed[0][1] in ("size", "pattern", "colour")

        changed, relations = _difference(positive, negatives["replace_object"])
        assert not relations and len(changed) == 1 and changed[0][1] == "shape"

        changed, relations = _difference(positive, negatives["swap_relation"])
        assert not changed and len(relations) == 1 and inverse[relations[0][1]] == relations[0][2]


def test_compositional_split_stores_the_four_negative_kinds(test_examples):
    for example in test_examples["eval_compositional"]:
        assert len(example["regions"]["entity"]) >= 2
        assert all(example["negatives"][kind] for kind in world.HARD_NEGATIVE_KINDS)
    assert all(not any(e["negatives"].values()) for e in test_examples["pretrain"])


@pytest.mark.parametrize("image_size", [32, 64, 97])
def test_boxes_contain_exactly_the_pixels_each_object_draws(image_size):
    generator = world.World(dataclasses.replace(TEST, image_size=image_size))
    for index in range(40):
        scene = generator.layout("pretrain", index)
        empty = world.render(dataclasses.replace(scene, objects=()), image_size, 10.0, np.random.default_rng(index))
        for obj in scene.objects:
            alone = world.render(dataclasses.replace(scene, objects=(obj,)), image_size, 10.0, np.random.default_rng(index))
            ys, xs = np.nonzero(np.any(alone != empty, axis=-1))
            x0, y0, x1, y1 = obj.box
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1), (obj, image_size)


def test_regions_bbox_is_the_normalized_pixel_box(test_world, test_examples):
    size = TEST.image_size
    for example in test_examples["pretrain"][:50]:
        scene = test_world.layout("pretrain", example["index"])
        for obj, bbox in zip(scene.objects, example["regions"]["bbox"]):
            x0, y0, x1, y1 = obj.box
            np.testing.assert_allclose(bbox, np.asarray([y0, x0, y1, x1]) / size)


def test_same_seed_gives_same_bytes_in_any_order_and_another_seed_differs():
    first = world.World(TEST)
    second = world.World(TEST)
    other = world.World(dataclasses.replace(TEST, seed=1))
    for split in world.SPLITS:
        indices = [0, 5, 3]
        forward = [first.example(split, i) for i in indices]
        backward = [second.example(split, i) for i in reversed(indices)][::-1]
        for a, b in zip(forward, backward):
            assert a["image"] == b["image"] and _texts(a) == _texts(b)
        assert all(a["image"] != other.example(split, i)["image"] for a, i in zip(forward, indices))


def test_out_of_range_index_is_an_error(test_world):
    with pytest.raises(IndexError, match="memory has 256 examples"):
        test_world.example("memory", 256)


def test_images_decode_to_the_configured_size(test_examples):
    pixels = world.decode_png(test_examples["pretrain"][0]["image"])
    assert pixels.shape == (TEST.image_size, TEST.image_size, 3) and pixels.dtype == np.uint8


def test_weak_captions_are_bags_of_known_words(test_examples):
    allowed = set(world.caption_words()) | set(NAMES)
    for example in test_examples["pretrain"]:
        assert example["weak_caption"] and set(example["weak_caption"].split()) <= allowed


def test_tfds_build_reads_back_through_data_source_without_tensorflow(built, test_examples):
    import tensorflow_datasets as tfds

    builder, data_dir = built
    assert "tensorflow" not in sys.modules
    assert builder.info.version == world.GENERATOR_VERSION
    assert f"zipf_exponent={TEST.zipf_exponent}" in builder.info.description
    for split in world.SPLITS:
        source = tfds.data_source("shapes_world/test", split=split, data_dir=os.fspath(data_dir))
        assert len(source) == TEST.num_examples(split)
        record = source[0]
        expected = test_examples[split][int(record["index"])]
        assert record["image"] == expected["image"]
        assert record["dense_caption"].decode() == expected["dense_caption"]
        assert record["label"] == expected["label"]
        assert record["frequency"] == world.FREQUENCIES.index(expected["frequency"])
        np.testing.assert_allclose(np.stack(record["regions"]["bbox"]), np.stack(expected["regions"]["bbox"]))
        assert world.decode_png(record["image"]).shape == (TEST.image_size, TEST.image_size, 3)
    assert "tensorflow" not in sys.modules


def test_builder_writes_entity_table_and_tokenizer_next_to_the_data(built):
    builder, data_dir = built
    with open(builder.data_path / "entities.json") as f:
        table = json.load(f)
    assert table == shapes_world.entity_table("test")
    assert [row["name"] for row in table] == list(shapes_world.class_names())
    assert table[0]["description"] == f"a {table[0]['name']} is a {table[0]['pattern']} {table[0]['colour']} {table[0]['shape']}"
    assert shapes_world.tokenizer_dir(data_dir, "test") == os.fspath(builder.data_path / "tokenizer")
    assert builder.info.metadata["context_length"] == sw_tokenizer.CONTEXT_LENGTH


def test_tfds_builder_by_name_prepares_the_test_config(tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds.builder("shapes_world/test", data_dir=os.fspath(tmp_path))
    builder.download_and_prepare()
    assert builder.info.splits["memory"].num_examples == TEST.num_examples("memory")
    assert len(builder.as_data_source("eval_retrieval")) == TEST.num_retrieval


def test_zero_shot_accessors_are_aligned_with_labels():
    table = shapes_world.entities()
    assert [e.id for e in table] == list(range(256))
    assert shapes_world.descriptions()[7] == table[7].description
    assert shapes_world.descriptors()[7] == (f"a {table[7].shape}", table[7].colour, table[7].pattern)
    assert all("{}" in template for template in shapes_world.prompt_templates())
    ids = shapes_world.frequency_ids()
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(256))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return sw_tokenizer.save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_tokenizer_round_trips_every_name_and_description_without_unknown_tokens(tokenizer_path):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_path, "tokenizer.json"))
    eos = tok.token_to_id(sw_tokenizer.EOS_TOKEN)
    assert eos == tok.get_vocab_size() - 1 == sw_tokenizer.VOCAB_SIZE - 1
    split_names = 0
    for entity in shapes_world.entities():
        encoding = tok.encode(f"a photo of a {entity.name}.")
        assert encoding.ids[0] == tok.token_to_id(sw_tokenizer.BOS_TOKEN) and encoding.ids[-1] == eos
        assert tok.decode(encoding.ids) == f"a photo of a {entity.name}."
        assert tok.decode(tok.encode(entity.description).ids) == entity.description
        split_names += len(tok.encode(f" {entity.name}", add_special_tokens=False).ids) > 1
    assert split_names > 200  # names are sub-word sequences, not single tokens
    assert tok.encode("A Striped RED Star").ids == tok.encode("a striped red star").ids


def test_longest_dense_caption_fits_the_context_length(tokenizer_path):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_path, "tokenizer.json"))
    four = world.SceneObject("hexagon", "purple", "checkered", "large")
    longest = world.dense_caption([four] * 4, ["to the right of"] * 3)
    assert len(tok.encode(longest).ids) <= sw_tokenizer.CONTEXT_LENGTH


def test_tokenizer_loads_through_transformers_and_vlm_jax(tokenizer_path):
    import tokenizers

    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_path, "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    texts = ["a photo of a " + NAMES[0] + ".", shapes_world.descriptions()[3]]
    assert hf.model_max_length == sw_tokenizer.CONTEXT_LENGTH
    assert hf(texts)["input_ids"] == [tok.encode(t).ids for t in texts]
    assert hf.pad_token_id == tok.token_to_id(sw_tokenizer.PAD_TOKEN)

    from vlm_jax.data.tokenizer import Tokenizer

    ours = Tokenizer.from_dir(tokenizer_path)
    ids = ours(texts)
    assert ids.shape == (2, sw_tokenizer.CONTEXT_LENGTH) and ids.dtype == np.int32
    for row, text in zip(ids, texts):
        reference = tok.encode(text).ids
        np.testing.assert_array_equal(row[: len(reference)], reference)
        assert (row[len(reference):] == ours.pad_id).all()
    assert ours.eos_id == tok.get_vocab_size() - 1


def test_builder_version_is_the_generator_version_and_has_release_notes():
    assert str(shapes_world.ShapesWorld.VERSION) == world.GENERATOR_VERSION
    assert world.GENERATOR_VERSION in shapes_world.ShapesWorld.RELEASE_NOTES
    assert {c.name for c in shapes_world.ShapesWorld.BUILDER_CONFIGS} == {"default", "test"}
