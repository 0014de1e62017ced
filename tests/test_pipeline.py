"""grain pipelines: sharding, shuffling, mixing, augmentation, tokenization, stored arrays, bad input, restore."""

import io
import pickle

import grain
import ml_collections
import ml_dtypes
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers

from vlm_jax.data import pipeline
from vlm_jax.data.preprocess import PreprocessSpec, preprocess_image
from vlm_jax.data.tokenizer import Tokenizer

SPEC = PreprocessSpec(image_size=16)


def make_tokenizer(context_length=8):
    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(64)] + ["caption", "recaption", "a", "photo"]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer.from_tokenizers(
        backend, context_length=context_length, pad_token="<pad>", bos_token=None, eos_token="</s>", unk_token="<unk>"
    )


def png_bytes(pixels):
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def make_source(count, size=(20, 24)):
    rng = np.random.default_rng(0)
    return [
        {
            "id": f"ex{i}",
            "image": png_bytes(rng.integers(0, 256, size + (3,), dtype=np.uint8)),
            "caption": f"caption w{i % 64}",
            "recaption": f"recaption w{(i * 7) % 64}",
            "label": i % 5,
        }
        for i in range(count)
    ]


def decoder(**kwargs):
    defaults = dict(spec=SPEC, tokenizer=make_tokenizer(), text_keys=("caption",), label_key="label", keep_text=True)
    return pipeline.ExampleDecoder(**{**defaults, **kwargs})


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert sorted(a) == sorted(b)
        for key in a:
            if key == "bad_input":
                assert a[key] == b[key]
            else:
                np.testing.assert_array_equal(a[key], b[key])


def test_train_batch_has_per_process_shapes_and_model_preprocessing():
    source = make_source(12)
    ds = pipeline.train_dataset(
        source, decoder(), global_batch_size=8, seed=0, process_index=0, process_count=2, num_epochs=1
    )
    batch = next(iter(ds))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["text_ids"].shape == (4, 8) and batch["text_ids"].dtype == np.int32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
    assert set(batch["bad_input"]) == set(pipeline.BAD_INPUT_KINDS)
    tokenizer = make_tokenizer()
    for row, index in enumerate(batch["index"]):
        original = source[index]
        pixels = np.asarray(PIL.Image.open(io.BytesIO(original["image"])))
        np.testing.assert_allclose(batch["image"][row], preprocess_image(pixels, SPEC), atol=1e-6)
        np.testing.assert_array_equal(batch["text_ids"][row], tokenizer(original["caption"])[0])
        assert batch["label"][row] == original["label"] and batch["id"][row] == original["id"]


def test_global_batch_not_divisible_by_process_count_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_dataset(make_source(8), decoder(), global_batch_size=6, seed=0, process_index=0, process_count=4)


@pytest.mark.parametrize("count", [40, 43])
def test_two_processes_see_disjoint_equal_shards_covering_each_epoch(count):
    def epoch_indices(process_index, num_epochs):
        ds = pipeline.train_dataset(
            make_source(count), decoder(), global_batch_size=4, seed=3,
            process_index=process_index, process_count=2, num_epochs=num_epochs,
        )
        return np.concatenate([b["index"] for b in ds])

    host0, host1 = epoch_indices(0, 1), epoch_indices(1, 1)
    assert len(host0) == len(host1) == (count // 2) // 2 * 2
    assert not set(host0) & set(host1)
    if count % 4 == 0:
        assert sorted(np.concatenate([host0, host1])) == list(range(count))
    two_epochs = epoch_indices(0, 2)
    assert len(set(two_epochs[: len(host0)])) == len(host0)
    assert not np.array_equal(two_epochs[: len(host0)], two_epochs[len(host0):]), "epochs reshuffle"


def test_shuffle_depends_only_on_seed():
    def order(seed):
        ds = pipeline.train_dataset(make_source(24), decoder(), global_batch_size=24, seed=seed,
                                    process_index=0, process_count=1)
        return next(iter(ds))["index"]

    np.testing.assert_array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))
    assert sorted(order(5)) == list(range(24))


