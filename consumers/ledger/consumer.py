"""Consumer group `ledger`: sessions, contributions and their double-entry settlement.

Batches of session events are written in one database transaction (sessions, contributions, the
balanced postings that debit the client and credit the nodes and the platform fee, the reservations
closed); the Kafka offsets are committed only after that commit (a failed write rewinds the batch for
redelivery). Writes are keyed by event ids, so replaying the topic changes nothing. Outcomes whose money
does not add up, or that name no client account, are dead-lettered (consumers/ledger/rules.py).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import asyncpg
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.ledger.repository import record_outcomes
from db.views.acceptance import acceptance_facts
from farmesh.billing.acceptance import reasons_for
from farmesh.kafka.batches import outcomes_of
from farmesh.kafka import messaging
from schemas import topics
from schemas.events import Contribution

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.recorded = Counter("farmesh_ledger_sessions_recorded_total", "Sessions written", registry=registry)
        self.contributions = Counter("farmesh_ledger_contributions_recorded_total", "Contributions written", registry=registry)
        self.duplicates = Counter("farmesh_ledger_duplicate_outcomes_total", "Outcomes already recorded (redelivery/replay)", registry=registry)
        self.batch = Histogram("farmesh_ledger_batch_size", "Records per consumer batch", buckets=(1, 5, 20, 100, 500, 2000), registry=registry)
        self.settled = Counter("farmesh_ledger_settled_sessions_total", "Sessions settled (postings written)",
                               ["result"], registry=registry)
        self.rejected = Counter("farmesh_ledger_rejected_outcomes_total", "Outcomes dead-lettered (money or account)",
                                registry=registry)
        # Per node, only what the ledger newly settled (a duplicate or a replay adds nothing). FAR as a float is
        # fine for a graph; the exact amounts are the ledger's (far_ledger_entries).
        self.node_earnings = Counter("farmesh_node_earnings_far_total", "FAR credited to each node by settlements",
                                     ["peer_id"], registry=registry)
        self.node_tokens = Counter("farmesh_node_settled_tokens_total", "Tokens processed per node in settled sessions",
                                   ["peer_id"], registry=registry)

    def count_node_work(self, credited: Sequence[Contribution]) -> None:
        """Add the newly settled contributions to the per-node earnings and tokens."""
        for c in credited:
            self.node_earnings.labels(c.peer_id).inc(float(c.earnings_far))
            self.node_tokens.labels(c.peer_id).inc(c.tokens_processed)


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry, max_records: int = 500) -> None:
    metrics = Metrics(registry)

    @broker.subscriber(
        topics.SESSIONS.name, group_id=topics.GROUP_LEDGER, batch=True, max_records=max_records,
        auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
        title="ledger", description="Records finished sessions and their contributions",
    )
    async def record(_: list[Any], message: KafkaMessage) -> None:
        records, outcomes, sources = await outcomes_of(broker, topics.GROUP_LEDGER, message)
        async with pool.acquire() as conn:
            rejected = reasons_for(outcomes, *await acceptance_facts(conn, outcomes, "far_session_contributions", "event_id"))
            for i, reason in rejected.items():
                await messaging.send_dead_letter(broker, topics.GROUP_LEDGER, sources[i], f"not settled: {reason}")
            result = await record_outcomes(conn, [o for i, o in enumerate(outcomes) if i not in rejected])
        metrics.batch.observe(len(records))
        metrics.recorded.inc(result.sessions)
        metrics.contributions.inc(result.contributions)
        metrics.duplicates.inc(result.duplicates)
        metrics.rejected.inc(len(rejected))
        metrics.settled.labels("settled").inc(result.settled)
        metrics.settled.labels("released").inc(result.released)
        metrics.count_node_work(result.credited)
        if result.duplicates:
            log.info("ignored %d outcome(s) of sessions already recorded", result.duplicates)
