"""Pricing and attribution: pure functions on integer base units (see schemas.money).

A session costs delivered tokens x price.  That amount is split across the nodes that did the
work, weighted by blocks served x tokens processed, so a node holding twice the blocks earns
twice as much for the same tokens.  The split is exact: shares always add up to the cost; the
few base units that integer division leaves over go to the largest remainders (ties: earlier
span first), which makes the result deterministic for replays.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence

from schemas import money
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


# ------------------------------------------------------------------------------------------- platform fee
#
# The fee is a fraction of the session's cost, fixed on the request (``platform_fee_rate``), expressed in
# units of 1e-18 (the same scale as FAR base units: 0.05 -> 5 * 10**16).  The rule, chosen so that no base
# unit is ever created or lost:
#
#     debit   = delivered tokens x price                       (what the client pays)
#     fee     = floor(debit x rate)                            (rounding favours the nodes)
#     credits = split(debit - fee, blocks x tokens)            (largest remainder, exact)
#     => sum(credits) + fee == debit, always.
#
# A session that charged something but has no recorded work to pay (cannot happen with a real swarm: a token
# delivered means some node processed it) gives the whole amount to the platform fee account rather than
# losing or inventing money.

FEE_RATE_SCALE = 10**18


@dataclass(frozen=True)
class Settlement:
    debit: int
    fee: int
    shares: list[int]

    @property
    def credits(self) -> int:
        return sum(self.shares)


def fee_rate_units(rate: Decimal | str | int) -> int:
    """A fee rate (a fraction of the cost, 0..1, at most 18 decimals) as an integer of 1e-18 units."""
    units = money.to_base_units(rate)  # same scale; refuses negatives and finer rates
    if units > FEE_RATE_SCALE:
        raise ValueError(f"a platform fee rate is a fraction between 0 and 1, got {rate}")
    return units


def platform_fee(debit: int, rate_units: int) -> int:
    if debit < 0:
        raise ValueError("cannot take a fee of a negative amount")
    if not 0 <= rate_units <= FEE_RATE_SCALE:
        raise ValueError("a platform fee rate is between 0 and 1")
    return debit * rate_units // FEE_RATE_SCALE


def settlement(delivered_tokens: int, price_base_units: int, rate_units: int, work: Sequence[Work]) -> Settlement:
    """What one session moves: the client's debit, the platform's fee and each work item's credit."""
    debit = session_cost(delivered_tokens, price_base_units)
    fee = platform_fee(debit, rate_units)
    if sum(w.weight for w in work) == 0:
        return Settlement(debit, debit, [0] * len(work))  # nobody to pay: nothing is lost, the platform keeps it
    return Settlement(debit, fee, split(debit - fee, work))


def reservation_amount(max_tokens: int, price_base_units: int) -> int:
    """What a request holds on the client's balance until it settles: the most it can cost."""
    return session_cost(max_tokens, price_base_units)
