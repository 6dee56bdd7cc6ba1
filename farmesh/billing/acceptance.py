"""Which session outcomes count: the one rule the ledger, the payments group and a replay all apply.

An outcome is accepted when its money adds up exactly and it names a known client account; then the
first accepted outcome of a request_id wins (later ones: a redelivered request that ran again, or the
same event delivered again, are ignored). Every consumer reads the sessions topic partition by
partition in the same order, so each of them picks the same winner: the payments group pays exactly
the work the ledger credits, and a replay rebuilds the same projections.
"""
from __future__ import annotations

from typing import Sequence
from uuid import UUID



from schemas import money
from farmesh.billing.pricing import Work, fee_rate_units, platform_fee, session_cost
from schemas.events import SessionOutcome


def money_problem(o: SessionOutcome) -> str | None:
    """Why an outcome's amounts do not add up (None when they do)."""
    try:
        price = money.to_base_units(o.price_per_token)
        cost = money.to_base_units(o.cost_far)
        fee = money.to_base_units(o.platform_fee_far)
        rate = fee_rate_units(o.platform_fee_rate)
        earnings = [money.to_base_units(c.earnings_far) for c in o.contributions]
    except ValueError as exc:
        return f"amount not exact: {exc}"
    if cost != session_cost(o.completion_tokens, price):
        return f"cost {o.cost_far} != {o.completion_tokens} tokens x {o.price_per_token}"
    work = [Work(c.peer_id, c.start_block, c.end_block, c.tokens_processed) for c in o.contributions]
    expected_fee = cost if sum(w.weight for w in work) == 0 else platform_fee(cost, rate)
    if fee != expected_fee:
        return f"platform fee {o.platform_fee_far} != floor({o.cost_far} x {o.platform_fee_rate})"
    if sum(earnings) + fee != cost:
        return f"earnings {money.text(money.to_far(sum(earnings)))} + fee {o.platform_fee_far} != cost {o.cost_far}"
    if any(c.end_block <= c.start_block for c in o.contributions):
        return "a contribution's end_block is not after its start_block"
    if len({c.contribution_id for c in o.contributions}) != len(o.contributions):
        return "two contributions share an id"
    if len({(c.peer_id, c.start_block, c.end_block) for c in o.contributions}) != len(o.contributions):
        return "two contributions of one peer over the same blocks"
    return None


def contribution_conflict(o: SessionOutcome, owners: dict[UUID, str]) -> str | None:
    """A contribution id that already belongs to another request; else records the outcome's ids in `owners`."""
    for c in o.contributions:
        owner = owners.get(c.contribution_id)
        if owner is not None and owner != o.request_id:
            return f"contribution {c.contribution_id} already belongs to request {owner}"
    owners.update({c.contribution_id: o.request_id for c in o.contributions})
    return None


def reasons_for(outcomes: Sequence[SessionOutcome], clients: set[UUID], owners: dict[UUID, str]) -> dict[int, str]:
    """index -> why each rejected outcome must not be recorded (the consumers dead-letter those)."""
    reasons: dict[int, str] = {}
    for i, o in enumerate(outcomes):
        problem = money_problem(o)
        if problem is None and o.account_id not in clients:
            problem = f"unknown client account {o.account_id}"
        if problem is None:
            problem = contribution_conflict(o, owners)
        if problem is not None:
            reasons[i] = problem
    return reasons


