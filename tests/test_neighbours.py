"""Precomputed neighbours and self-match maps: any backend against numpy, exclusion, ids -> rows."""

import types

import numpy as np
import pytest

from vlm_jax.memory import neighbours


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def fake_store(images, texts, *, ids=None, indices=None, split="memory"):
    """A stand-in for `vlm_jax.memory.store.Memory` with the fields self-matching reads."""
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    return types.SimpleNamespace(
        image_embeddings=unit(images), text_embeddings=unit(texts), num_rows=len(images), indices=indices,
        ids=np.asarray(ids if ids is not None else indices.astype(str), str),
        manifest={"config": {"data": {"source": "tfds", "tfds_name": "shapes_world/test", "split": split}}})


def numpy_neighbours(queries, keys, k, exclude_rows=None):
    scores = unit(queries) @ unit(keys).T
    if exclude_rows is not None:
        for row, excluded in enumerate(np.asarray(exclude_rows).reshape(len(queries), -1)):
            scores[row, excluded[excluded >= 0]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_memory_rows_of_matches_example_ids_to_memory_rows():
    rows = neighbours.memory_rows_of(np.array(["b", "x", "a"], object), [b"a", b"b", b"c"])
    assert rows.dtype == np.int32 and rows.tolist() == [1, -1, 0]
    assert neighbours.memory_rows_of(np.array([7, 3]), ["3", "5", "7"]).tolist() == [2, 0]
    assert neighbours.id_key(np.bytes_(b"q")) == "q" and neighbours.id_key(np.int64(4)) == "4"


def test_memory_row_lookup_adds_each_batch_examples_own_row():
    lookup = neighbours.MemoryRowLookup(np.array(["a", "b", "c"]))
    batch = lookup({"id": np.array(["c", "q"]), "index": np.array([0, 1])})
    assert batch["memory_row"].dtype == np.int32 and batch["memory_row"].tolist() == [2, -1]
    assert batch["index"].tolist() == [0, 1]
    assert lookup.rows(np.array([b"b"])).tolist() == [1]
    assert lookup.rows(np.array([], str)).shape == (0,)
    with pytest.raises(KeyError, match="data.id_key"):
        lookup({"index": np.array([0])})


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_precompute_neighbours_matches_numpy_and_drops_excluded_rows(backend):
    if backend == "scann":
        pytest.importorskip("scann")  # brute force below min_rows_for_tree: exact
    rng = np.random.default_rng(0)
    keys, queries = unit(rng.normal(size=(30, 8))), unit(rng.normal(size=(11, 8)))
    queries[:3] = keys[[4, 0, 29]]
    exclude = np.array([4, -1, 29] + [-1] * 8)
    config = {"backend": backend, "num_threads": 1}
    found = neighbours.precompute_neighbours(queries, keys, k=5, index_config=config, exclude_rows=exclude,
                                             batch_size=4)  # three search steps, the last one short
    assert found.dtype == np.int32 and found.shape == (11, 5)
    np.testing.assert_array_equal(found, numpy_neighbours(queries, keys, 5, exclude))
    assert found[1, 0] == 0  # not excluded: a memory row is its own nearest neighbour
    deduplicated = neighbours.precompute_neighbours(queries, keys, k=5, index_config=config, dedup_threshold=0.999)
    assert not (deduplicated[:3] == np.array([4, 0, 29])[:, None]).any()
    assert neighbours.precompute_neighbours(queries[:1], keys[:3], k=5)[0, 3:].tolist() == [-1, -1]


def test_self_exclusion_drops_each_examples_own_row_when_it_trains_on_the_memory_itself():
    rng = np.random.default_rng(1)
    memory = fake_store(rng.normal(size=(24, 16)), rng.normal(size=(24, 16)))
    own = neighbours.self_match_rows(memory, memory)
    np.testing.assert_array_equal(own, np.arange(24))
    for modality in ("image_embeddings", "text_embeddings"):
        rows = getattr(memory, modality)
        excluded = neighbours.precompute_neighbours(rows, rows, k=3, exclude_rows=own)
        assert not (excluded == own[:, None]).any()
        kept = neighbours.precompute_neighbours(rows, rows, k=3)
        np.testing.assert_array_equal(kept[:, 0], own)  # its own embedding is its nearest


def test_positional_ids_of_another_source_never_match_but_real_ids_do():
    rng = np.random.default_rng(2)
    memory = fake_store(rng.normal(size=(6, 8)), rng.normal(size=(6, 8)))
    other = fake_store(rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), split="pretrain")
    np.testing.assert_array_equal(neighbours.self_match_rows(other, memory), [-1, -1, -1, -1])
    np.testing.assert_array_equal(neighbours.self_match_rows(memory, memory), np.arange(6))
    named_memory = fake_store(rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), ids=["a", "b", "c"])
    named = fake_store(rng.normal(size=(2, 8)), rng.normal(size=(2, 8)), ids=["c", "z"], split="pretrain")
    np.testing.assert_array_equal(neighbours.self_match_rows(named, named_memory), [2, -1])


def test_positional_ids_of_the_same_source_match_by_source_position():
    rng = np.random.default_rng(3)
    # The memory kept source rows 0..5 except 2 (a bad input), so memory rows and source rows differ.
    memory = fake_store(rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), indices=[0, 1, 3, 4, 5])
    examples = fake_store(rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), indices=[5, 2, 0])
    np.testing.assert_array_equal(neighbours.self_match_rows(examples, memory), [4, -1, 0])
    # Real ids on one side, positions on the other: still the same source, so positions decide.
    named = fake_store(rng.normal(size=(2, 8)), rng.normal(size=(2, 8)), ids=["3", "x"], indices=[4, 1])
    np.testing.assert_array_equal(neighbours.self_match_rows(named, memory), [3, 1])
