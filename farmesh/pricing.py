"""Pricing and attribution: pure functions on integer base units (see farmesh.money).

A session costs delivered tokens x price.  That amount is split across the nodes that did the
work, weighted by blocks served x tokens processed, so a node holding twice the blocks earns
twice as much for the same tokens.  The split is exact: shares always add up to the cost; the
few base units that integer division leaves over go to the largest remainders (ties: earlier
span first), which makes the result deterministic for replays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Work:
    peer_id: str
    start_block: int
    end_block: int
    tokens_processed: int

    @property
    def weight(self) -> int:
        return (self.end_block - self.start_block) * self.tokens_processed


def session_cost(delivered_tokens: int, price_base_units: int) -> int:
    if delivered_tokens < 0 or price_base_units < 0:
        raise ValueError("token counts and prices are non-negative")
    return delivered_tokens * price_base_units


def split(total: int, work: Sequence[Work]) -> list[int]:
    """Shares of ``total`` for each item of ``work``, in order; sum(shares) == total."""
    if total < 0:
        raise ValueError("cannot split a negative amount")
    weights = [w.weight for w in work]
    if any(x < 0 for x in weights):
        raise ValueError("work has a negative weight")
    weight_sum = sum(weights)
    if weight_sum == 0:
        if total:
            raise ValueError("a non-zero amount cannot be split over work that processed nothing")
        return [0] * len(work)
    shares = [total * x // weight_sum for x in weights]
    left = total - sum(shares)
    by_remainder = sorted(range(len(work)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares
