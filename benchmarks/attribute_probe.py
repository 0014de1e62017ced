"""Which attributes a CLIP's frozen image embedding encodes: linear probes on Shapes World.

For each CLIP directory (a `save_pretrained` export, e.g. `<workdir>/export` of
`python -m vlm_jax.main --config=experiments/clip.py`), the `eval_classification` images (one object
per image, balanced over the 256 entities) are embedded with the model's own preprocessing, and a
softmax regression (`bench_common.linear_probe`: half the images fit, half are scored) predicts each
attribute of the object from the unnormalized image embedding:

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/attribute_probe.py \\
        --model_dir old=/work/runs/reco_before/clip/export --model_dir new=workdirs/clip/export

Chance: shape 1/8, colour 1/8, pattern 1/4, size 1/2, quadrant 1/4. An entity is (shape, colour,
pattern), so a model whose shape probe sits near chance cannot tell apart the 8 entities sharing colour
and pattern. "quadrant" is where the object's box centre lies (top-left, top-right, bottom-left,
bottom-right): a model that does not encode it cannot ground a spatial relation ("left of", "above").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import bench_common

ATTRIBUTES = ("shape", "colour", "pattern", "size", "quadrant")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", action="append", required=True,
                        help="[name=]CLIP directory; repeat to compare models in one table")
    parser.add_argument("--tfds_name", default="shapes_world/default")
    parser.add_argument("--split", default="eval_classification")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--max_examples", type=int, default=0, help="the first N images only (0: all)")
    parser.add_argument("--probe_steps", type=int, default=500)
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


def attribute_targets(source, max_examples: int = 0) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """PNG bytes and {attribute: int [N] value ids} of the main object of each Shapes World record
    (its quadrant from its box centre)."""
    count = len(source) if not max_examples else min(max_examples, len(source))
    images, targets = [], {name: [] for name in ATTRIBUTES}
    for index in range(count):
        record = source[index]
        regions = record["regions"]
        main = int(np.argmax(np.asarray(regions["is_main"])))
        images.append(record["image"])
        for name in ATTRIBUTES[:-1]:
            targets[name].append(int(regions[name][main]))
        ymin, xmin, ymax, xmax = np.asarray(regions["bbox"][main], np.float64)  # TFDS boxes, normalized
        targets["quadrant"].append(2 * int((ymin + ymax) / 2 >= 0.5) + int((xmin + xmax) / 2 >= 0.5))
    return images, {name: np.asarray(values) for name, values in targets.items()}


def embed_images(model_dir: str, images: list[bytes], batch_size: int = 256) -> np.ndarray:
    """float32 [N, embed_dim] unnormalized image embeddings of PNG `images` under `model_dir`'s CLIP."""
    import jax
    from flax import nnx

    from vlm_jax.data.preprocess import preprocess_images
    from vlm_jax.data.shapes_world import decode_png
    from vlm_jax.weights import load_pretrained

    pretrained = load_pretrained(model_dir)
    graphdef, state = nnx.split(pretrained.model)
    encode = jax.jit(lambda state, pixels: nnx.merge(graphdef, state).encode_image(pixels))
    embeddings = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images([decode_png(png) for png in images[start : start + batch_size]],
                                   pretrained.preprocess)
        embeddings.append(np.asarray(encode(state, pixels)))
    return np.concatenate(embeddings)


def probe_attributes(embeddings: np.ndarray, targets: dict[str, np.ndarray], steps: int = 500) -> dict[str, float]:
    """{attribute: held-out linear-probe accuracy} of `embeddings` [N, D] for each attribute in `targets`."""
    from vlm_jax.data.shapes_world import world

    values = {"shape": world.SHAPES, "colour": world.COLOURS, "pattern": world.PATTERNS, "size": world.SIZES,
              "quadrant": QUADRANTS}
    return {name: bench_common.linear_probe(embeddings, target, len(values[name]), steps)
            for name, target in targets.items()}


def main() -> None:
    args = _parse_args()
    import tensorflow_datasets as tfds

    from vlm_jax.data import shapes_world

    source = tfds.data_source(args.tfds_name, split=args.split, data_dir=args.data_dir)
    images, targets = attribute_targets(source, args.max_examples)
    print(f"machine: {bench_common.machine()}")
    print(f"{len(images)} {args.tfds_name} {args.split} images; linear probes on the frozen image embeddings, "
          f"held-out accuracy (half fit, half scored, {args.probe_steps} Adam steps)")
    chance = {"shape": 1 / len(shapes_world.world.SHAPES), "colour": 1 / len(shapes_world.world.COLOURS),
              "pattern": 1 / len(shapes_world.world.PATTERNS), "size": 1 / len(shapes_world.world.SIZES),
              "quadrant": 1 / len(QUADRANTS)}
    entries = [(name or pathlib.Path(directory).parent.name, directory)
               for name, _, directory in (entry.rpartition("=") for entry in args.model_dir)]
    width = max(12, *(len(name) for name, _ in entries))
    print(f"{'model':<{width}} " + " ".join(f"{name:>8}" for name in ATTRIBUTES) + "  directory")
    print(f"{'chance':<{width}} " + " ".join(f"{chance[name]:>8.3f}" for name in ATTRIBUTES))
    results = {"machine": bench_common.machine(), "examples": len(images), "models": {}}
    for name, directory in entries:
        started = time.perf_counter()
        probe = probe_attributes(embed_images(directory, images), targets, args.probe_steps)
        results["models"][name] = {"directory": directory, **probe, "seconds": time.perf_counter() - started}
        print(f"{name:<{width}} " + " ".join(f"{probe[a]:>8.3f}" for a in ATTRIBUTES) + f"  {directory}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
