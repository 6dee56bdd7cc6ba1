"""Session events as the inference worker publishes them on farmesh.sessions: per request one outcome
(inference.completed, contributions inside, money exact) then one node.contribution per node span."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from schemas import money
from farmesh.billing.pricing import Work, fee_rate_units, settlement
from schemas.events import Contribution, InferenceCompleted, NodeContribution

PRICE = Decimal("0.0001")
FEE_RATE = Decimal("0.05")
PEERS = ("QmBenchNodeAlpha", "QmBenchNodeBeta", "QmBenchNodeGamma")
T0 = datetime(2025, 3, 3, 12, 0, tzinfo=timezone.utc)  # a past ISO week's Monday (2025-W10)


@dataclass(frozen=True)
class Record:
    """What the consumer gets from Kafka for one record (the fields the consumers read)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def session_events(i: int, account_id: uuid.UUID, prefix: str = "bench") -> list[InferenceCompleted | NodeContribution]:
    """Request `i`: 2 nodes (blocks 0:2, 2:4) like `farmesh up`, 1..64 tokens."""
    tokens = 1 + i % 64
    prompt_tokens = 6
    a, b = PEERS[i % 2], PEERS[2]
    work = [Work(a, 0, 2, prompt_tokens + tokens - 1), Work(b, 2, 4, prompt_tokens + tokens - 1)]
    moved = settlement(tokens, money.to_base_units(PRICE), fee_rate_units(FEE_RATE), work)
    contributions = [Contribution(contribution_id=uuid.uuid4(), peer_id=w.peer_id, start_block=w.start_block,
                                  end_block=w.end_block, tokens_processed=w.tokens_processed,
                                  earnings_far=money.to_far(share)) for w, share in zip(work, moved.shares)]
    started = T0 + timedelta(seconds=i)
    outcome = InferenceCompleted(
        request_id=f"{prefix}-{i}", model="farmesh-tiny", account_id=account_id, prompt_tokens=prompt_tokens,
        completion_tokens=tokens, completion="x" * tokens, price_per_token=PRICE, cost_far=money.to_far(moved.debit),
        platform_fee_rate=FEE_RATE, platform_fee_far=money.to_far(moved.fee), started_at=started,
        finished_at=started + timedelta(milliseconds=15 * tokens), worker="bench", contributions=contributions,
        finish_reason="length")
    return [outcome, *outcome.contribution_events()]


async def reserve_all(conn: Any, account_id: uuid.UUID, request_ids: list[str]) -> None:
    """The open reservation the gateway made for each request of `session_events` (64 tokens at PRICE, FEE_RATE):
    the consumers settle only what was reserved."""
    await conn.execute(
        "INSERT INTO far_reservations (request_id, account_id, model, max_tokens, price_per_token, platform_fee_rate, "
        "amount) SELECT r, $2, 'farmesh-tiny', 64, $3::numeric, $4::numeric, $3::numeric * 64 FROM unnest($1::text[]) AS r",
        request_ids, account_id, PRICE, FEE_RATE)


def wire(event: InferenceCompleted | NodeContribution) -> bytes:
    """The event's bytes on the topic (JSON, as messaging.publish sends it)."""
    return event.model_dump_json().encode()