def test_random_resized_crop_is_reproducible_and_varies_per_epoch():
    source = make_source(4, size=(48, 64))
    augmented = decoder(augment="random_resized_crop", crop_scale=(0.2, 0.5))

    def run():
        ds = pipeline.train_dataset(source, augmented, global_batch_size=4, seed=1,
                                    process_index=0, process_count=1, shuffle=False)
        return take(iter(ds), 2)

    first, second = run(), run()
    np.testing.assert_array_equal(first[0]["image"], second[0]["image"])
    np.testing.assert_array_equal(first[0]["index"], first[1]["index"])
    assert not np.allclose(first[0]["image"], first[1]["image"]), "new crops each epoch"
    plain = next(iter(pipeline.train_dataset(source, decoder(), global_batch_size=4, seed=1, process_index=0,
                                             process_count=1, shuffle=False)))
    assert not np.allclose(first[0]["image"], plain["image"])


def test_caption_field_is_drawn_with_the_configured_probability():
    source = make_source(600)
    ds = pipeline.train_dataset(
        source, decoder(text_keys=("caption", "recaption"), text_weights=(0.25, 0.75)),
        global_batch_size=600, seed=0, process_index=0, process_count=1, num_epochs=1,
    )
    texts = next(iter(ds))["text"]
    recaption_share = np.mean([t.startswith("recaption") for t in texts])
    assert 0.68 < recaption_share < 0.82


def test_one_caption_is_drawn_from_a_caption_list():
    source = [dict(example, caption=["", "w1 a", "w2 photo"]) for example in make_source(40)]
    ds = pipeline.train_dataset(source, decoder(), global_batch_size=40, seed=0, process_index=0, process_count=1)
    texts = set(next(iter(ds))["text"])
    assert texts == {"w1 a", "w2 photo"}


class _FlakySource:
    """Raises on some indices, as a reader does on a damaged record."""

    def __init__(self, examples, failing):
        self.examples, self.failing = examples, failing

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        if index in self.failing:
            raise OSError(f"damaged record {index}")
        return self.examples[index]


def _bad_source():
    examples = make_source(30)
    truncated_jpeg = io.BytesIO()
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(truncated_jpeg, "JPEG")
    examples[2]["image"] = b"not an image"
    examples[5]["image"] = examples[5]["image"][: len(examples[5]["image"]) // 2]
    examples[6]["image"] = truncated_jpeg.getvalue()[:200]
    examples[9]["caption"] = "   "
    del examples[11]["caption"]
    examples[13]["image"] = None
    return _FlakySource(examples, failing={17}), {"corrupt_image": 3, "empty_text": 1, "missing_field": 2,
                                                  "unreadable_record": 1}


@pytest.mark.parametrize("worker_count", [0, 2])
def test_bad_inputs_are_skipped_and_counted_in_batches(worker_count):
    source, expected = _bad_source()
    ds = pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1,
                               worker_count=worker_count)
    counter = pipeline.BadInputCounter()
    indices = []
    for batch in ds:
        counter.update(batch)
        assert "bad_input" not in batch
        indices.extend(batch["index"].tolist())
    assert {k: v for k, v in counter.totals.items() if v} == expected
    assert sorted(indices) == sorted(set(range(30)) - {2, 5, 6, 9, 11, 13, 17})
    assert counter.metrics()["data/skipped_corrupt_image"] == 3


@pytest.mark.parametrize("worker_count", [0, 2])
def test_bad_input_raise_mode_names_the_example_and_the_fix(worker_count):
    source, _ = _bad_source()
    ds = pipeline.eval_dataset(source, decoder(on_bad_input="raise"), global_batch_size=4,
                               process_index=0, process_count=1, worker_count=worker_count)
    with pytest.raises(pipeline.BadInputError, match=r"corrupt_image\) at source index 2, id 'ex2'.*on_bad_input='skip'"):
        list(ds)


def test_eval_pass_is_ordered_with_partial_or_padded_last_batch():
    source = make_source(10)
    batches = list(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(10))
    assert all(b["mask"].all() for b in batches)
    padded = list(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1,
                                        pad_last_batch=True))
    assert [len(b["index"]) for b in padded] == [4, 4, 4]
    assert padded[-1]["mask"].tolist() == [True, True, False, False]


