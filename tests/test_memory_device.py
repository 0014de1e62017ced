"""Memory search on device and host: sharded top-k and gather against numpy on 8 simulated devices,
low-precision tables, placement from memory maps, and the host retriever against the device one."""

import json
import os
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from vlm_jax.memory import device, host, store

DIM = 16


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_memory(rows, seed):
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(rows, DIM))), unit(rng.normal(size=(rows, DIM)))


def reference_top_k(queries, keys, k, *, exclude_rows=None, dedup_threshold=None):
    """numpy top-k of queries [B, D] @ keys [N, D].T: ids int [B, k] (-1 missing), scores float64 [B, k]."""
    scores = np.asarray(queries, np.float64) @ np.asarray(keys, np.float64).T
    if dedup_threshold is not None:
        scores[scores >= dedup_threshold] = -np.inf
    if exclude_rows is not None:
        for row, excluded in enumerate(np.asarray(exclude_rows).reshape(len(queries), -1)):
            scores[row, excluded[excluded >= 0]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(top), order, -1)
    pad = k - ids.shape[1]
    return np.pad(ids, ((0, 0), (0, pad)), constant_values=-1), np.pad(top, ((0, 0), (0, pad)),
                                                                       constant_values=-np.inf)


def reference_gather(rows, ids):
    values = np.asarray(rows, np.float32)[np.maximum(ids, 0)]
    return np.where((ids >= 0)[..., None], values, 0.0)


def search_case():
    """37 memory rows (not a multiple of 8 shards), 5 queries; queries 0 and 2 are memory rows 3 and 36
    (for dedup), exclusions spread over every shard with -1 holes."""
    images, texts = random_memory(37, seed=3)
    queries = unit(np.random.default_rng(4).normal(size=(5, DIM)))
    queries[0], queries[2] = images[3], images[36]
    exclude = np.array([[3, 10], [-1, -1], [36, 0], [-1, 5], [1, 2]], np.int32)
    return images, texts, queries, exclude


def assert_top_k_matches_reference(table_rows, placed_rows, queries, num_rows, *, mesh, axes, exclude, atol):
    for k in (7, 50):  # 50 > 37 rows: the tail is missing
        for kwargs in ({}, {"exclude_rows": exclude}, {"exclude_rows": exclude[:, 0]}, {"dedup_threshold": 0.99}):
            search = jax.jit(lambda q, keys: device.top_k(q, keys, k, num_rows=num_rows, mesh=mesh, axes=axes,
                                                          **kwargs))
            scores, ids = search(jnp.asarray(queries), placed_rows)
            expected_ids, expected_scores = reference_top_k(queries, table_rows, k, **kwargs)
            assert ids.dtype == jnp.int32 and scores.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(ids), expected_ids, err_msg=f"k={k} {list(kwargs)}")
            np.testing.assert_allclose(np.asarray(scores), expected_scores, atol=atol)


# --------------------------------------------------------------------------------------------------
# Checks run in one subprocess with 8 simulated CPU devices


def _meshes():
    auto = (jax.sharding.AxisType.Auto,) * 2
    four_by_two = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=auto)
    explicit = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    return {"memory_8": (device.default_mesh(), None), "data_fsdp_4x2": (four_by_two, None),
            "data_only_of_4x2": (four_by_two, ("data",)), "explicit_4x2": (explicit, None)}


def _check_top_k_on_meshes_matches_numpy():
    images, _, queries, exclude = search_case()
    for name, (mesh, axes) in _meshes().items():
        rows = device.place_rows(images, mesh=mesh, axes=axes)
        axes = tuple(axes or mesh.axis_names)
        assert rows.shape == (40, DIM), name
        assert rows.sharding.spec == jax.sharding.PartitionSpec(axes, None), name
        np.testing.assert_array_equal(np.asarray(rows)[37:], 0.0)
        assert_top_k_matches_reference(images, rows, queries, 37, mesh=mesh, axes=axes, exclude=exclude, atol=1e-5)


def _check_low_precision_tables_match_numpy_on_their_rounded_rows():
    images, texts, queries, exclude = search_case()
    mesh = device.default_mesh()
    for dtype in (np.float16, ml_dtypes.bfloat16):
        table = device.place_memory(images, texts, mesh=mesh, dtype=dtype)
        assert table.image_embeddings.dtype == dtype and table.text_embeddings.dtype == dtype
        # Scores use the queries and rows as the table holds them, accumulated in float32.
        rounded_rows = images.astype(dtype).astype(np.float32)
        rounded_queries = queries.astype(dtype).astype(np.float32)
        assert_top_k_matches_reference(rounded_rows, table.image_embeddings, rounded_queries, 37, mesh=mesh,
                                       axes=table.axes, exclude=exclude, atol=1e-5)
        ids = np.array([[0, 36, -1], [5, -1, 17]])
        gathered = jax.jit(lambda i: device.gather_rows(table.text_embeddings, i, mesh=mesh, axes=table.axes))(ids)
        np.testing.assert_array_equal(np.asarray(gathered), reference_gather(texts.astype(dtype), ids))


