"""Memory search: exact/approx on a sharded mesh, ScaNN and HNSW recall and persistence, exclusion and padding."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.memory import index as index_lib
from vlm_jax.memory.hnsw import HnswIndex
from vlm_jax.memory.scann_index import ScannIndex
from vlm_jax.memory.store import unit_rows

BACKENDS = ("exact", "approx", "scann", "hnsw")


def clustered_unit_vectors(num_rows, dim, *, num_centres, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, dim)).astype(np.float32)
    vectors = centres[rng.integers(num_centres, size=num_rows)] + noise * rng.standard_normal((num_rows, dim))
    return unit_rows(vectors.astype(np.float32))


def numpy_top_k(queries, keys, k, exclude_ids=None):
    scores = unit_rows(queries) @ unit_rows(keys).T
    if exclude_ids is not None:
        for row, excluded in enumerate(np.asarray(exclude_ids).reshape(len(queries), -1)):
            scores[row, excluded[excluded >= 0]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found_ids, true_ids):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_ids, true_ids)])


_EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from vlm_jax.memory import index as index_lib

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1003, 32)).astype(np.float32)   # 1003 rows: not a multiple of 8 shards
    queries = rng.standard_normal((37, 32)).astype(np.float32)
    exclude = rng.integers(0, 1003, size=(37, 3))               # rows spread over every shard
    meshes = {
        "default": None,
        "explicit_4x2": jax.make_mesh((4, 2), ("data", "tensor")),
        "auto_4x2": jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2),
    }
    out = {"devices": jax.device_count()}
    for name, mesh in meshes.items():
        index = index_lib.build_index({"backend": "exact", "batch_size": 16}, keys, mesh=mesh)
        scores, ids = index.search(queries, 10)
        _, excluded_ids = index.search(queries, 10, exclude_ids=exclude)
        out[name] = {
            "num_shards": index.num_shards,
            "padded_rows": int(index.keys.shape[0]),
            "ids": ids.tolist(),
            "scores": scores.tolist(),
            "excluded_ids": excluded_ids.tolist(),
        }
    small = index_lib.build_index("exact", keys[:5])            # 5 rows over 8 shards: 3 shards all padding
    small_scores, small_ids = small.search(queries[:4], 7, exclude_ids=np.array([0, 1, -1, 4]))
    out["small"] = {"ids": small_ids.tolist(), "scores": [[float(s) for s in row] for row in small_scores]}
    print("RESULT" + json.dumps(out))
    """
)


def test_exact_on_eight_devices_matches_numpy_top_k_with_padding_and_exclusion():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    completed = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICE_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULT", 1)[1])
    assert result["devices"] == 8

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1003, 32)).astype(np.float32)
    queries = rng.standard_normal((37, 32)).astype(np.float32)
    exclude = rng.integers(0, 1003, size=(37, 3))
    expected = numpy_top_k(queries, keys, 10)
    expected_scores = np.take_along_axis(
        unit_rows(queries) @ unit_rows(keys).T, expected, axis=1
    )
    expected_excluded = numpy_top_k(queries, keys, 10, exclude_ids=exclude)
    for name in ("default", "explicit_4x2", "auto_4x2"):
        mesh_result = result[name]
        assert mesh_result["num_shards"] == 8
        assert mesh_result["padded_rows"] == 1008
        np.testing.assert_array_equal(np.array(mesh_result["ids"]), expected, err_msg=name)
        np.testing.assert_allclose(np.array(mesh_result["scores"]), expected_scores, atol=1e-5)
        np.testing.assert_array_equal(np.array(mesh_result["excluded_ids"]), expected_excluded, err_msg=name)

    small_ids = np.array(result["small"]["ids"])
    small_scores = np.array(result["small"]["scores"])
    remaining = [4, 4, 5, 4]  # 5 rows minus the excluded one (none for -1)
    for row, count in enumerate(remaining):
        expected_row = numpy_top_k(queries[row : row + 1], keys[:5], count, exclude_ids=[[0, 1, -1, 4][row]])[0]
        np.testing.assert_array_equal(small_ids[row, :count], expected_row)
        assert (small_ids[row, count:] == -1).all()
        assert np.isneginf(small_scores[row, count:]).all()
        assert np.isfinite(small_scores[row, :count]).all()