def test_eval_hosts_yield_equal_batch_counts_and_cover_every_example_once():
    source = make_source(11)
    real = []
    counts = []
    for process_index in (0, 1):
        batches = list(pipeline.eval_dataset(source, decoder(), global_batch_size=4,
                                             process_index=process_index, process_count=2))
        counts.append(len(batches))
        for b in batches:
            real.extend(b["index"][b["mask"]].tolist())
    assert counts[0] == counts[1] == 3
    assert sorted(real) == list(range(11))


def test_retrieval_batches_carry_all_captions_with_a_mask():
    source = [dict(example, caption=[f"w{i} a", f"w{i} photo"] if i % 2 else ["w9 a"])
              for i, example in enumerate(make_source(6))]
    batch = next(iter(pipeline.eval_dataset(source, decoder(texts_per_example=3, keep_text=False),
                                            global_batch_size=6, process_index=0, process_count=1)))
    assert batch["text_ids"].shape == (6, 3, 8)
    assert batch["text_mask"].tolist()[:2] == [[True, False, False], [True, True, False]]
    np.testing.assert_array_equal(batch["text_ids"][1, :2], make_tokenizer()(["w1 a", "w1 photo"]))


def _restore_check(worker_count, take_first=3, take_more=4):
    config = ml_collections.ConfigDict({"text_keys": ("caption", "recaption"), "label_key": "label",
                                        "augment": "random_resized_crop", "worker_count": worker_count,
                                        "keep_text": True})
    source = make_source(37)

    def new_iterator():
        return pipeline.make_train_iterator(config, SPEC, make_tokenizer(), 4, seed=7, process_index=0,
                                            process_count=1, source=source)

    iterator = new_iterator()
    take(iterator, take_first)
    state = iterator.get_state()
    expected = take(iterator, take_more)
    restored = new_iterator()
    restored.set_state(state)
    assert_batches_equal(take(restored, take_more), expected)
    for it in (iterator, restored):
        it.close()


def test_restored_iterator_yields_identical_batches():
    _restore_check(worker_count=0, take_first=11)  # crosses the epoch boundary (9 batches/epoch)


def test_restored_iterator_yields_identical_batches_with_worker_processes():
    _restore_check(worker_count=2)


@pytest.mark.parametrize(
    "dataset,label_count",
    [("cifar10", 10), ("pets", 37), ("cars", 196)],
)
def test_tfds_builders_run_through_the_config_driven_pipeline(dataset, label_count):
    config = pipeline.default_config()
    config.dataset = dataset
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        train = pipeline.make_train_iterator(config, SPEC, None, 4, seed=0, process_index=1, process_count=2)
        batch = next(train)
        evaluated = list(pipeline.make_eval_iterator(config, SPEC, None, 4, process_index=0, process_count=1))
    assert batch["image"].shape == (2, 16, 16, 3)
    assert ((0 <= batch["label"]) & (batch["label"] < label_count)).all()
    assert sum(len(b["index"]) for b in evaluated) == 12
    assert not any(any(b["bad_input"].values()) for b in evaluated)


# ---------------------------------------------------------------------------------------------
# Weighted sources, batch maps, stored arrays.


def embedding_source(count, dim=4, offset=0.0):
    rows = np.arange(count, dtype=np.float32)[:, None] + offset
    return pipeline.ArraySource({"embedding": rows + np.zeros((count, dim), np.float32),
                                 "label": np.arange(count, dtype=np.int32) % 3})


def mixture(parts, **kwargs):
    defaults = dict(global_batch_size=8, seed=3, process_index=0, process_count=1)
    return pipeline.train_mixture(parts, **{**defaults, **kwargs})


def test_mixture_draws_from_sources_in_proportion_to_their_weights():
    parts = [pipeline.WeightedSource(embedding_source(50), pipeline.ArrayDecoder(), weight=3.0),
             pipeline.WeightedSource(embedding_source(30, offset=1000.0), pipeline.ArrayDecoder(), weight=1.0)]
    batches = take(iter(mixture(parts, global_batch_size=40)), 10)
    sources = np.concatenate([b["source"] for b in batches])
    assert sources.dtype == np.int32 and abs(np.mean(sources == 0) - 0.75) < 0.02
    for batch in batches:
        from_second = batch["source"] == 1
        # "index" is the row within the example's own source.
        np.testing.assert_array_equal(batch["embedding"][:, 0], batch["index"] + 1000.0 * from_second)


