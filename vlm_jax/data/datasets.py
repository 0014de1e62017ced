"""Registry of classification datasets: TFDS builder, splits, keys, class names, prompt templates.

Class names and templates are OpenAI CLIP's zero-shot ones as published (OpenAI CLIP's
data/prompts.md and ImageNet notebook, and clip_benchmark's JSON files; MIT licensed), stored in
`zero_shot_classes.json` next to this file with their provenance, in each TFDS builder's label
order. Templates keep their published case and punctuation, with "{}" marking the class name.

Datasets TFDS does not build (FGVC Aircraft; UCF101 frames, since TFDS `ucf101` holds videos
only) read a local class-per-subfolder image folder or a manifest (CSV/JSONL/parquet with
image path and label columns) through `DatasetEntry.source(split, local_path=...)`.

    entry = datasets.get("cars")
    source = entry.source("test", data_dir=...)        # random access: source[i] -> dict
    texts = entry.prompts()                            # [num_classes][num_templates] str
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
from typing import Any

_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "zero_shot_classes.json")


@functools.cache
def _zero_shot_data() -> dict[str, Any]:
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        return json.load(f)["datasets"]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One classification dataset.

    Attributes:
      name: registry name.
      tfds_name: TFDS builder with version ("cars196:2.1.0"), or None when TFDS has no builder.
      train_split, test_split: TFDS split names (also the local-source split names).
      image_key, label_key: example fields.
      classes_key: entry of zero_shot_classes.json.
      class_names_from: how names are found when the JSON has none: "wnid" maps TFDS label names
        "nXXXXXXXX-..." to OpenAI's ImageNet names; "classes_txt" reads a CUB-style classes.txt;
        "builder" asks `builder_module` (its `class_names()` and `prompt_templates()`);
        "builder_descriptions" names each class by its visual description instead
        (`builder_module.attribute_phrases()`, with the same templates): zero-shot by description.
      builder_module: module to import so TFDS knows the builder (the embedded shapes_world).
      note: what a user must know (no TFDS builder, local layout, ...).
    """

    name: str
    tfds_name: str | None
    train_split: str | None
    test_split: str
    classes_key: str
    image_key: str = "image"
    label_key: str = "label"
    class_names_from: str | None = None
    builder_module: str | None = None
    note: str = ""

    @property
    def templates(self) -> list[str]:
        if self.class_names_from in ("builder", "builder_descriptions"):
            return list(importlib.import_module(self.builder_module).prompt_templates())
        return list(_zero_shot_data()[self.classes_key]["templates"])

    def class_names(self, *, data_dir: str | None = None, classes_file: str | None = None) -> list[str]:
        """Class names in label order.

        `data_dir` locates a prepared TFDS dataset for names resolved from the builder
        (Stanford Dogs, Shapes World); `classes_file` is CUB's `classes.txt`.
        """
        names = _zero_shot_data()[self.classes_key]["classnames"] if self.classes_key in _zero_shot_data() else None
        if names is not None:
            return list(names)
        if self.class_names_from == "classes_txt":
            if classes_file is None:
                raise ValueError(
                    f"{self.name} class names come from the dataset's classes.txt (CUB_200_2011/classes.txt); "
                    "pass classes_file=<path>."
                )
            return read_classes_txt(classes_file)
        if self.class_names_from == "builder":
            return list(importlib.import_module(self.builder_module).class_names())
        if self.class_names_from == "builder_descriptions":
            return list(importlib.import_module(self.builder_module).attribute_phrases())
        label_names = self._builder_label_names(data_dir)
        if self.class_names_from == "wnid":
            imagenet = _zero_shot_data()["imagenet1k"]
            by_wnid = dict(zip(imagenet["wnids"], imagenet["classnames"]))
            return [by_wnid[label.split("-", 1)[0]] for label in label_names]
        return [label.replace("_", " ") for label in label_names]

    def _builder_label_names(self, data_dir: str | None) -> list[str]:
        import tensorflow_datasets as tfds  # noqa: PLC0415

        builder = tfds.builder(self.tfds_name, data_dir=data_dir)
        names = list(builder.info.features[self.label_key].names)
        if self.class_names_from == "wnid" and not all(re.match(r"n\d{8}", n) for n in names):
            raise ValueError(
                f"{self.tfds_name} label names are not WordNet ids ({names[:3]}...); prepare the dataset "
                "(tfds build) so its label names are recorded, then pass its data_dir."
            )
        return names

    def prompts(self, **class_name_kwargs) -> list[list[str]]:
        """Every template filled with every class name: [num_classes][num_templates] str."""
        templates = self.templates
        return [[t.format(name) for t in templates] for name in self.class_names(**class_name_kwargs)]

    def source(
        self,
        split: str,
        *,
        data_dir: str | None = None,
        local_path: str | None = None,
        download: bool = False,
    ) -> Any:
        """A random-access source of `split`.

        With `local_path`, reads a local copy instead of TFDS: a folder is read as
        class-per-subfolder images (subfolders in label order: sorted, or the order of the class
        list), a .csv/.jsonl/.parquet file as a manifest with columns image_path and label.
        """
        from vlm_jax.data import corpora  # noqa: PLC0415

        if local_path is not None:
            if os.path.isdir(local_path):
                return corpora.ImageFolderSource(local_path)
            return corpora.ManifestSource(local_path, image_path_key="image_path")
        if self.tfds_name is None:
            raise ValueError(f"{self.name}: {self.note} Pass local_path=<image folder or manifest>.")
        import tensorflow_datasets as tfds  # noqa: PLC0415

        if self.builder_module:
            importlib.import_module(self.builder_module)
        return tfds.data_source(self.tfds_name, split=split, data_dir=data_dir,
                                download=download or self.builder_module is not None)


