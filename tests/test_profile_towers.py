"""benchmarks/profile_towers.py: the HLO categories of compiled thunks, the interval union, the PyTorch
op categories, and a whole profile of the tiny text tower on both sides."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import profile_towers  # noqa: E402


def test_merged_intervals_count_overlaps_once():
    # [0, 10) and [5, 15) overlap in 5 ns; [20, 30) is apart; [22, 25) lies inside it: 15 + 10 = 25 ns.
    assert profile_towers._merged_ms([(20, 30), (0, 10), (5, 15), (22, 25)]) == pytest.approx(25e-6)
    assert profile_towers._merged_ms([]) == 0.0


def test_compiled_instructions_are_categorized_by_what_they_compute():
    def f(a, b):
        product = jnp.tanh(a @ b)
        return product - jnp.max(product, axis=-1, keepdims=True), jnp.transpose(a) * 2.0

    a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
    text = jax.jit(f).lower(a, b).compile().as_text()
    categories = profile_towers.hlo_categories(text)
    entry = text[text.index("ENTRY"):]
    called = [name for name in categories if f"%{name} = " in entry or f" {name} = " in entry]
    kinds = {categories[name] for name in called}
    assert "matmul" in kinds  # the dot (alone or fused, with XLA's CPU dot library or not)
    assert "reduction" in kinds  # the row max
    # Every instruction holding a dot is a matmul, whatever else it fuses.
    for name, category in categories.items():
        line = next(line for line in text.splitlines() if f"{name} = " in line)
        if " dot(" in line:
            assert category == "matmul", line


@pytest.mark.parametrize("name, category", [
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::linear", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_softmax", "attention"),
    ("aten::native_layer_norm", "reduction"), ("aten::native_layer_norm_backward", "reduction"),
    ("aten::sum", "reduction"), ("aten::add", "elementwise"), ("aten::mul", "elementwise"),
    ("aten::sigmoid", "elementwise"), ("aten::t", "copy/transpose"), ("aten::copy_", "copy/transpose"),
    ("aten::index_select", "copy/transpose"), ("aten::embedding", "copy/transpose"),
    ("aten::_foreach_mul_", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "other"),
])
def test_pytorch_ops_fall_in_the_same_categories(name, category):
    assert profile_towers.torch_category(name) == category


def test_a_profile_of_the_tiny_text_tower_attributes_its_time(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["profile_towers.py", "--shape", "tiny", "--batch", "4", "--iters", "2"])
    args = profile_towers._parse_args()
    ours_fn, hlo_text, flops, reference_fn, check = profile_towers.text_task(args, str(tmp_path / "hf"))
    assert float(check.removeprefix("max |diff| ")) < 1e-4  # the same tower on both sides
    assert flops > 0
    ours_fn(), reference_fn()
    ours = profile_towers.trace_ours(ours_fn, hlo_text, 2, str(tmp_path / "trace"))
    reference = profile_towers.trace_torch(reference_fn, 2)
    for profile in (ours, reference):
        assert set(profile["categories"]) == set(profile_towers.CATEGORIES)
        assert profile["categories"]["matmul"] > 0
        assert 0 < profile["busy_ms"] <= profile["wall_ms"] * 1.05 + 0.1
        assert max(profile["categories"].values()) <= profile["busy_ms"] + 1e-9
    assert ours["top"] and all(category in profile_towers.CATEGORIES for _, category, _ in ours["top"])
    assert ours["executor_ms"] >= ours["busy_ms"] * 0.5
    assert any(name == "aten::addmm" for name, _, _ in reference["top"])