def test_approx_recall_against_exact_is_above_bound():
    vectors = clustered_unit_vectors(3100, 32, num_centres=30, noise=0.8, seed=1)
    keys, queries = vectors[:3000], vectors[3000:]
    exact_ids = index_lib.build_index("exact", keys).search(queries, 10)[1]
    approx = index_lib.build_index({"backend": "approx", "recall_target": 0.9}, keys)
    assert recall(approx.search(queries, 10)[1], exact_ids) >= 0.85


@pytest.fixture(scope="module")
def clustered_memory():
    # Queries are fresh draws around the same centres, not perturbed memory rows.
    vectors = clustered_unit_vectors(4200, 64, num_centres=64, noise=0.6, seed=2)
    return vectors[:4000], vectors[4000:]


@pytest.fixture(scope="module")
def scann_index(clustered_memory):
    return index_lib.build_index({"backend": "scann", "num_threads": 1}, clustered_memory[0])


def test_scann_recall_at_10_on_clustered_vectors(clustered_memory, scann_index):
    keys, queries = clustered_memory
    assert scann_index.uses_tree
    assert scann_index.config.num_leaves == 63
    assert scann_index.config.leaves_to_search == 8
    _, ids = scann_index.search(queries, 10)
    assert recall(ids, numpy_top_k(queries, keys, 10)) >= 0.95


