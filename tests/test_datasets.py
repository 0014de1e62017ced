"""Dataset registry: TFDS builders, label order of the published class names, templates, sources."""

import dataclasses
import io
import json
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from vlm_jax.data import datasets, pipeline
from vlm_jax.data.preprocess import PreprocessSpec

REQUIRED = ["imagenet1k", "caltech101", "pets", "cars", "flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
            "eurosat", "ucf101", "cub200", "stanford_dogs", "places365", "cifar10", "cifar100", "shapes_world",
            "shapes_world_descriptions"]
CLASS_COUNTS = {"imagenet1k": 1000, "caltech101": 102, "pets": 37, "cars": 196, "flowers": 102, "food101": 101,
                "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101, "places365": 365,
                "cifar10": 10, "cifar100": 100}


def test_every_required_dataset_is_registered():
    assert sorted(datasets.REGISTRY) == sorted(REQUIRED)
    with pytest.raises(KeyError, match="registered"):
        datasets.get("imagenet")


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_published_class_names_match_the_tfds_label_space(name):
    entry = datasets.get(name)
    names = entry.class_names()
    assert len(names) == CLASS_COUNTS[name]
    # OpenAI's ImageNet list names two class pairs alike ("missile", "sunglasses"); kept as published.
    assert len(set(names)) == len(names) - (2 if name == "imagenet1k" else 0)
    if entry.tfds_name is not None:
        label = tfds.builder(entry.tfds_name.split(":")[0]).info.features[entry.label_key]
        assert label.num_classes == len(names)


def test_class_names_follow_tfds_label_order_where_tfds_records_names():
    def tfds_names(name):
        return tfds.builder(name).info.features["label"].names

    assert datasets.get("cars").class_names() == tfds_names("cars196")
    assert datasets.get("food101").class_names() == [n.replace("_", " ") for n in tfds_names("food101")]
    assert datasets.get("dtd").class_names() == tfds_names("dtd")
    flowers = zip(datasets.get("flowers").class_names(), tfds_names("oxford_flowers102"), strict=True)
    # OpenAI respelled three names ("globe-flower" -> "globe flower", "ball moss" -> "air plant", ...).
    assert sum(ours != theirs for ours, theirs in flowers) == 3
    sun = [n[3:].replace("_", " ").replace("/", " ") for n in tfds_names("sun397/tfds")]
    assert datasets.get("sun397").class_names() == sun
    pets = [n.replace("_", " ").lower() for n in tfds_names("oxford_iiit_pet")]
    assert [n.lower() for n in datasets.get("pets").class_names()] == pets
    caltech = datasets.get("caltech101").class_names()
    assert caltech.index("accordion") == tfds_names("caltech101").index("accordion")
    eurosat = datasets.get("eurosat").class_names()
    assert eurosat[tfds_names("eurosat/rgb").index("SeaLake")] == "lake or sea"


def test_templates_are_openai_templates_with_case_and_punctuation_kept():
    imagenet = datasets.get("imagenet1k").templates
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for e in datasets.REGISTRY.values() if not e.name.startswith("shapes_world") for t in e.templates)
    assert datasets.get("cifar10").templates[0] == "a photo of a {}."
    assert datasets.get("ucf101").templates[:2] == ["a photo of a person {}.", "a video of a person {}."]
    assert datasets.get("cars").class_names()[0] == "AM General Hummer SUV 2000"
    assert datasets.get("fgvc_aircraft").class_names()[-1] == "Yak-42"


def test_prompts_fill_every_template_with_every_class_name():
    prompts = datasets.get("dtd").prompts()
    assert len(prompts) == 47 and len(prompts[0]) == 8
    assert prompts[0][0] == "a photo of a banded texture."


def test_json_file_carries_attribution():
    path = os.path.join(os.path.dirname(datasets.__file__), "zero_shot_classes.json")
    with open(path) as f:
        about = json.load(f)["about"]
    assert "MIT License" in about and "OpenAI" in about and "clip_benchmark" in about


def test_stanford_dogs_names_map_wordnet_ids_to_openai_imagenet_names(monkeypatch):
    entry = datasets.get("stanford_dogs")
    monkeypatch.setattr(datasets.DatasetEntry, "_builder_label_names",
                        lambda self, data_dir: ["n02085620-chihuahua", "n02116738-african_hunting_dog"])
    assert entry.class_names() == ["Chihuahua", "African wild dog"]


def test_cub_names_come_from_classes_txt(tmp_path):
    entry = datasets.get("cub200")
    with pytest.raises(ValueError, match="classes.txt"):
        entry.class_names()
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    assert entry.class_names(classes_file=str(tmp_path / "classes.txt")) == ["Black footed Albatross",
                                                                             "Laysan Albatross"]
    assert entry.prompts(classes_file=str(tmp_path / "classes.txt"))[1] == ["a photo of a Laysan Albatross, a type of bird."]


def test_datasets_without_tfds_builder_read_local_image_folders(tmp_path):
    entry = datasets.get("fgvc_aircraft")
    with pytest.raises(ValueError, match="local_path"):
        entry.source("test")
    for class_dir in ("000_707-320", "001_727-200"):
        os.makedirs(tmp_path / class_dir)
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
        (tmp_path / class_dir / "a.png").write_bytes(buffer.getvalue())
    source = entry.source("test", local_path=str(tmp_path))
    assert [source[i]["label"] for i in range(len(source))] == [0, 1]


def test_registry_source_reads_a_mock_tfds_builder():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        source = datasets.get("cars").source("test")
        example = source[0]
    assert len(source) == 5 and example["image"].dtype == np.uint8 and 0 <= example["label"] < 196


def test_shapes_world_classification_split_runs_through_the_pipeline(tmp_path):
    entry = dataclasses.replace(datasets.get("shapes_world"), tfds_name="shapes_world/test")
    source = entry.source(entry.test_split, data_dir=str(tmp_path))
    names = entry.class_names()
    assert len(names) == 256 and all(t.count("{}") == 1 for t in entry.templates)
    decoder = pipeline.ExampleDecoder(spec=PreprocessSpec(image_size=32), label_key="label", id_key=None)
    batch = next(iter(pipeline.eval_dataset(source, decoder, global_batch_size=8, process_index=0, process_count=1)))
    assert batch["image"].shape == (8, 32, 32, 3) and not any(batch["bad_input"].values())
    assert ((0 <= batch["label"]) & (batch["label"] < 256)).all()