def test_each_source_of_a_mixture_uses_its_own_decoder():
    source = make_source(24)
    parts = [pipeline.WeightedSource(source, decoder(text_keys=("caption",))),
             pipeline.WeightedSource(source, decoder(text_keys=("recaption",)))]
    batch = next(iter(mixture(parts, global_batch_size=24)))
    for source_position, text in zip(batch["source"], batch["text"]):
        assert text.startswith("recaption" if source_position else "caption")


def test_one_source_reads_in_the_documented_grain_order():
    """One source is shuffled, sliced per host and repeated exactly as the grain recipe does."""
    count, seed = 21, 11
    for process_index in (0, 1):
        ds = pipeline.train_dataset(make_source(count), decoder(), global_batch_size=4, seed=seed,
                                    process_index=process_index, process_count=2)
        indices = np.concatenate([b["index"] for b in take(iter(ds), 10)])
        expected = grain.MapDataset.range(count).seed(seed).shuffle()[process_index : 20 : 2].repeat(None)
        np.testing.assert_array_equal(indices, [expected[i] for i in range(len(indices))])
        assert "source" not in next(iter(ds))


def test_adding_a_source_leaves_the_first_sources_order_unchanged():
    alone = np.concatenate([b["index"] for b in take(iter(mixture(
        [pipeline.WeightedSource(embedding_source(40), pipeline.ArrayDecoder())])), 5)])
    mixed = take(iter(mixture([pipeline.WeightedSource(embedding_source(40), pipeline.ArrayDecoder()),
                               pipeline.WeightedSource(embedding_source(40), pipeline.ArrayDecoder())])), 10)
    first = np.concatenate([b["index"][b["source"] == 0] for b in mixed])
    second = np.concatenate([b["index"][b["source"] == 1] for b in mixed])
    np.testing.assert_array_equal(first[: len(alone)], alone[: len(first)])
    assert not np.array_equal(first[:20], second[:20]), "each source has its own shuffle"


def test_source_weights_must_be_non_negative_and_a_zero_weight_leaves_a_source_out():
    parts = [pipeline.WeightedSource(embedding_source(16), pipeline.ArrayDecoder()),
             pipeline.WeightedSource(embedding_source(16), pipeline.ArrayDecoder(), weight=0.0)]
    batch = next(iter(mixture(parts, global_batch_size=16)))
    assert set(batch["source"].tolist()) == {0}
    with pytest.raises(ValueError, match="non-negative"):
        mixture([pipeline.WeightedSource(embedding_source(16), pipeline.ArrayDecoder(), weight=-1.0)])


def test_processes_read_disjoint_equal_shares_of_every_mixed_source():
    def epoch(process_index):
        parts = [pipeline.WeightedSource(embedding_source(41), pipeline.ArrayDecoder(), weight=2.0),
                 pipeline.WeightedSource(embedding_source(23), pipeline.ArrayDecoder())]
        batches = list(mixture(parts, global_batch_size=4, process_index=process_index, process_count=2,
                               num_epochs=1))
        return [(int(s), int(i)) for b in batches for s, i in zip(b["source"], b["index"])]

    host0, host1 = epoch(0), epoch(1)
    assert len(host0) == len(host1) > 0
    assert len(set(host0)) == len(host0) and not set(host0) & set(host1)


def _add_norm(batch):
    return {**batch, "norm": np.linalg.norm(batch["embedding"], axis=-1)}


def _double_norm(batch):
    batch["norm"] = 2 * batch["norm"]
    return batch


