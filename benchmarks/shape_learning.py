"""How fast a small convolutional image tower can learn Shapes World's shapes when told them directly.

The supervised upper bound for a base CLIP's shape probe (`attribute_probe.py`): a 4-layer CNN
(3x3 stride-2 convolutions 3-32-64-128-128, ReLU, global pooling, a linear 8-way head) trained with
softmax cross entropy on the shape of the one object of the single-object `pretrain` images (Adam,
batch 128), scored every `--eval_every` steps on the `eval_classification` images (one object each,
balanced over entities; chance 0.125). Two design choices are compared side by side in one run:

  --norm ln|none   LayerNorm over the channels of every pixel after each convolution (what
                   `vlm_jax.models.clip.ConvStage`, the conv stem, does) or none
  --pool max|mean  global max or mean pooling of the last feature map

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/shape_learning.py --variant none,max --variant ln,max \\
        --variant none,mean --steps 200

Images contrastive training sees are multi-object with weak captions; this is the easier task, so a
tower that is slow here is slower there.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import bench_common


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=None, help="norm,pool; repeat (default: all four)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--tfds_name", default="shapes_world/default")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args()


def single_object_shapes(source) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] images and int [N] shape ids of the records of `source` with one object."""
    from vlm_jax.data.shapes_world import decode_png

    images, shapes = [], []
    for index in range(len(source)):
        record = source[index]
        regions = record["regions"]
        if len(np.asarray(regions["shape"])) == 1:
            images.append(decode_png(record["image"]))
            shapes.append(int(np.asarray(regions["shape"])[0]))
    return np.stack(images), np.asarray(shapes)


def train_and_score(train, evaluation, *, norm: str, pool: str, steps: int, eval_every: int, batch_size: int,
                    learning_rate: float) -> list[dict]:
    """Trains one CNN variant; -> [{"step", "train_accuracy", "eval_accuracy", "seconds"}] per eval."""
    import jax
    import optax
    from flax import nnx

    channels = (32, 64, 128, 128)

    class CNN(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.convs = nnx.List([nnx.Conv(c_in, c_out, (3, 3), strides=2, rngs=rngs)
                                   for c_in, c_out in zip((3, *channels[:-1]), channels)])
            self.norms = nnx.List([nnx.LayerNorm(c, rngs=rngs) for c in channels]) if norm == "ln" else None
            self.head = nnx.Linear(channels[-1], 8, rngs=rngs)

        def __call__(self, pixels):
            features = pixels
            for index, conv in enumerate(self.convs):
                features = conv(features)
                features = jax.nn.relu(self.norms[index](features) if self.norms is not None else features)
            return self.head(features.max((1, 2)) if pool == "max" else features.mean((1, 2)))

    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, pixels, labels):
        def loss_fn(model):
            logits = model(pixels)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return (logits.argmax(-1) == labels).mean()

    predict = nnx.jit(lambda model, pixels: model(pixels).argmax(-1))

    def prepare(images):
        return (images.astype(np.float32) - 128.0) / 64.0

    (train_images, train_shapes), (eval_images, eval_shapes) = train, evaluation
    rng = np.random.default_rng(0)
    rows, accuracies, started = [], [], time.perf_counter()
    for index in range(steps):
        batch = rng.integers(len(train_images), size=batch_size)
        accuracies.append(float(step(model, optimizer, prepare(train_images[batch]), train_shapes[batch])))
        if (index + 1) % eval_every == 0 or index + 1 == steps:
            predicted = np.concatenate([np.asarray(predict(model, prepare(eval_images[i : i + 512])))
                                        for i in range(0, len(eval_images), 512)])
            rows.append({"step": index + 1, "train_accuracy": float(np.mean(accuracies[-eval_every:])),
                         "eval_accuracy": float((predicted == eval_shapes).mean()),
                         "seconds": time.perf_counter() - started})
    return rows


def main() -> None:
    args = _parse_args()
    import tensorflow_datasets as tfds

    from vlm_jax.data import shapes_world

    shapes_world.prepare(args.data_dir, args.tfds_name.split("/")[-1])
    train = single_object_shapes(tfds.data_source(args.tfds_name, split="pretrain", data_dir=args.data_dir))
    evaluation = single_object_shapes(
        tfds.data_source(args.tfds_name, split="eval_classification", data_dir=args.data_dir))
    variants = args.variant or ["none,max", "ln,max", "none,mean", "ln,mean"]
    print(f"machine: {bench_common.machine()}")
    print(f"{len(train[0])} single-object pretrain images, {len(evaluation[0])} eval images; "
          f"batch {args.batch_size}, Adam {args.learning_rate}")
    print(f"{'norm':>5} {'pool':>5} {'step':>5} {'train acc':>9} {'eval acc':>8} {'s':>6}")
    results = {"machine": bench_common.machine(), "variants": {}}
    for variant in variants:
        norm, pool = variant.split(",")
        rows = train_and_score(train, evaluation, norm=norm, pool=pool, steps=args.steps,
                               eval_every=args.eval_every, batch_size=args.batch_size,
                               learning_rate=args.learning_rate)
        results["variants"][variant] = rows
        for row in rows:
            print(f"{norm:>5} {pool:>5} {row['step']:>5} {row['train_accuracy']:>9.3f} "
                  f"{row['eval_accuracy']:>8.3f} {row['seconds']:>6.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
