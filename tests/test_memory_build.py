"""Memory builder: embeddings equal the model's, resume after SIGKILL, multi-process union, metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import ml_collections
import ml_dtypes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from vlm_jax.data import pipeline
from vlm_jax.data import shapes_world
from vlm_jax.data.preprocess import PreprocessSpec, preprocess_image
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.evaluate import stored
from vlm_jax.memory import build, store
from vlm_jax.models import CLIP, tiny
from vlm_jax.weights import load_pretrained, save_pretrained

SHARD_SIZE = 48  # 256 memory rows -> 6 shards, the last one of 16 rows
BATCH_SIZE = 32  # shards end in a partial batch, padded by the encoder
ROW_FIELDS = ("image_embeddings", "text_embeddings", "ids", "indices", "labels", "texts")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Shapes World `test` data, and one tiny random CLIP saved as a pretrained directory and loaded back."""
    root = tmp_path_factory.mktemp("memory_build")
    data_dir, model_dir = root / "data", root / "model"
    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(data_dir, "test"))
    config = tiny(text=dataclasses.replace(tiny().text, vocab_size=tokenizer.vocab_size,
                                           context_length=tokenizer.context_length,
                                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                           bos_token_id=tokenizer.bos_id))
    save_pretrained(CLIP(config, rngs=nnx.Rngs(0)), model_dir, tokenizer=tokenizer,
                    preprocess=PreprocessSpec.clip(image_size=32))
    pretrained = load_pretrained(model_dir)
    return {"root": root, "data_dir": data_dir, "model_dir": model_dir, "pretrained": pretrained}


def memory_config(world, **overrides):
    config = build.memory_config()
    config.data.update(tfds_name="shapes_world/test", split="memory", data_dir=str(world["data_dir"]),
                       text_keys=("name_caption",), label_key="label", read_threads=1)
    config.update({"shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE, "keep_texts": True, "progress": False,
                   **overrides})
    return config


def run_build(world, out_dir, **kwargs):
    pretrained = world["pretrained"]
    config = kwargs.pop("config", None) or memory_config(world)
    return build.build_memory(config, pretrained.model, pretrained.preprocess, pretrained.tokenizer, out_dir,
                              **{"process_index": 0, "process_count": 1, **kwargs})


@pytest.fixture(scope="session")
def reference(world):
    """An uninterrupted single-process build of the Shapes World memory split."""
    return run_build(world, world["root"] / "reference")


def memory_source(world):
    return tfds.data_source("shapes_world/test", split="memory", data_dir=str(world["data_dir"]))


def assert_same_memory(memory, expected):
    assert memory.fields == expected.fields
    for field in ROW_FIELDS:
        np.testing.assert_array_equal(getattr(memory, field), getattr(expected, field), err_msg=field)
        assert getattr(memory, field).dtype == getattr(expected, field).dtype, field


def shard_file_stats(directory, shards):
    return {name: (os.stat(directory / name).st_ino, os.stat(directory / name).st_mtime_ns)
            for name in sorted(os.listdir(directory)) if any(name.startswith(store.shard_name(s)) for s in shards)}


def test_embeddings_equal_the_models_normalized_encoders_on_the_preprocessed_rows(world, reference):
    model, tokenizer, spec = (world["pretrained"].model, world["pretrained"].tokenizer,
                              world["pretrained"].preprocess)
    source = memory_source(world)
    records = [source[i] for i in range(len(source))]
    pixels = np.stack([preprocess_image(pipeline.decode_image(r["image"]), spec) for r in records])
    captions = [r["name_caption"].decode() for r in records]
    image = np.asarray(model.encode_image(pixels))
    text = np.asarray(model.encode_text(tokenizer(captions)))

    assert reference.image_embeddings.shape == (256, 32) and reference.image_embeddings.dtype == np.float32
    np.testing.assert_allclose(reference.image_embeddings, image / np.linalg.norm(image, axis=-1, keepdims=True),
                               atol=1e-5)
    np.testing.assert_allclose(reference.text_embeddings, text / np.linalg.norm(text, axis=-1, keepdims=True),
                               atol=1e-5)
    np.testing.assert_array_equal(reference.indices, np.arange(256))
    np.testing.assert_array_equal(reference.ids, [str(i) for i in range(256)])
    np.testing.assert_array_equal(reference.labels, [r["label"] for r in records])
    np.testing.assert_array_equal(reference.texts, captions)
    assert isinstance(reference.image_embeddings, np.ndarray)
    assert isinstance(store.load_memory(reference.directory).read("image_embeddings", 0, 48), np.memmap)


