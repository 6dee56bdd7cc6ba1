"""The benchmarks' shared helpers: the final `ratio=` lines and the figures they are computed from.

No timing here: the benchmarks themselves run with `make bench`.
"""
from __future__ import annotations

import importlib
import math

import pytest

from bench._common import Target, final_lines, percentile, ratio

BENCHES = {"gateway_vs_direct": Target(0.95), "ledger_ingest": Target(0.5), "replay_rate": Target(0.5),
           "payments_close": Target(2.0, at_least=False), "gateway_hostile": Target(1.5, at_least=False),
           "idle_mesh": Target(0.5, at_least=False)}


def test_ratio_and_percentile():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.0, 0.0) == 1.0 and ratio(1.0, 0.0) == math.inf
    assert percentile([5, 1, 3], 50) == 3
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_final_lines_end_with_the_ratio_and_say_pass_or_miss():
    assert final_lines(0.734, Target(0.5)) == ["target: ratio >= 0.5 -> PASS", "ratio=0.734"]
    assert final_lines(0.25, Target(0.5)) == ["target: ratio >= 0.5 -> MISS", "ratio=0.250"]
    assert final_lines(1.9994, Target(2, at_least=False)) == ["target: ratio <= 2 -> PASS", "ratio=1.999"]
    assert final_lines(13.0, Target(2, at_least=False))[0].endswith("MISS")
    last = final_lines(1.0, Target(0.95))[-1]
    assert last.startswith("ratio=") and float(last.split("=", 1)[1]) == 1.0


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_each_benchmark_declares_its_target(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.TARGET == BENCHES[name]
    assert callable(module.main)


def test_gateway_streamed_rate_counts_the_tokens_after_the_first():
    from bench.gateway_vs_direct import Run

    assert Run(ttft=0.02, tokens=11, streaming=0.5).rate == 20.0
    assert Run(ttft=0.02, tokens=1, streaming=0.0).rate == math.inf