def read_classes_txt(path: str) -> list[str]:
    """Parses CUB's classes.txt ("1 001.Black_footed_Albatross") into ["Black footed Albatross", ...]."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                folder = line.split()[-1]
                names.append(folder.split(".", 1)[-1].replace("_", " "))
    return names


_NO_TFDS = "TFDS has no builder for it: use a local class-per-subfolder image folder or a manifest."

_ENTRIES = [
    DatasetEntry("imagenet1k", "imagenet2012:5.1.0", "train", "validation", "imagenet1k",
                 note="TFDS needs the ILSVRC2012 archives placed in its manual_dir."),
    DatasetEntry("caltech101", "caltech101:3.0.2", "train", "test", "caltech101"),
    DatasetEntry("pets", "oxford_iiit_pet:4.0.0", "train", "test", "pets"),
    DatasetEntry("cars", "cars196:2.1.0", "train", "test", "cars"),
    DatasetEntry("flowers", "oxford_flowers102:2.1.1", "train", "test", "flowers"),
    DatasetEntry("food101", "food101:2.0.0", "train", "validation", "food101"),
    DatasetEntry("fgvc_aircraft", None, "trainval", "test", "fgvc_aircraft",
                 note=_NO_TFDS + " Folders/labels follow variants.txt order (variant level, 100 classes)."),
    DatasetEntry("sun397", "sun397/tfds:4.0.0", "train", "test", "sun397",
                 note="The sun397/tfds config holds the standard TFDS train/validation/test partition."),
    DatasetEntry("dtd", "dtd:3.0.1", "train", "test", "dtd"),
    DatasetEntry("eurosat", "eurosat/rgb:2.0.0", "train", "train", "eurosat",
                 note="TFDS has only a train split; hold out a slice (e.g. 'train[80%:]') for evaluation."),
    DatasetEntry("ucf101", None, "train", "test", "ucf101",
                 note="TFDS ucf101 holds videos only, not the middle frames CLIP evaluates on; "
                      + _NO_TFDS.split(": ", 1)[1] + " Extract one frame per clip, folders in class-index order."),
    DatasetEntry("cub200", "caltech_birds2011:0.2.0", "train", "test", "cub200", class_names_from="classes_txt",
                 note="TFDS caltech_birds2011 records no label names; pass CUB_200_2011/classes.txt."),
    DatasetEntry("stanford_dogs", "stanford_dogs:0.2.0", "train", "test", "stanford_dogs",
                 class_names_from="wnid",
                 note="Names come from the prepared builder's WordNet-id labels mapped to OpenAI's ImageNet names."),
    DatasetEntry("places365", "places365_small:2.1.0", "train", "validation", "places365"),
    DatasetEntry("cifar10", "cifar10:3.0.2", "train", "test", "cifar10"),
    DatasetEntry("cifar100", "cifar100:3.0.2", "train", "test", "cifar100"),
    DatasetEntry("shapes_world", "shapes_world/default", "pretrain", "eval_classification", "shapes_world",
                 class_names_from="builder", builder_module="vlm_jax.data.shapes_world",
                 note="The embedded procedural dataset; generated on first use."),
    DatasetEntry("shapes_world_descriptions", "shapes_world/default", "pretrain", "eval_classification",
                 "shapes_world_descriptions", class_names_from="builder_descriptions",
                 builder_module="vlm_jax.data.shapes_world",
                 note="Shapes World entities described by their attributes ('a photo of a striped red star.'), "
                      "never named: zero-shot by description, the only way to classify novel entities."),
]

REGISTRY: dict[str, DatasetEntry] = {entry.name: entry for entry in _ENTRIES}


def get(name: str) -> DatasetEntry:
    """The registry entry called `name`."""
    if name not in REGISTRY:
        raise KeyError(f"Unknown dataset {name!r}; registered: {sorted(REGISTRY)}.")
    return REGISTRY[name]