def test_resume_after_sigkill_keeps_finished_shards_and_matches_uninterrupted_build(world, reference, tmp_path):
    out_dir = tmp_path / "memory"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(memory_config(world).to_dict()))
    script = textwrap.dedent(f"""
        import json, os, signal
        import ml_collections
        from vlm_jax.data import shapes_world  # registers the builder
        from vlm_jax.memory import build

        def die_after_shard_2(shard):
            if shard == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        with open({str(config_path)!r}) as file:
            config = ml_collections.ConfigDict(json.load(file))
        build.build_memory(config, {str(world["model_dir"])!r}, None, None, {str(out_dir)!r},
                           process_index=0, process_count=1, on_shard_written=die_after_shard_2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert store.finished_shards(str(out_dir), 6) == {0, 1, 2}
    with pytest.raises(store.IncompleteMemoryError, match=r"3 of 6 shards are missing \(3, 4, 5\)"):
        store.load_memory(out_dir)
    # What a kill in the middle of shard 3 would leave: an array without its record, a temporary file.
    np.save(out_dir / "shard_00003.image_embeddings.npy", np.ones((5, 32), np.float32))
    (out_dir / "shard_00003.text_embeddings.npy.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"\x93NUM")
    finished_before = shard_file_stats(out_dir, {0, 1, 2})
    assert len(finished_before) == 3 * (len(ROW_FIELDS) + 1)

    written = []
    memory = run_build(world, out_dir, on_shard_written=written.append)

    assert written == [3, 4, 5]
    assert shard_file_stats(out_dir, {0, 1, 2}) == finished_before
    assert not [name for name in os.listdir(out_dir) if ".tmp-" in name]
    assert_same_memory(memory, reference)


def test_two_processes_build_disjoint_shards_whose_union_equals_the_single_process_build(world, reference, tmp_path):
    out_dir = tmp_path / "memory"
    written = {0: [], 1: []}

    assert run_build(world, out_dir, process_index=0, process_count=2, on_shard_written=written[0].append) is None
    with pytest.raises(store.IncompleteMemoryError, match=r"3 of 6 shards are missing \(1, 3, 5\)"):
        store.load_memory(out_dir)
    with pytest.raises(store.IncompleteMemoryError, match=r"\(1, 3, 5\)"):
        build.finalize(out_dir)
    memory = run_build(world, out_dir, process_index=1, process_count=2, on_shard_written=written[1].append)

    assert written == {0: [0, 2, 4], 1: [1, 3, 5]}
    assert [store.load_json(store.record_path(str(out_dir), s))["process_index"] for s in range(6)] == [0, 1] * 3
    assert_same_memory(memory, reference)
    assert_same_memory(store.load_memory(out_dir, mmap=False), reference)


def test_metadata_round_trips_and_a_finished_memory_is_not_rebuilt(world, reference):
    metadata = store.load_memory(reference.directory).metadata
    config = memory_config(world)

    assert metadata["config"] == json.loads(json.dumps(config.to_dict()))
    assert metadata["model"]["fingerprint"] == build.model_fingerprint(world["pretrained"].model)
    assert metadata["model"]["config"]["embed_dim"] == 32 and metadata["model"]["directory"] is None
    assert {key: metadata[key] for key in ("embed_dim", "dtype", "shard_size", "source_rows", "num_shards")} == {
        "embed_dim": 32, "dtype": "float32", "shard_size": SHARD_SIZE, "source_rows": 256, "num_shards": 6}
    assert metadata["fields"] == list(ROW_FIELDS)
    assert metadata["completion"]["num_rows"] == 256 and not any(metadata["completion"]["bad_input"].values())
    assert len(reference) == 256 and reference.embed_dim == 32

    written = []
    assert_same_memory(run_build(world, reference.directory, on_shard_written=written.append), reference)
    assert written == []
    with pytest.raises(ValueError, match=r"different config\.shard_size"):
        run_build(world, reference.directory, config=memory_config(world, shard_size=64))


def test_row_range_reads_cross_shard_boundaries(reference):
    for start, stop in [(0, 48), (40, 100), (47, 49), (200, 256), (250, 1000)]:
        np.testing.assert_array_equal(reference.read("text_embeddings", start, stop),
                                      reference.text_embeddings[start:stop])
        np.testing.assert_array_equal(reference.read("ids", start, stop), reference.ids[start:stop])


def test_bad_inputs_are_skipped_counted_per_shard_and_recorded(world, reference, tmp_path):
    source = memory_source(world)
    records = [dict(source[i]) for i in range(60)]
    records[5]["image"] = b"not a png"
    records[50]["name_caption"] = b"   "
    config = memory_config(world, shard_size=32)

    memory = run_build(world, tmp_path / "memory", source=records, config=config)

    kept = [i for i in range(60) if i not in (5, 50)]
    np.testing.assert_array_equal(memory.indices, kept)
    np.testing.assert_array_equal(memory.image_embeddings, reference.image_embeddings[kept])
    records_on_disk = [store.load_json(store.record_path(memory.directory, s)) for s in range(2)]
    assert [r["bad_input"]["corrupt_image"] for r in records_on_disk] == [1, 0]
    assert [r["bad_input"]["empty_text"] for r in records_on_disk] == [0, 1]
    assert [r["rows"] for r in records_on_disk] == [31, 27]
    assert memory.metadata["completion"]["bad_input"] == {
        "corrupt_image": 1, "empty_text": 1, "missing_field": 0, "unreadable_record": 0, "undecodable_text": 0}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_holds_the_rounded_float32_embeddings(world, reference, tmp_path, dtype):
    source = memory_source(world)
    records = [source[i] for i in range(40)]

    memory = run_build(world, tmp_path / dtype, source=records, config=memory_config(world, dtype=dtype))

    expected = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    assert memory.image_embeddings.dtype == expected and memory.text_embeddings.dtype == expected
    np.testing.assert_array_equal(memory.text_embeddings, reference.text_embeddings[:40].astype(expected))


def _nine_records_with_four_bad(world):
    """9 records: corrupt images at 2 and 8 (8 alone in the last shard of 4), an empty caption at 5 and a
    caption that is not UTF-8 at 7 (the last row of its shard)."""
    source = memory_source(world)
    records = [dict(source[i]) for i in range(9)]
    records[2]["image"] = records[8]["image"] = b"not a png"
    records[5]["name_caption"] = b"   "
    records[7]["name_caption"] = b"caf\xe9"
    return records


def test_complete_json_accounts_for_every_record_read_with_bad_records_at_shard_ends(world, tmp_path):
    out_dir = tmp_path / "memory"

    memory = run_build(world, out_dir, source=_nine_records_with_four_bad(world),
                       config=memory_config(world, shard_size=4))

    np.testing.assert_array_equal(memory.indices, [0, 1, 3, 4, 6])
    completion = store.load_json(str(out_dir / store.COMPLETE_FILE))
    assert completion["num_rows"] == 5 and completion["skipped"] == 4 and completion["source_rows"] == 9
    assert completion["num_rows"] + sum(completion["bad_input"].values()) == 9
    assert {kind: count for kind, count in completion["bad_input"].items() if count} == {
        "corrupt_image": 2, "empty_text": 1, "undecodable_text": 1}
    records = [store.load_json(store.record_path(str(out_dir), shard)) for shard in range(3)]
    assert [r["rows"] + sum(r["bad_input"].values()) for r in records] == [4, 4, 1]
    # A stored eval set hands its skip counts to the evaluator with its first batch.
    batches = list(stored.stored_batches(out_dir, ml_collections.ConfigDict({"batch_size": 4, "type": "zero_shot"}))())
    assert batches[0]["bad_input"] == completion["bad_input"] and "bad_input" not in batches[1]


@pytest.mark.parametrize("failing_file", ["shard_00001.labels.npy", store.COMPLETE_FILE])
def test_a_build_interrupted_by_a_failing_write_leaves_no_complete_memory_and_a_rerun_completes(
        world, tmp_path, monkeypatch, failing_file):
    out_dir = tmp_path / "memory"
    records = _nine_records_with_four_bad(world)
    config = memory_config(world, shard_size=4)
    write_atomic = store.write_atomic

    def fail_midway(path, write, **kwargs):
        if os.path.basename(path) == failing_file:
            def partial_write(file):
                file.write(b"\x93NUMPY" if kwargs.get("binary", True) else "{")
                raise OSError("No space left on device")
            write = partial_write
        write_atomic(path, write, **kwargs)

    monkeypatch.setattr(store, "write_atomic", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        run_build(world, out_dir, source=records, config=config)
    assert not (out_dir / store.COMPLETE_FILE).exists()
    assert not [name for name in os.listdir(out_dir) if ".tmp-" in name]
    with pytest.raises(store.IncompleteMemoryError):
        store.load_memory(out_dir)

    monkeypatch.setattr(store, "write_atomic", write_atomic)
    written = []
    memory = run_build(world, out_dir, source=records, config=config, on_shard_written=written.append)
    assert written == ([1, 2] if failing_file != store.COMPLETE_FILE else [])
    np.testing.assert_array_equal(memory.indices, [0, 1, 3, 4, 6])
    assert memory.completion["num_rows"] + memory.completion["skipped"] == memory.completion["source_rows"] == 9
    assert_same_memory(memory, run_build(world, tmp_path / "uninterrupted", source=records, config=config))
