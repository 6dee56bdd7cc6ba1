"""Per-key token buckets (pure: the clock is passed in): the heartbeat ingress's limit per peer.

Each key holds up to `burst` tokens, refilled at `rate` per second; a request takes one or is refused with the
seconds until one is there. At most `max_keys` buckets are kept (the least recently used is forgotten: a
forgotten key starts full again, which only ever allows what a fresh peer gets).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBuckets:
    rate: float  # tokens per second
    burst: float
    max_keys: int = 100_000
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1 and self.max_keys >= 1):
            raise ValueError("a token bucket needs rate > 0, burst >= 1 and max_keys >= 1")

    def take(self, key: str, now: float) -> float:
        """0.0 when `key` may go on (one token taken), else the seconds until it may."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