def test_batch_maps_run_in_order_after_batching_and_keep_the_skip_counts():
    embeddings = np.ones((12, 4), np.float32)
    embeddings[5] = np.nan
    source = pipeline.ArraySource({"embedding": embeddings})
    batches = list(pipeline.eval_dataset(source, pipeline.ArrayDecoder(), global_batch_size=4, process_index=0,
                                         process_count=1, batch_maps=(_add_norm, _double_norm)))
    assert all(b["norm"].shape == (len(b["index"]),) for b in batches)
    np.testing.assert_allclose(np.concatenate([b["norm"] for b in batches]), 4.0)
    assert sum(int(b["bad_input"]["nonfinite_embedding"]) for b in batches) == 1
    with pytest.raises(TypeError, match="return the batch dict"):
        next(iter(pipeline.eval_dataset(source, pipeline.ArrayDecoder(), global_batch_size=4, process_index=0,
                                        process_count=1, batch_maps=(lambda batch: list(batch),))))


def _stored_embeddings(tmp_path, count=60, dim=8):
    embeddings = np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32)
    embeddings[4, 1] = np.nan
    embeddings[17] = np.inf
    embeddings[33, 7] = -np.inf
    np.save(tmp_path / "embeddings.npy", embeddings)
    return np.load(tmp_path / "embeddings.npy", mmap_mode="r"), {4, 17, 33}


def test_non_finite_stored_embeddings_are_skipped_and_counted(tmp_path):
    embeddings, bad_rows = _stored_embeddings(tmp_path)
    source = pipeline.ArraySource({"image_embedding": embeddings})
    counter = pipeline.BadInputCounter()
    indices = []
    for batch in pipeline.eval_dataset(source, pipeline.ArrayDecoder(), global_batch_size=8, process_index=0,
                                       process_count=1):
        assert set(batch["bad_input"]) == set(pipeline.ARRAY_BAD_INPUT_KINDS)
        counter.update(batch)
        assert np.isfinite(batch["image_embedding"]).all() and batch["image_embedding"].dtype == np.float32
        indices.extend(batch["index"].tolist())
    assert counter.totals["nonfinite_embedding"] == 3
    assert counter.metrics()["data/skipped_nonfinite_embedding"] == 3
    assert indices == sorted(set(range(60)) - bad_rows)
    raising = pipeline.ArrayDecoder(on_bad_input="raise")
    with pytest.raises(pipeline.BadInputError, match=r"nonfinite_embedding\) at source index 4.*'image_embedding'"):
        list(pipeline.eval_dataset(source, raising, global_batch_size=8, process_index=0, process_count=1))


def test_array_decoder_checks_only_the_fields_it_is_told_to():
    embeddings = np.zeros((4, 2), np.float32)
    embeddings[1] = np.nan
    source = pipeline.ArraySource({"embedding": embeddings, "score": np.full((4,), np.nan, np.float32)})
    batch = next(iter(pipeline.eval_dataset(source, pipeline.ArrayDecoder(keys=("score",), finite_keys=("embedding",)),
                                            global_batch_size=4, process_index=0, process_count=1)))
    assert sorted(batch) == ["bad_input", "index", "mask", "score"] and batch["index"].tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"fields \['missing'\], which the source does not hold"):
        next(iter(pipeline.eval_dataset(source, pipeline.ArrayDecoder(keys=("missing",)), global_batch_size=4,
                                        process_index=0, process_count=1)))


def test_array_source_reads_memmap_rows_lazily_and_pickles_it_by_file(tmp_path):
    embeddings, _ = _stored_embeddings(tmp_path, count=20000)
    source = pipeline.ArraySource({"embedding": embeddings})
    pickled = pickle.dumps(source)
    assert len(pickled) < 2000, "the pickle names the file instead of holding its rows"
    restored = pickle.loads(pickled)
    assert isinstance(restored.fields["embedding"], np.memmap)
    np.testing.assert_array_equal(restored[123]["embedding"], embeddings[123])
    with pytest.raises(TypeError, match="view of a memmap"):
        pickle.dumps(pipeline.ArraySource({"embedding": embeddings[10:]}))


def test_bfloat16_stored_rows_are_cast_to_float32():
    source = pipeline.ArraySource({"embedding": np.ones((4, 3), ml_dtypes.bfloat16)})
    batch = next(iter(pipeline.eval_dataset(source, pipeline.ArrayDecoder(), global_batch_size=4, process_index=0,
                                            process_count=1)))
    assert batch["embedding"].dtype == np.float32 and (batch["embedding"] == 1).all()


