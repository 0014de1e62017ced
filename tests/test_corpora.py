"""Corpus readers (WebDataset, manifests, image folders) and their ArrayRecord conversion."""

import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import PIL.Image
import pytest

from vlm_jax.data import corpora, pipeline
from vlm_jax.data.bad_input import BadRecordError, Fetched
from vlm_jax.data.preprocess import PreprocessSpec, preprocess_image

SPEC = PreprocessSpec(image_size=16)


def encode(pixels, image_format):
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def random_pixels(seed, size=(24, 20)):
    return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def write_tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def make_webdataset(directory, shards=2, per_shard=5, broken=False):
    """img2dataset-style shards; returns {key: (jpeg bytes, caption, recaption, regions)}."""
    expected = {}
    paths = []
    for shard in range(shards):
        members = []
        for row in range(per_shard):
            key = f"{shard:05d}{row:04d}"
            jpeg = encode(random_pixels(shard * 100 + row), "JPEG")
            caption = f"a caption for {key}"
            regions = [{"box": [0.1, 0.2, 0.5, 0.6], "text": f"region of {key}"}]
            metadata = {"key": key, "url": f"http://x/{key}.jpg", "recaption": f"a recaption of {key}",
                        "regions": regions}
            if broken and row == 1:
                jpeg = jpeg[: len(jpeg) // 3]
            if broken and row == 2:
                caption = ""
            members.append((f"{key}.txt", caption.encode()))
            if not (broken and row == 3):
                members.append((f"{key}.jpg", jpeg))
            members.append((f"{key}.json", json.dumps(metadata).encode()))
            expected[key] = (jpeg, caption, metadata["recaption"], regions)
        path = os.path.join(directory, f"{shard:05d}.tar")
        write_tar(path, members)
        paths.append(path)
    return paths, expected


def eval_batches(source, **decoder_kwargs):
    decoder = pipeline.ExampleDecoder(spec=SPEC, text_keys=("caption",), keep_text=True, **decoder_kwargs)
    return list(pipeline.eval_dataset(source, decoder, global_batch_size=4, process_index=0, process_count=1))


def test_webdataset_shards_round_trip_through_array_record_and_the_pipeline(tmp_path):
    paths, expected = make_webdataset(str(tmp_path))
    webdataset = corpora.WebDatasetSource(str(tmp_path / "*.tar"))
    assert len(webdataset) == 10 and webdataset[0]["id"] == "000000000"
    shards = corpora.convert_to_array_record(webdataset, str(tmp_path / "ar"), num_shards=3,
                                             json_fields=("recaption", "regions"))
    converted = corpora.ArrayRecordCorpusSource(str(tmp_path / "ar" / "*.array_record"))
    assert len(shards) == 3 and len(converted) == 10
    record = converted[7]
    key = record["id"]
    assert record["image"] == expected[key][0]
    assert record["recaption"] == expected[key][2]
    assert json.loads(record["regions"]) == expected[key][3]
    assert json.loads(record["json"])["url"] == f"http://x/{key}.jpg"

    batches = eval_batches(converted, passthrough_keys=("recaption",))
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert ids == sorted(expected)
    for batch in batches:
        for row, key in enumerate(batch["id"]):
            jpeg, caption, recaption, _ = expected[key]
            assert batch["text"][row] == caption and batch["recaption"][row] == recaption
            pixels = np.asarray(PIL.Image.open(io.BytesIO(jpeg)))
            np.testing.assert_array_equal(batch["image"][row], preprocess_image(pixels, SPEC))


def test_jsonl_manifest_round_trips_through_array_record_with_identical_pixels(tmp_path):
    rows = []
    originals = {}
    for i in range(6):
        pixels = random_pixels(i, size=(18, 30))
        name = f"img_{i}.png"
        (tmp_path / name).write_bytes(encode(pixels, "PNG"))
        rows.append({"id": f"m{i}", "image_path": name, "caption": f"manifest caption {i}",
                     "recaption": [f"long {i}", f"short {i}"]})
        originals[f"m{i}"] = pixels
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    source = corpora.ManifestSource(str(manifest))
    corpora.convert_to_array_record(source, str(tmp_path / "ar"))
    converted = corpora.ArrayRecordCorpusSource(str(tmp_path / "ar" / "corpus-*.array_record"))
    assert converted[4]["recaption"] == ["long 4", "short 4"]
    batches = eval_batches(converted)
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert ids == [f"m{i}" for i in range(6)]
    for batch in batches:
        for row, key in enumerate(batch["id"]):
            assert batch["text"][row] == f"manifest caption {key[1:]}"
            np.testing.assert_array_equal(batch["image"][row], preprocess_image(originals[key], SPEC))


def test_conversion_output_is_deterministic_across_thread_counts(tmp_path):
    make_webdataset(str(tmp_path))
    source = corpora.WebDatasetSource(str(tmp_path / "*.tar"))
    one = corpora.convert_to_array_record(source, str(tmp_path / "one"), num_shards=2, num_threads=1)
    two = corpora.convert_to_array_record(source, str(tmp_path / "two"), num_shards=2, num_threads=2)
    for a, b in zip(one, two):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_corrupted_members_are_kept_by_conversion_then_skipped_and_counted(tmp_path):
    make_webdataset(str(tmp_path), broken=True)
    source = corpora.WebDatasetSource(str(tmp_path / "*.tar"))
    corpora.convert_to_array_record(source, str(tmp_path / "ar"))
    converted = corpora.ArrayRecordCorpusSource(str(tmp_path / "ar" / "*.array_record"))
    assert len(converted) == 10
    counter = pipeline.BadInputCounter()
    kept = []
    for batch in eval_batches(converted):
        counter.update(batch)
        kept.extend(batch["id"].tolist())
    assert counter.totals == {"unreadable_record": 0, "corrupt_image": 2, "missing_field": 2, "empty_text": 2,
                              "undecodable_text": 0}
    assert len(kept) == 4 and all(key[-1] in "04" for key in kept)


def test_image_folder_and_csv_manifest_give_labelled_examples(tmp_path):
    for label, class_dir in enumerate(["b_class", "a_class"]):
        os.makedirs(tmp_path / "folder" / class_dir)
        for i in range(2):
            (tmp_path / "folder" / class_dir / f"{i}.png").write_bytes(encode(random_pixels(label * 10 + i), "PNG"))
    folder = corpora.ImageFolderSource(str(tmp_path / "folder"))
    assert folder.class_dirs == ["a_class", "b_class"]
    assert [folder[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    ordered = corpora.ImageFolderSource(str(tmp_path / "folder"), class_dirs=["b_class", "a_class"])
    assert ordered[0]["id"] == "b_class/0.png" and ordered[0]["label"] == 0

    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "label"])
        writer.writerows([["folder/a_class/0.png", 3], ["folder/b_class/1.png", 1], ["missing.png", 2]])
    manifest = corpora.ManifestSource(str(tmp_path / "labels.csv"), id_key=None)
    assert manifest[0]["label"] == 3 and manifest[0]["id"] == "folder/a_class/0.png"
    decoder = pipeline.ExampleDecoder(spec=SPEC, label_key="label")
    batch = next(iter(pipeline.eval_dataset(manifest, decoder, global_batch_size=3, process_index=0, process_count=1)))
    assert batch["label"].tolist() == [3, 1] and int(batch["bad_input"]["missing_field"]) == 1


def test_foreign_records_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="convert_to_array_record"):
        corpora.decode_record(b"\x92\x01\x02")
    assert corpora.decode_record(corpora.encode_record({"id": "x", "image": b"\x00"})) == {"id": "x", "image": b"\x00"}


