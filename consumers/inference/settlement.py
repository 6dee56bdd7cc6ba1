"""What a finished generation costs and whom it pays: the session outcome a worker publishes (pure)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence
from uuid import uuid4

from farmesh.billing.pricing import Work, fee_rate_units, settlement
from schemas import money
from schemas.events import (
    Contribution,
    FailReason,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    NodeContribution,
    SessionOutcome,
)


def settle(request: InferenceRequested, delivered: int, prompt_tokens: int, completion: str,
           spans: Sequence[Work], started_at: datetime, worker: str,
           finish_reason: str | None, error: str | None,
           reason: FailReason = "error") -> tuple[SessionOutcome, list[NodeContribution]]:
    """The session outcome and its contribution events; the money is computed here, exactly.

    The client's account (from the request) is debited delivered x price; the platform fee and the
    nodes' shares add up to that debit exactly (farmesh.billing.pricing.settlement).
    """
    money_moved = settlement(delivered, money.to_base_units(request.price_per_token),
                             fee_rate_units(request.platform_fee_rate), spans)
    cost, shares = money_moved.debit, money_moved.shares
    contributions = [
        Contribution(contribution_id=uuid4(), peer_id=w.peer_id, start_block=w.start_block, end_block=w.end_block,
                     tokens_processed=w.tokens_processed, earnings_far=money.to_far(share))
        for w, share in zip(spans, shares)
    ]
    common = dict(
        request_id=request.request_id, model=request.model, prompt_tokens=prompt_tokens,
        completion_tokens=delivered, completion=completion, price_per_token=request.price_per_token,
        cost_far=money.to_far(cost), started_at=started_at, finished_at=datetime.now(timezone.utc), worker=worker,
        contributions=contributions, account_id=request.account_id,
        platform_fee_rate=request.platform_fee_rate, platform_fee_far=money.to_far(money_moved.fee),
    )
    outcome: SessionOutcome
    if error is None:
        outcome = InferenceCompleted(finish_reason=finish_reason or "length", **common)
    else:
        outcome = InferenceFailed(error=error, reason=reason, **common)
    return outcome, outcome.contribution_events()
