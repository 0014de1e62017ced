"""benchmarks/train_step.py: the turns in which ours and the reference are timed."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_step  # noqa: E402


@pytest.mark.parametrize("iters,block,expected", [
    (4, 2, "aaabbbaaabbb"),  # two turns each, one untimed call then two timed
    (3, 2, "aaabbbaabb"),  # the last turn times what is left
    (2, 5, "aaabbb"),
])
def test_turns_start_with_an_untimed_call(iters, block, expected, monkeypatch):
    calls = []
    clock = iter(range(1000))
    # A timed call reads the clock twice, one tick apart.
    monkeypatch.setattr(train_step, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    times = train_step._alternate([lambda: calls.append("a"), lambda: calls.append("b")], iters, block)
    assert "".join(calls) == expected
    assert [len(t) for t in times] == [iters, iters]
    assert all(t == 1 for side in times for t in side)
    # The reference's learning-rate table covers every call the benchmark makes of its step.
    args = types.SimpleNamespace(warmup=1, iters=iters, block=block)
    assert train_step._calls_per_function(args) == 2 + expected.count("a")