def test_array_record_corpus_trains_through_the_config_driven_pipeline(tmp_path):
    make_webdataset(str(tmp_path), shards=1, per_shard=8)
    corpora.convert_to_array_record(corpora.WebDatasetSource(str(tmp_path / "*.tar")), str(tmp_path / "ar"),
                                    json_fields=("recaption",))
    config = pipeline.default_config()
    config.source = "array_record"
    config.paths = str(tmp_path / "ar" / "*.array_record")
    config.text_keys = ("caption", "recaption")
    config.keep_text = True
    config.augment = "random_resized_crop"
    iterator = pipeline.make_train_iterator(config, SPEC, None, 4, seed=0, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]
    texts = np.concatenate([b["text"] for b in batches])
    assert any(t.startswith("a caption") for t in texts) and any(t.startswith("a recaption") for t in texts)
    assert batches[0]["image"].shape == (4, 16, 16, 3)


def _manifest_with_a_line_that_is_not_utf8(directory, count=5, bad_line=3):
    lines = []
    for i in range(count):
        (directory / f"img_{i}.png").write_bytes(encode(random_pixels(i), "PNG"))
        line = json.dumps({"id": f"m{i}", "image_path": f"img_{i}.png", "caption": f"caption {i}"}).encode()
        if i + 1 == bad_line:
            line = line.replace(b"caption %d" % i, b"caf\xe9 %d" % i)  # Latin-1, not UTF-8
        lines.append(line)
    manifest = directory / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest


