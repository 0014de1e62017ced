"""backend="auto": measured choice, the recorded numbers, restore without measuring, the exact fallback."""

import json
import time

import numpy as np
import pytest

from vlm_jax.memory import auto
from vlm_jax.memory import index as index_lib
from vlm_jax.memory.store import unit_rows

AUTO = {"backend": "auto", "num_threads": 1, "auto_threads": 1, "auto_queries": 300, "recall_target": 0.95}
MEASURED = ("recall", "qps", "settings", "threads", "build_s", "met", "lowest")


def clustered(num_rows, dim, *, num_centres, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, dim)).astype(np.float32)
    rows = centres[rng.integers(num_centres, size=num_rows)] + noise * rng.standard_normal((num_rows, dim))
    return unit_rows(rows.astype(np.float32))


def recall(found_ids, true_ids):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_ids, true_ids)])


def points_of(choice, backend, phase="confirmed"):
    return [point for point in choice[phase] if point["backend"] == backend]


@pytest.fixture(scope="module")
def memory():
    vectors = clustered(3400, 32, num_centres=60, noise=0.7, seed=0)
    return vectors[:3000], vectors[3000:]  # fresh queries from the same centres


@pytest.fixture(scope="module")
def auto_index(memory):
    return index_lib.build_index(AUTO, memory[0])


def test_auto_picks_the_fastest_backend_that_meets_the_target_on_fresh_queries(memory, auto_index):
    keys, queries = memory
    choice = auto_index.choice
    assert auto_index.name == choice["chosen"]["backend"] == auto_index.config.backend
    for field, value in choice["chosen"]["settings"].items():  # the index searches at the chosen rung
        assert getattr(auto_index.config, field) == value
    true_ids = np.argsort(-(queries @ keys.T), axis=1)[:, :10]
    assert recall(auto_index.search(queries, 10)[1], true_ids) >= 0.93
    # Each ladder's lowest rung that meets the target competes; the fastest of them won.
    lowest = [point for point in choice["confirmed"] if point["lowest"]]
    assert {point["backend"] for point in lowest} == {"exact", "scann", "hnsw"}
    fastest = max(lowest, key=lambda point: point["qps"])
    assert (fastest["backend"], fastest["settings"]) == (auto_index.name, choice["chosen"]["settings"])
    assert choice["chosen"]["qps"] == fastest["qps"] and choice["chosen"]["qps_rows"] == 2700


def test_auto_choice_records_every_candidates_numbers(auto_index):
    choice = auto_index.choice
    assert choice["recall_target"] == 0.95 and choice["k"] == 10 and choice["threads"] == 1
    assert choice["num_rows"] == 3000 and choice["queries"] == 300
    # A memory within auto_sample_rows is measured whole, less the held-out rows: no screen.
    assert choice["sample_rows"] == [] and choice["candidates"] == [] and choice["projected_qps"] == {}
    for backend in ("exact", "scann", "hnsw"):
        points = points_of(choice, backend)
        assert points and all(set(MEASURED) <= set(point) for point in points)
        assert all(point["rows"] == 2700 and point["threads"] == 1 and point["qps"] > 0 for point in points)
        assert all(point["met"] == (backend == "exact" or point["recall"] >= 0.95) for point in points)
        # The lowest rung meeting the target is found: the rung below it (when searched) does not meet it.
        for best in (point for point in points if point["lowest"]):
            below = [point for point in points if point["ladder"] == best["ladder"] and point["rung"] < best["rung"]]
            assert best["met"] and not any(point["met"] for point in below)
            if best["rung"] and backend == "hnsw":
                assert any(point["rung"] == best["rung"] - 1 for point in below)
    json.dumps(choice)  # plain JSON, as saved


def test_restored_auto_index_searches_identically_without_measuring(memory, auto_index, tmp_path, monkeypatch):
    _, queries = memory
    auto_index.save(tmp_path / "index")
    saved = json.loads((tmp_path / "index" / index_lib.AUTO_CHOICE_FILE).read_text())
    assert saved == auto_index.choice

    def no_measuring(*args, **kwargs):
        raise AssertionError("load_index measured again")

    monkeypatch.setattr(auto, "build_auto", no_measuring)
    monkeypatch.setattr(auto, "_measure", no_measuring)
    restored = index_lib.load_index(tmp_path / "index")
    assert type(restored) is type(auto_index) and restored.config == auto_index.config
    assert restored.choice == auto_index.choice
    for exclude in (None, np.arange(len(queries))):
        expected_scores, expected_ids = auto_index.search(queries, 10, exclude_ids=exclude)
        scores, ids = restored.search(queries, 10, exclude_ids=exclude)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    # A plain index saved over it leaves no stale choice behind.
    index_lib.build_index("exact", memory[0][:50]).save(tmp_path / "index")
    assert not (tmp_path / "index" / index_lib.AUTO_CHOICE_FILE).exists()