def _check_gather_on_meshes_matches_numpy():
    _, texts, _, _ = search_case()
    ids = np.array([[0, 4, 5, -1], [36, 35, -1, -1], [8, 9, 30, 12]])
    for name, (mesh, axes) in _meshes().items():
        rows = device.place_rows(texts, mesh=mesh, axes=axes)
        axes = tuple(axes or mesh.axis_names)
        gathered = jax.jit(lambda i: device.gather_rows(rows, i, mesh=mesh, axes=axes))(ids)
        assert gathered.dtype == jnp.float32 and gathered.shape == (3, 4, DIM)
        np.testing.assert_array_equal(np.asarray(gathered), reference_gather(texts, ids), err_msg=name)


def _check_retriever_as_jit_argument_equals_the_unsharded_one():
    images, texts, queries, exclude = search_case()
    dense = device.DeviceRetriever(device.place_memory(images, texts))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = device.DeviceRetriever(device.place_memory(images, texts, mesh=mesh))

    @jax.jit
    def retrieve(retriever, queries, exclude):
        ids = retriever.search(queries, "image", 6, exclude_rows=exclude, dedup_threshold=0.99)
        return ids, retriever.gather(ids, "text")

    expected_ids, expected_values = retrieve(dense, queries, exclude)
    ids, values = retrieve(sharded, queries, exclude)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))


def _check_memmap_shards_travel_one_at_a_time_in_the_stored_dtype(directory):
    images, texts, _, _ = search_case()
    paths = {}
    for name, rows in (("image", images), ("text", texts)):
        paths[name] = os.path.join(directory, f"{name}.bf16")
        mapped = np.memmap(paths[name], dtype=ml_dtypes.bfloat16, mode="w+", shape=rows.shape)
        mapped[:] = rows.astype(ml_dtypes.bfloat16)
        mapped.flush()
    sources = [np.memmap(paths[name], dtype=ml_dtypes.bfloat16, mode="r", shape=images.shape) for name in paths]
    blocks = []
    original = store.unit_rows

    def spy(rows, dtype=np.float32, **kwargs):
        out = original(rows, dtype, **kwargs)
        blocks.append((len(rows), out.dtype, isinstance(rows, np.memmap), out is rows))
        return out

    store.unit_rows = spy
    try:
        table = device.place_memory(*sources, mesh=device.default_mesh())
    finally:
        store.unit_rows = original
    assert table.image_embeddings.dtype == ml_dtypes.bfloat16
    assert blocks and all(rows <= 5 for rows, _, _, _ in blocks), blocks  # 40 padded rows / 8 shards
    assert all(dtype == ml_dtypes.bfloat16 and from_map and uncopied for _, dtype, from_map, uncopied in blocks)
    np.testing.assert_array_equal(np.asarray(table.image_embeddings)[:37], images.astype(ml_dtypes.bfloat16))


EIGHT_DEVICE_CHECKS = {
    "top_k_on_meshes": _check_top_k_on_meshes_matches_numpy,
    "low_precision_tables": _check_low_precision_tables_match_numpy_on_their_rounded_rows,
    "gather_on_meshes": _check_gather_on_meshes_matches_numpy,
    "retriever_as_jit_argument": _check_retriever_as_jit_argument_equals_the_unsharded_one,
    "memmap_shards": _check_memmap_shards_travel_one_at_a_time_in_the_stored_dtype,
}