def test_scann_save_load_round_trip_gives_identical_results(clustered_memory, scann_index, tmp_path):
    _, queries = clustered_memory
    scann_index.save(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "moved")  # relative asset paths survive a move
    restored = index_lib.load_index(tmp_path / "moved")
    assert isinstance(restored, ScannIndex)
    assert restored.config == scann_index.config
    for exclude in (None, np.arange(len(queries))):
        expected_scores, expected_ids = scann_index.search(queries, 10, exclude_ids=exclude)
        scores, ids = restored.search(queries, 10, exclude_ids=exclude)
        np.testing.assert_array_equal(ids, expected_ids)
        # Reordering dot products may differ in the last bit between two loads of the same assets.
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["exact", "approx"])
def test_device_index_save_load_round_trip_gives_identical_results(backend, tmp_path):
    keys = clustered_unit_vectors(500, 16, num_centres=10, noise=0.5, seed=4)
    index = index_lib.build_index({"backend": backend, "batch_size": 8}, keys)
    index.save(tmp_path)
    restored = index_lib.load_index(tmp_path, batch_size=64)
    assert restored.config.batch_size == 64
    expected = index.search(keys[:20], 5)
    np.testing.assert_array_equal(restored.search(keys[:20], 5)[1], expected[1])
    np.testing.assert_array_equal(restored.search(keys[:20], 5)[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_match_exclusion_returns_next_best_neighbours(backend, clustered_memory):
    keys, _ = clustered_memory
    queries = keys[:50]
    index = index_lib.build_index({"backend": backend, "num_threads": 1}, keys)
    _, ids = index.search(queries, 10)
    # ScaNN and HNSW are approximate: a row may miss itself when its leaf (or graph path) is not searched.
    assert np.mean(ids[:, 0] == np.arange(50)) >= (0.9 if backend in ("scann", "hnsw") else 1.0)
    _, ids = index.search(queries, 10, exclude_ids=np.arange(50))
    assert not (ids == np.arange(50)[:, None]).any()
    assert (ids >= 0).all()
    expected = numpy_top_k(queries, keys, 10, exclude_ids=np.arange(50))
    if backend == "exact":
        np.testing.assert_array_equal(ids, expected)
    else:
        assert recall(ids, expected) >= 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_dedup_threshold_drops_near_duplicates_and_still_returns_k(backend):
    rng = np.random.default_rng(5)
    base = clustered_unit_vectors(3000, 32, num_centres=30, noise=0.8, seed=6)
    query = base[0]
    # 40 near-copies of the query: more than dedup_margin, so ScaNN has to search again for the rest.
    copies = unit_rows(query + 1e-3 * rng.standard_normal((40, 32)).astype(np.float32))
    keys = np.concatenate([base, copies])
    config = {"backend": backend, "dedup_threshold": 0.999, "dedup_margin": 4, "num_threads": 1}
    index = index_lib.build_index(config, keys)
    scores, ids = index.search(query[None], 10)
    assert ids.shape == (1, 10) and (ids >= 0).all()
    assert (scores < 0.999).all()
    assert not np.isin(ids, [0, *range(3000, 3040)]).any()
    keep_scores = unit_rows(keys) @ query
    keep_scores[keep_scores >= 0.999] = -np.inf
    expected = np.argsort(-keep_scores)[:10]
    assert recall(ids, expected[None]) >= 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_remaining_rows_pads_with_minus_one_and_neg_inf(backend):
    keys = clustered_unit_vectors(13, 8, num_centres=3, noise=0.5, seed=7)
    index = index_lib.build_index({"backend": backend}, keys)
    scores, ids = index.search(keys[:2], 16, exclude_ids=np.array([[0, 5], [-1, -1]]))
    assert ids.shape == (2, 16) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert sorted(ids[0, :11]) == [i for i in range(13) if i not in (0, 5)]
    assert sorted(ids[1, :13]) == list(range(13))
    assert (ids[0, 11:] == -1).all() and np.isneginf(scores[0, 11:]).all()
    assert (ids[1, 13:] == -1).all() and np.isneginf(scores[1, 13:]).all()
    assert np.all(np.diff(scores[1, :13]) <= 1e-6)


def test_scann_falls_back_to_brute_force_below_tree_size(caplog):
    keys = clustered_unit_vectors(300, 16, num_centres=5, noise=0.5, seed=8)
    with caplog.at_level("WARNING"):
        index = index_lib.build_index("scann", keys)
    assert not index.uses_tree
    assert "brute force" in caplog.text
    np.testing.assert_array_equal(index.search(keys[:20], 5)[1], numpy_top_k(keys[:20], keys, 5))


def test_registry_and_config_errors_name_the_fix(tmp_path):
    assert index_lib.get_index_class("exact") is index_lib.ExactIndex
    assert index_lib.get_index_class("scann") is ScannIndex
    assert index_lib.get_index_class("hnsw") is HnswIndex
    with pytest.raises(ValueError, match="unknown memory index backend 'faiss'"):
        index_lib.get_index_class("faiss")
    with pytest.raises(ValueError, match="unknown memory index config fields"):
        index_lib.IndexConfig.from_any({"backend": "exact", "num_leafs": 10})
    keys = clustered_unit_vectors(50, 8, num_centres=3, noise=0.5, seed=9)
    index = index_lib.build_index("exact", keys)
    with pytest.raises(ValueError, match="exclude_ids must be memory rows"):
        index.search(keys[:2], 3, exclude_ids=np.array([0, 50]))
    index.save(tmp_path)
    with pytest.raises(ValueError, match="fixed when the index is built"):
        index_lib.load_index(tmp_path, normalize=False)


def test_with_search_config_changes_query_settings_without_rebuilding(clustered_memory, scann_index):
    keys, queries = clustered_memory
    every_leaf = scann_index.with_search_config(leaves_to_search=scann_index.config.num_leaves, reorder_k=400)
    assert every_leaf.searcher is scann_index.searcher
    assert scann_index.config.leaves_to_search == 8
    assert recall(every_leaf.search(queries, 10)[1], numpy_top_k(queries, keys, 10)) >= 0.99

    exact = index_lib.build_index("exact", keys)
    deduplicated = exact.with_search_config(dedup_threshold=0.999)
    assert (exact.search(keys[:5], 3)[1][:, 0] == np.arange(5)).all()
    assert not (deduplicated.search(keys[:5], 3)[1] == np.arange(5)[:, None]).any()
    with pytest.raises(ValueError, match="cannot change on a built index"):
        exact.with_search_config(num_leaves=4)


def test_bfloat16_memory_keeps_float32_scores_and_near_exact_neighbours(clustered_memory):
    keys, queries = clustered_memory
    index = index_lib.build_index({"backend": "exact", "dtype": "bfloat16"}, keys)
    assert index.keys.dtype == np.dtype("bfloat16")
    scores, ids = index.search(queries, 10)
    assert scores.dtype == np.float32
    assert recall(ids, numpy_top_k(queries, keys, 10)) >= 0.9


@pytest.fixture(scope="module")
def hnsw_index(clustered_memory):
    return index_lib.build_index({"backend": "hnsw", "num_threads": 1}, clustered_memory[0])


def test_hnsw_recall_at_10_rises_with_ef_search_on_clustered_vectors(clustered_memory, hnsw_index):
    keys, queries = clustered_memory
    true_ids = numpy_top_k(queries, keys, 10)
    assert hnsw_index.config.hnsw_ef_search == 64
    assert recall(hnsw_index.search(queries, 10)[1], true_ids) >= 0.95
    wide = hnsw_index.with_search_config(hnsw_ef_search=512)
    assert wide.graph is hnsw_index.graph
    assert recall(wide.search(queries, 10)[1], true_ids) >= 0.99
    scores, ids = wide.search(queries, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ keys.T, ids, axis=1), atol=1e-5)


def test_hnsw_save_load_round_trip_gives_identical_results(clustered_memory, hnsw_index, tmp_path):
    _, queries = clustered_memory
    hnsw_index.save(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    restored = index_lib.load_index(tmp_path / "moved")
    assert isinstance(restored, HnswIndex) and restored.choice is None
    assert restored.config == hnsw_index.config
    for exclude in (None, np.arange(len(queries))):
        expected_scores, expected_ids = hnsw_index.search(queries, 10, exclude_ids=exclude)
        scores, ids = restored.search(queries, 10, exclude_ids=exclude)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)
    wide = index_lib.load_index(tmp_path / "moved", hnsw_ef_search=256)
    assert wide.config.hnsw_ef_search == 256
    np.testing.assert_array_equal(wide.search(queries, 10)[1], hnsw_index.with_search_config(hnsw_ef_search=256)
                                  .search(queries, 10)[1])


def test_hnsw_without_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    keys = clustered_unit_vectors(50, 8, num_centres=3, noise=0.5, seed=10)
    with pytest.raises(UserError, match=r'pip install "vlm_jax\[hnsw\]"'):
        index_lib.build_index("hnsw", keys)


def test_new_config_fields_are_validated_and_round_trip_through_json():
    for field, value, message in (("hnsw_m", 0, "hnsw_m must be an integer >= 1"),
                                  ("hnsw_ef_search", 2.5, "hnsw_ef_search must be an integer >= 1"),
                                  ("recall_target", 1.5, "recall_target must be in"),
                                  ("auto_threads", -1, "auto_threads must be an integer >= 0"),
                                  ("auto_candidates", ("exact", "auto"), "auto_candidates must name"),
                                  ("auto_candidates", (), "auto_candidates must name"),
                                  ("auto_confirm", -1, "auto_confirm must be an integer >= 0"),
                                  ("auto_measure_s", -0.5, "auto_measure_s must be a number of seconds >= 0")):
        with pytest.raises(ValueError, match=message):
            index_lib.IndexConfig.from_any({field: value})
    config = index_lib.IndexConfig.from_any({"backend": "auto", "auto_candidates": ["hnsw", "exact"],
                                             "auto_threads": 2})
    assert config.auto_candidates == ("hnsw", "exact")
    assert index_lib.IndexConfig.from_any(json.loads(json.dumps(dataclasses.asdict(config)))) == config


@pytest.mark.parametrize("backend", ["scann", "hnsw"])
def test_host_rows_appended_out_of_order_keep_their_memory_row_ids(backend, clustered_memory, tmp_path):
    keys, queries = clustered_memory
    order = np.random.default_rng(11).permutation(len(keys))
    index = index_lib.build_index({"backend": backend, "num_threads": 1}, keys[order[:-300]])
    if backend == "scann":
        assert index.uses_tree  # appended rows join leaves, with their quantized codes
    with pytest.raises(ValueError, match="expected row_ids for 4000 rows"):
        index.add(keys[order[-300:]], order[:-1])
    index.add(keys[order[-300:]], order)
    assert index.num_rows == 4000
    scores, ids = index.search(queries, 10)
    assert recall(ids, numpy_top_k(queries, keys, 10)) >= 0.95
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ keys.T, ids, axis=1), atol=1e-5)
    _, excluded = index.search(keys[:50], 10, exclude_ids=np.arange(50))
    assert not (excluded == np.arange(50)[:, None]).any() and (excluded >= 0).all()
    index.save(tmp_path)
    restored = index_lib.load_index(tmp_path)
    assert restored.num_rows == 4000
    np.testing.assert_array_equal(restored.row_ids, order)
    np.testing.assert_array_equal(restored.search(queries, 10)[1], ids)
    index_lib.build_index({"backend": backend, "num_threads": 1}, keys[:3000]).save(tmp_path)
    assert index_lib.load_index(tmp_path).row_ids is None  # no stale row map from the index saved before
