"""Consumer group `payments`: the work to pay, per ISO week, read from the sessions topic.

It consumes farmesh.sessions independently of the ledger and applies the ledger's rule
(consumers/ledger/rules.py): the first accepted outcome of a request_id wins. Both groups read each
partition in the same order, so they pick the same outcome and the payments group pays exactly the work
the ledger credits. It uses the contributions embedded in that outcome, not the NodeContribution events:
those are also published for a losing rerun of a redelivered request, and are for analytics consumers.

Each consumer batch is written in one database transaction; offsets are committed after that commit.
"""
from __future__ import annotations

import logging
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram

from db.views.acceptance import acceptance_facts
from farmesh.billing.acceptance import reasons_for
from farmesh.kafka.batches import outcomes_of
from consumers.payments.repository import record_payable
from farmesh.kafka import messaging
from schemas import topics

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions = Counter("farmesh_payments_sessions_recorded_total", "Sessions whose work is payable", registry=registry)
        self.items = Counter("farmesh_payments_items_recorded_total", "Payable contributions recorded", registry=registry)
        self.duplicates = Counter("farmesh_payments_duplicate_outcomes_total", "Outcomes of requests already recorded",
                                  registry=registry)
        self.rejected = Counter("farmesh_payments_rejected_outcomes_total", "Outcomes not paid (rejected by the ledger rule)",
                                registry=registry)
        self.batch = Histogram("farmesh_payments_batch_size", "Records per consumer batch",
                               buckets=(1, 5, 20, 100, 500, 2000), registry=registry)


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry, max_records: int = 500) -> None:
    metrics = Metrics(registry)

    @broker.subscriber(
        topics.SESSIONS.name, group_id=topics.GROUP_PAYMENTS, batch=True, max_records=max_records,
        auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
        title="payments", description="Records the payable work of each session by ISO week",
    )
    async def record(_: list[Any], message: KafkaMessage) -> None:
        records, outcomes, sources = await outcomes_of(broker, topics.GROUP_PAYMENTS, message)
        async with pool.acquire() as conn:
            rejected = reasons_for(outcomes, *await acceptance_facts(conn, outcomes, "far_payment_items", "contribution_id"))
            for i, reason in rejected.items():
                await messaging.send_dead_letter(broker, topics.GROUP_PAYMENTS, sources[i], f"not payable: {reason}")
            result = await record_payable(conn, [o for i, o in enumerate(outcomes) if i not in rejected])
        metrics.batch.observe(len(records))
        metrics.sessions.inc(result.sessions)
        metrics.items.inc(result.items)
        metrics.duplicates.inc(result.duplicates)
        metrics.rejected.inc(len(rejected))
