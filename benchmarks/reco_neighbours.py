"""What RECO's memory search finds on Shapes World, and what the frozen CLIP's image embedding knows.

RECO can only pass on what its search retrieves. This reads a finished `reco` workdir (the memory
and the stored eval embeddings of `python -m vlm_jax.main --config=experiments/reco.py`) and reports,
for the `eval_classification` images (one main object, label = entity):

- neighbour agreement: the fraction of each image's top-k memory rows (by image embedding, the
  uni-modal search; and by text embedding, the cross-modal ablation) whose entity, shape, colour
  or pattern equals the query's (k = 1 and k = `--k`);
- a linear probe: softmax regression on the frozen image embeddings (half the images to fit, half
  to test) for shape, colour and pattern, i.e. whether the attribute is in the embedding at all.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/reco_neighbours.py --workdir workdirs/reco

Chance: entity 1/256, shape 1/8, colour 1/8, pattern 1/4 (the memory and eval splits are balanced
over entities).
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib

import numpy as np

import bench_common


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/reco", help="a finished Shapes World reco workdir")
    parser.add_argument("--k", type=int, default=16, help="neighbours (the shapes preset's reco.k)")
    parser.add_argument("--probe_steps", type=int, default=500)
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


def _load(directory: pathlib.Path, key: str) -> np.ndarray:
    files = sorted(glob.glob(str(directory / f"shard_*.{key}.npy")))
    if not files:
        raise SystemExit(f"no shard_*.{key}.npy under {directory}; run the reco experiment into --workdir first.")
    return np.concatenate([np.load(f) for f in files])


def _memory_labels(workdir: pathlib.Path, indices: np.ndarray) -> np.ndarray:
    import tensorflow_datasets as tfds

    config = json.loads((workdir / "config.json").read_text())
    data = config["memory"]["data"]
    source = tfds.data_source(data["tfds_name"], split=data["split"], data_dir=data.get("data_dir"))
    return np.array([int(source[int(i)]["label"]) for i in indices])


def neighbour_agreement(queries, labels, keys, key_labels, k, entities) -> dict[str, float]:
    top = np.argsort(-(queries @ keys.T), axis=1)[:, :k]
    found = key_labels[top]
    out = {"entity@1": float(np.mean(found[:, 0] == labels)), f"entity@{k}": float(np.mean(found == labels[:, None]))}
    for attribute in ("shape", "colour", "pattern"):
        value = np.array([getattr(e, attribute) for e in entities])
        out[f"{attribute}@1"] = float(np.mean(value[found[:, 0]] == value[labels]))
        out[f"{attribute}@{k}"] = float(np.mean(value[found] == value[labels][:, None]))
    return out


def main() -> None:
    args = _parse_args()
    from vlm_jax.data import shapes_world

    workdir = pathlib.Path(args.workdir)
    entities = shapes_world.entities()
    memory_images = _load(workdir / "memory", "image_embeddings")
    memory_texts = _load(workdir / "memory", "text_embeddings")
    memory_labels = _memory_labels(workdir, _load(workdir / "memory", "indices"))
    eval_dir = workdir / "eval_embeddings" / "shapes"
    images, labels = _load(eval_dir, "image_embeddings"), _load(eval_dir, "labels")
    results = {"memory_rows": len(memory_labels), "queries": len(labels)}
    print(f"{len(labels)} eval images, {len(memory_labels)} memory pairs, k = {args.k}")
    for name, keys in (("image->memory images (uni-modal)", memory_images), ("image->memory texts (cross-modal)", memory_texts)):
        agreement = neighbour_agreement(images, labels, keys, memory_labels, args.k, entities)
        results[name] = agreement
        print(f"{name:<36} " + "  ".join(f"{key} {value:.3f}" for key, value in agreement.items()))
    probe = {}
    for attribute in ("shape", "colour", "pattern"):
        values = sorted({getattr(e, attribute) for e in entities})
        targets = np.array([values.index(getattr(entities[label], attribute)) for label in labels])
        probe[attribute] = bench_common.linear_probe(images, targets, len(values), args.probe_steps)
    results["linear_probe"] = probe
    print("linear probe on the frozen image embeddings (held-out accuracy): "
          + "  ".join(f"{key} {value:.3f}" for key, value in probe.items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