def test_jsonl_line_that_is_not_utf8_is_skipped_counted_and_logged_with_file_and_line(tmp_path, caplog):
    manifest = _manifest_with_a_line_that_is_not_utf8(tmp_path)
    with caplog.at_level(logging.WARNING):
        source = corpora.ManifestSource(str(manifest))
        batches = eval_batches(source)
    counter = pipeline.BadInputCounter()
    for batch in batches:
        counter.update(batch)
    assert len(source) == 5
    assert np.concatenate([b["id"] for b in batches]).tolist() == ["m0", "m1", "m3", "m4"]
    assert {k: v for k, v in counter.totals.items() if v} == {"undecodable_text": 1}
    assert f"{manifest}:3: not UTF-8 text (byte 0xe9" in caplog.text
    assert "Skipped bad input (undecodable_text) at source index 2" in caplog.text

    decoder = pipeline.ExampleDecoder(spec=SPEC, text_keys=("caption",), keep_text=True, on_bad_input="raise")
    with pytest.raises(pipeline.BadInputError, match=rf"undecodable_text\) at source index 2: {manifest}:3"):
        list(pipeline.eval_dataset(source, decoder, global_batch_size=4, process_index=0, process_count=1))


def test_csv_row_that_is_not_utf8_is_skipped_and_counted_with_its_line(tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(random_pixels(i), "PNG"))
    (tmp_path / "rows.csv").write_bytes(b"image_path,caption\n0.png,zero\n1.png,caf\xe9\n2.png,two\n")
    with caplog.at_level(logging.WARNING):
        source = corpora.ManifestSource(str(tmp_path / "rows.csv"))
    with pytest.raises(BadRecordError, match=r"rows\.csv:3: not UTF-8"):
        source[1]
    assert source[2]["caption"] == "two" and "rows.csv:3" in caplog.text


def test_webdataset_text_member_that_is_not_utf8_is_skipped_counted_and_logged_with_the_member(tmp_path, caplog):
    members = []
    for row in range(4):
        key = f"{row:05d}"
        caption = b"caf\xe9" if row == 2 else f"caption {row}".encode()
        members += [(f"{key}.jpg", encode(random_pixels(row), "JPEG")), (f"{key}.txt", caption)]
    write_tar(tmp_path / "shard.tar", members)
    source = corpora.WebDatasetSource(str(tmp_path / "shard.tar"))
    with caplog.at_level(logging.WARNING):
        batches = eval_batches(source)
    counter = pipeline.BadInputCounter()
    for batch in batches:
        counter.update(batch)
    assert np.concatenate([b["id"] for b in batches]).tolist() == ["00000", "00001", "00003"]
    assert np.concatenate([b["text"] for b in batches]).tolist() == ["caption 0", "caption 1", "caption 3"]
    assert {k: v for k, v in counter.totals.items() if v} == {"undecodable_text": 1}
    assert f"{tmp_path / 'shard.tar'}: member 00002.txt is not UTF-8 text (byte 0xe9 at offset 3)" in caplog.text


def test_conversion_keeps_an_unreadable_record_as_a_marker_counted_the_same(tmp_path):
    manifest = _manifest_with_a_line_that_is_not_utf8(tmp_path)
    corpora.convert_to_array_record(corpora.ManifestSource(str(manifest)), str(tmp_path / "ar"))
    converted = corpora.ArrayRecordCorpusSource(str(tmp_path / "ar" / "*.array_record"))
    assert len(converted) == 5
    with pytest.raises(BadRecordError, match=r"manifest\.jsonl:3"):
        converted[2]
    counter = pipeline.BadInputCounter()
    for batch in eval_batches(converted):
        counter.update(batch)
    assert {k: v for k, v in counter.totals.items() if v} == {"undecodable_text": 1}
    assert sorted(os.listdir(tmp_path / "ar")) == ["corpus-00000-of-00001.array_record", "corpus.meta.json"]


def test_text_bytes_that_are_not_utf8_are_an_undecodable_text_bad_input():
    record = {"id": "x", "image": encode(random_pixels(0), "PNG"), "caption": np.asarray(b"caf\xe9", object)}
    decoder = pipeline.ExampleDecoder(spec=SPEC, text_keys=("caption",), keep_text=True)
    marker = decoder.random_map(Fetched(0, record), np.random.default_rng(0))
    assert marker.kind == "undecodable_text" and "field 'caption' is not UTF-8" in marker.detail
