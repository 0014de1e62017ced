"""Input-pipeline throughput: images/s for 0, 1 and 2 grain worker processes.

Corpora:
  shapes_world_64: the Shapes World `default` config (64 px PNGs; built once, ~75 s on 2 cores)
    read through `tfds.data_source`, weak/dense caption drawn per example, its own tokenizer.
  jpeg_224: a WebDataset-style corpus of 256x320 JPEGs converted to ArrayRecord, model size 224,
    random resized crop, captions tokenized (a small WordLevel tokenizer).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/input_pipeline.py [--batches 30]

Prints one line per (corpus, workers) with images/s and images/s per worker process (0 workers:
the reading process itself counts as one), and the 1-minute load average at the start.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers

from vlm_jax.data import corpora, pipeline
from vlm_jax.data.preprocess import PreprocessSpec
from vlm_jax.data.tokenizer import Tokenizer


def word_tokenizer() -> Tokenizer:
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "number"] + [str(i) for i in range(1000)]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer.from_tokenizers(backend, context_length=32, pad_token="<pad>", bos_token=None,
                                     eos_token="</s>", unk_token="<unk>")


def jpeg_corpus(directory: str, count: int) -> corpora.ArrayRecordCorpusSource:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        # Smooth content compresses like a photo; pure noise would make JPEG decode unrealistically slow.
        base = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(base).resize((320, 256), PIL.Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        examples.append({"id": f"{i:06d}", "image": buffer.getvalue(), "caption": f"a photo of number {i % 1000}"})
    paths = corpora.convert_to_array_record(examples, directory, num_shards=2)
    return corpora.ArrayRecordCorpusSource(paths)


def shapes_world_source(data_dir: str):
    from vlm_jax.data import shapes_world

    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(data_dir, config="default"))
    return tfds.data_source("shapes_world/default", split="pretrain", data_dir=data_dir), tokenizer


def measure(source, decoder, batch_size, workers, batches):
    ds = pipeline.train_dataset(source, decoder, global_batch_size=batch_size, seed=0, process_index=0,
                                process_count=1, worker_count=workers, read_threads=1)
    iterator = iter(ds)
    for _ in range(3):  # worker start-up and first-batch latency are not throughput
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return batches * batch_size / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as workdir:
        corpora_to_run = []
        sw_source, sw_tokenizer = shapes_world_source(os.path.join(workdir, "tfds"))
        corpora_to_run.append(("shapes_world_64", sw_source, pipeline.ExampleDecoder(
            spec=PreprocessSpec(image_size=64, resize="squash", crop=False, mean=(0.5,) * 3, std=(0.5,) * 3),
            tokenizer=sw_tokenizer, text_keys=("weak_caption", "dense_caption"), id_key=None)))
        corpora_to_run.append(("jpeg_224", jpeg_corpus(os.path.join(workdir, "jpeg"), 512), pipeline.ExampleDecoder(
            spec=PreprocessSpec.clip(224), tokenizer=word_tokenizer(), text_keys=("caption",),
            augment="random_resized_crop")))
        for name, source, decoder in corpora_to_run:
            for workers in (0, 1, 2):
                rate = measure(source, decoder, args.batch_size, workers, args.batches)
                print(f"{name:16s} workers={workers}  {rate:8.1f} images/s  "
                      f"{rate / max(workers, 1):8.1f} images/s per worker process")


if __name__ == "__main__":
    main()