def _mixture_restore_check(tmp_path, worker_count, take_first, take_more=5):
    embeddings, _ = _stored_embeddings(tmp_path, count=40)

    def new_iterator():
        parts = [pipeline.WeightedSource(pipeline.ArraySource({"embedding": embeddings}), pipeline.ArrayDecoder(),
                                         weight=2.0),
                 pipeline.WeightedSource(embedding_source(17, dim=8), pipeline.ArrayDecoder(keys=("embedding",)))]
        return iter(mixture(parts, global_batch_size=6, batch_maps=(_add_norm,), worker_count=worker_count))

    iterator = new_iterator()
    take(iterator, take_first)
    state = iterator.get_state()
    expected = take(iterator, take_more)
    restored = new_iterator()
    restored.set_state(state)
    assert_batches_equal(take(restored, take_more), expected)
    assert all("norm" in batch for batch in expected)
    for it in (iterator, restored):
        it.close()


def test_restored_mixture_iterator_yields_the_identical_continuation(tmp_path):
    _mixture_restore_check(tmp_path, worker_count=0, take_first=13)  # past both sources' first epoch


def test_restored_mixture_iterator_yields_the_identical_continuation_with_worker_processes(tmp_path):
    _mixture_restore_check(tmp_path, worker_count=2, take_first=4)


# ---------------------------------------------------------------------------------------------
# Skips at the end of a finite pass.


def _source_with_bad(count, bad):
    examples = make_source(count)
    for index in bad:
        examples[index]["image"] = b"not an image"
    return examples


def _totals(batches):
    counter = pipeline.BadInputCounter()
    for batch in batches:
        counter.update(batch)
    return {kind: count for kind, count in counter.totals.items() if count}


@pytest.mark.parametrize("worker_count", [0, 2])
def test_skips_after_the_last_example_of_an_eval_pass_are_counted_in_its_last_batch(worker_count):
    # 8 good examples fill two batches exactly; the bad ninth has no batch of its own.
    source = _source_with_bad(9, bad=[8])
    batches = list(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1,
                                         worker_count=worker_count))
    assert sum(len(b["index"]) for b in batches) == 8
    assert _totals(batches) == {"corrupt_image": 1}


def test_skips_in_the_dropped_final_batch_of_a_finite_train_pass_are_counted():
    # One epoch of 11 with batches of 4: two batches, then a partial one (bad 9, good 10) that is dropped.
    source = _source_with_bad(11, bad=[1, 9])
    batches = list(pipeline.train_dataset(source, decoder(), global_batch_size=4, seed=0, process_index=0,
                                          process_count=1, num_epochs=1, shuffle=False))
    assert [b["index"].tolist() for b in batches] == [[0, 2, 3, 4], [5, 6, 7, 8]]
    # The skip of row 9, in the dropped batch, rides on the last batch returned.
    assert [int(b["bad_input"]["corrupt_image"]) for b in batches] == [1, 1]


def test_an_eval_pass_of_only_bad_inputs_yields_one_batch_of_counts_alone():
    source = _source_with_bad(3, bad=[0, 1, 2])
    batches = list(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1,
                                         batch_maps=(_add_norm,)))
    assert len(batches) == 1 and sorted(batches[0]) == ["bad_input"]
    assert _totals(batches) == {"corrupt_image": 3}


def test_restoring_an_eval_pass_mid_way_counts_each_skip_once():
    source = _source_with_bad(14, bad=[2, 12, 13])

    def new_iterator():
        return iter(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1))

    iterator = new_iterator()
    first = take(iterator, 1)
    state = iterator.get_state()
    rest = list(iterator)
    restored = new_iterator()
    restored.set_state(state)
    assert_batches_equal(list(restored), rest)
    assert [len(b["index"]) for b in first + rest] == [4, 4, 3]
    assert _totals(first + rest) == {"corrupt_image": 3}


def test_skipped_inputs_are_logged_with_their_detail(caplog):
    source = _source_with_bad(6, bad=[4])
    with caplog.at_level("WARNING", logger="vlm_jax.data.bad_input"):
        list(pipeline.eval_dataset(source, decoder(), global_batch_size=4, process_index=0, process_count=1))
    assert "Skipped bad input (corrupt_image) at source index 4: UnidentifiedImageError" in caplog.text