def test_auto_hnsw_holds_every_memory_row_under_its_own_id(memory):
    keys, queries = memory
    index = index_lib.build_index({**AUTO, "auto_candidates": ("hnsw",)}, keys)
    assert index.name == "hnsw" and index.num_rows == 3000 and index.config.num_threads == 1
    assert sorted(index.row_ids) == list(range(3000))  # held-out rows appended after the tuning
    _, ids = index.search(keys[:100], 1)
    assert np.mean(ids[:, 0] == np.arange(100)) >= 0.99
    assert recall(index.search(queries, 10)[1], np.argsort(-(queries @ keys.T), axis=1)[:, :10]) >= 0.93


def test_auto_scann_keeps_the_tree_it_was_tuned_on_with_the_held_out_rows_appended(memory):
    keys, queries = memory
    index = index_lib.build_index({**AUTO, "auto_candidates": ("scann",)}, keys)
    assert index.name == "scann" and index.num_rows == 3000 and index.config.num_threads == 1
    assert index.config.num_leaves == round(np.sqrt(2700))  # the tuned tree's, not sqrt(3000)
    assert sorted(index.row_ids) == list(range(3000))
    chosen = index.choice["chosen"]["settings"]
    assert (index.config.leaves_to_search, index.config.reorder_k) == (chosen["leaves_to_search"], chosen["reorder_k"])
    assert recall(index.search(queries, 10)[1], np.argsort(-(queries @ keys.T), axis=1)[:, :10]) >= 0.93


def test_target_no_approximate_backend_meets_picks_exact(monkeypatch):
    # One cheap rung each, on near-isotropic data: neither approximate backend reaches 0.999.
    monkeypatch.setattr(auto, "HNSW_EF_SEARCH", (10,))
    monkeypatch.setattr(auto, "SCANN_LEAF_FRACTIONS", (0.02,))
    monkeypatch.setattr(auto, "SCANN_REORDER_K", (10,))
    keys = clustered(2600, 64, num_centres=2600, noise=2.0, seed=1)
    index = index_lib.build_index({**AUTO, "recall_target": 0.999}, keys)
    choice = index.choice
    assert index.name == "exact" and choice["chosen"]["backend"] == "exact"
    for backend in ("scann", "hnsw"):
        points = points_of(choice, backend)
        assert points and all(not point["met"] and point["recall"] < 0.999 for point in points)


def test_unavailable_candidates_are_skipped_and_exact_is_the_fallback(monkeypatch):
    monkeypatch.setitem(auto._REQUIRES, "hnsw", "no_such_module_for_this_test")
    keys = clustered(400, 16, num_centres=8, noise=0.5, seed=2)
    index = index_lib.build_index({**AUTO, "auto_candidates": ("hnsw",)}, keys)
    assert index.name == "exact" and index.choice["chosen"]["qps"] is None
    assert "not installed" in index.choice["skipped"]["hnsw"]
    assert index.choice["candidates"] == [] and index.choice["confirmed"] == []
    with pytest.raises(ValueError, match="unknown memory index backend 'ivf'"):
        index_lib.build_index({**AUTO, "auto_candidates": ("exact", "ivf")}, keys)


@pytest.mark.parametrize("confirm", [1, 0])
def test_memory_larger_than_the_sample_is_screened_then_confirmed_on_the_memory(confirm):
    keys = clustered(4000, 16, num_centres=40, noise=0.6, seed=3)
    index = index_lib.build_index({**AUTO, "auto_candidates": ("exact", "hnsw"), "auto_sample_rows": 2400,
                                   "min_rows_for_tree": 600, "auto_confirm": confirm}, keys)
    choice = index.choice
    assert choice["sample_rows"] == [600, 2400]
    for backend in ("exact", "hnsw"):
        assert {point["sample_rows"] for point in points_of(choice, backend, "candidates")} == {600, 2400}
        assert choice["projected_qps"][backend] > 0
    confirmed = {point["backend"] for point in choice["confirmed"]}
    if confirm:  # measured again on the memory less the held-out rows, exact included
        assert confirmed == {"exact", "hnsw"} and choice["chosen"]["qps_rows"] == 3700
        lowest = [point for point in choice["confirmed"] if point["lowest"]]
        assert choice["chosen"]["qps"] == max(point["qps"] for point in lowest)
    else:  # the projections decide
        assert confirmed == set() and choice["chosen"]["qps_rows"] is None
        assert choice["chosen"]["qps"] == max(choice["projected_qps"].values())


