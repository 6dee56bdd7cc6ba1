"""The heartbeat ingress's per-peer token buckets (producers/gateway/rate_limit.py): pure, clock passed in."""
from __future__ import annotations

import pytest

from producers.gateway.rate_limit import TokenBuckets


def test_a_burst_then_the_rate_per_key() -> None:
    limits = TokenBuckets(rate=2.0, burst=3)
    assert [limits.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.take("a", 0.0) == pytest.approx(0.5)  # one token back after 1/rate s
    assert limits.take("b", 0.0) == 0.0  # another key has its own bucket
    assert limits.take("a", 0.5) == 0.0
    assert limits.take("a", 0.5) > 0
    assert limits.take("a", 100.0) == 0.0  # refilled, never beyond the burst
    assert [limits.take("a", 100.0) for _ in range(3)][-1] > 0


def test_refusals_do_not_take_tokens_and_keys_are_bounded() -> None:
    limits = TokenBuckets(rate=1.0, burst=1, max_keys=2)
    assert limits.take("a", 0.0) == 0.0
    for _ in range(5):
        assert limits.take("a", 0.5) == pytest.approx(0.5)
    assert limits.take("a", 1.0) == 0.0
    limits.take("b", 1.0)
    limits.take("c", 1.0)
    assert len(limits._buckets) == 2


def test_nonsense_limits_are_refused() -> None:
    for kwargs in ({"rate": 0, "burst": 1}, {"rate": 1, "burst": 0.5}, {"rate": 1, "burst": 1, "max_keys": 0}):
        with pytest.raises(ValueError):
            TokenBuckets(**kwargs)