def run_eight_device_checks(directory):
    assert jax.device_count() == 8, jax.devices()
    results = {}
    for name, check in EIGHT_DEVICE_CHECKS.items():
        try:
            check(directory) if name == "memmap_shards" else check()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per check by the parent test
            results[name] = traceback.format_exc()
    print("RESULT" + json.dumps(results))


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    directory = str(tmp_path_factory.mktemp("eight_devices"))
    command = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
               f"import test_memory_device as m; m.run_eight_device_checks({directory!r})")
    completed = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0 and "RESULT" in completed.stdout, completed.stderr[-6000:]
    return json.loads(completed.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("check", sorted(EIGHT_DEVICE_CHECKS))
def test_sharded_search_and_gather_on_8_devices(eight_device_results, check):
    assert eight_device_results[check] is None, eight_device_results[check]


# --------------------------------------------------------------------------------------------------
# One device


def test_top_k_without_mesh_matches_numpy_with_exclusions_dedup_and_missing_slots():
    images, _, queries, exclude = search_case()
    rows = device.place_rows(images)
    assert rows.shape == (37, DIM)
    assert_top_k_matches_reference(images, rows, queries, 37, mesh=None, axes=(), exclude=exclude, atol=1e-5)


def test_memory_table_is_a_pytree_of_its_two_tables():
    images, texts = random_memory(6, seed=0)
    table = device.place_memory(images, texts)
    leaves, treedef = jax.tree.flatten(device.DeviceRetriever(table, approximate=True))
    assert len(leaves) == 2 and table.num_rows == 6
    assert jax.tree.unflatten(treedef, leaves).approximate
    assert table.embeddings("text") is table.text_embeddings
    with pytest.raises(ValueError, match="modality must be one of"):
        table.embeddings("audio")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_place_memory_from_a_memmap_keeps_its_dtype_and_makes_no_copy(dtype, tmp_path, monkeypatch):
    images, texts = random_memory(11, seed=1)
    sources = []
    for name, rows in (("image", images), ("text", texts)):
        mapped = np.memmap(tmp_path / name, dtype=dtype, mode="w+", shape=rows.shape)
        mapped[:] = rows.astype(dtype)
        mapped.flush()
        sources.append(np.memmap(tmp_path / name, dtype=dtype, mode="r", shape=rows.shape))
    returned = []
    original = store.unit_rows

    def spy(rows, dtype=np.float32, **kwargs):
        returned.append((rows, original(rows, dtype, **kwargs)))
        return returned[-1][1]

    monkeypatch.setattr(store, "unit_rows", spy)
    table = device.place_memory(*sources)
    assert table.image_embeddings.dtype == dtype and table.text_embeddings.dtype == dtype
    # Unit rows in the stored dtype are handed to the device as the memory map itself.
    assert [out is rows and isinstance(out, np.memmap) for rows, out in returned] == [True, True]
    np.testing.assert_array_equal(np.asarray(table.text_embeddings), texts.astype(dtype))


def test_place_memory_normalizes_rows_that_are_not_unit():
    images, texts = random_memory(9, seed=2)
    table = device.place_memory(3.0 * images, texts, dtype="bfloat16")
    assert table.image_embeddings.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(table.image_embeddings, np.float32), images, atol=1e-2)


def test_unit_rows_returns_unit_rows_of_its_dtype_uncopied_and_normalizes_others():
    images, _ = random_memory(10, seed=2)
    assert store.unit_rows(images) is images
    scaled = 3.0 * images
    np.testing.assert_allclose(store.unit_rows(scaled), images, rtol=1e-6)
    np.testing.assert_allclose(scaled, 3.0 * images)  # the input is left as it was
    assert store.unit_rows(images.astype(np.float16)).dtype == np.float32
    rounded = images.astype(ml_dtypes.bfloat16)
    assert store.unit_rows(rounded, ml_dtypes.bfloat16) is rounded  # bfloat16 rounding still counts as unit
    np.testing.assert_allclose(store.unit_rows(scaled, chunk_rows=3), images, rtol=1e-6)
    np.testing.assert_array_equal(store.unit_rows(np.zeros((2, 4), np.float32)), 0.0)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_host_retriever_inside_jit_equals_device_retriever(backend):
    if backend == "scann":
        pytest.importorskip("scann")  # brute force below min_rows_for_tree: exact
    images, texts, queries, exclude = search_case()
    retriever = host.HostRetriever(images, texts, {"backend": backend, "num_threads": 1})
    on_device = device.DeviceRetriever(device.place_memory(images, texts))

    @jax.jit
    def retrieve(queries, exclude):
        ids = retriever.search(queries, "text", 6, exclude_rows=exclude, dedup_threshold=0.99)
        return ids, retriever.gather(ids, "image")

    ids, values = retrieve(jnp.asarray(queries), jnp.asarray(exclude))
    expected_ids = on_device.search(jnp.asarray(queries), "text", 6, exclude_rows=exclude, dedup_threshold=0.99)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(on_device.gather(expected_ids, "image")))
    np.testing.assert_array_equal(retriever.search_numpy(queries, "text", 6, exclude, 0.99), np.asarray(ids))
    # Only the index of the searched modality was built; the other waits for its first use.
    assert sorted(retriever.indexes) == ["text"]
    assert sorted(retriever.build_indexes().indexes) == ["image", "text"]


def test_host_gather_from_a_bfloat16_memmap_equals_the_device_gather(tmp_path):
    images, texts = random_memory(12, seed=5)
    mapped = np.memmap(tmp_path / "texts", dtype=ml_dtypes.bfloat16, mode="w+", shape=texts.shape)
    mapped[:] = texts.astype(ml_dtypes.bfloat16)
    ids = np.array([[3, -1, 11], [0, 0, -1]])
    retriever = host.HostRetriever(images.astype(ml_dtypes.bfloat16), mapped, "exact")
    on_device = device.DeviceRetriever(device.place_memory(images.astype(ml_dtypes.bfloat16), mapped))
    np.testing.assert_array_equal(retriever.gather_numpy(ids, "text"), np.asarray(on_device.gather(ids, "text")))
    assert retriever.gather_numpy(ids, "text").dtype == np.float32