def test_projection_follows_the_power_law_through_both_samples():
    sizes = [1000, 4000]
    # q/s falling 4x over a 4x sample: linear, as exact search is.
    assert auto._projected_qps([{"qps": 400.0}, {"qps": 100.0}], sizes, 16_000) == pytest.approx(25.0)
    # Falling 2x over 4x: q/s ~ rows^-0.5.
    assert auto._projected_qps([{"qps": 200.0}, {"qps": 100.0}], sizes, 16_000) == pytest.approx(50.0)
    # Reached on the larger sample only: taken as linear; not reached there: out.
    assert auto._projected_qps([None, {"qps": 100.0}], sizes, 16_000) == pytest.approx(25.0)
    assert auto._projected_qps([{"qps": 100.0}, None], sizes, 16_000) is None
    assert auto._projected_qps([{"qps": 80.0}], [3000], 3300) == 80.0


@pytest.mark.parametrize("start", [0, 7, 20, 26, 32])
def test_lowest_rung_finds_the_first_rung_that_meets_from_any_start(start):
    probed = []

    def meets(rung):
        probed.append(rung)
        return rung >= 20

    assert auto._lowest_rung(meets, 33, start) == 20
    assert len(set(probed)) <= 11  # galloping and bisection: a walk from rung 0 would probe 21 rungs
    assert auto._lowest_rung(lambda rung: False, 33, start) is None
    assert auto._lowest_rung(lambda rung: True, 33, start) == 0


def test_exact_neighbours_skip_each_querys_own_row_across_chunks():
    keys = clustered(300, 8, num_centres=5, noise=0.5, seed=4)
    rows = np.array([0, 150, 299])
    found = auto.exact_neighbours(keys, keys[rows], 5, exclude_rows=rows, chunk_rows=64)
    scores = keys[rows] @ keys.T
    scores[np.arange(3), rows] = -np.inf
    np.testing.assert_array_equal(found, np.argsort(-scores, axis=1, kind="stable")[:, :5])


class _SleepingIndex:
    """Stands in for a MemoryIndex whose passes take the given seconds (the last one from then on)."""

    def __init__(self, seconds):
        self.seconds, self.passes = list(seconds), 0

    def search(self, queries, k):
        time.sleep(self.seconds[min(self.passes, len(self.seconds) - 1)])
        self.passes += 1
        return None, np.zeros((len(queries), k), np.int64)


def test_deciding_rung_keeps_its_fastest_pass_over_the_measuring_time():
    queries = np.zeros((100, 4), np.float32)
    # A slow first pass (as after other work), then 10 ms passes: the measuring time finds them.
    index = _SleepingIndex([0.05, 0.01])
    qps = auto._fastest_pass(index, queries, 1, seconds=0.15)
    assert index.passes >= 4
    assert 100 / 0.03 < qps <= 100 / 0.01  # sleep never undershoots
    # No measuring time: one pass, the slow one.
    index = _SleepingIndex([0.05, 0.01])
    assert auto._fastest_pass(index, queries, 1, seconds=0.0) <= 100 / 0.05 and index.passes == 1
    # A q/s already measured counts as a pass.
    assert auto._fastest_pass(_SleepingIndex([0.05]), queries, 1, seconds=0.0, qps=1e6) == 1e6


def test_auto_measure_s_reaches_the_deciding_rungs(memory, monkeypatch):
    """The measuring time reaches each deciding rung: with it 0 every rung is searched once plus one
    more pass; with it set, the deciding rungs are searched again until it has passed."""
    passes = []
    real = auto._search
    monkeypatch.setattr(auto, "_search", lambda *args: passes.append(1) or real(*args))
    config = {**AUTO, "auto_candidates": ("exact",)}
    index_lib.build_index({**config, "auto_measure_s": 0.0}, memory[0])
    once = len(passes)
    passes.clear()
    started = time.perf_counter()
    index_lib.build_index({**config, "auto_measure_s": 0.3}, memory[0])
    assert time.perf_counter() - started >= 0.3 and len(passes) > once
