"""Consumer group `payments`: the work to pay, per ISO week, read from the sessions topic.

It consumes farmesh.sessions independently of the ledger and applies the ledger's rule
(farmesh/billing/acceptance.py): the first accepted outcome of a request_id wins. Both groups read each
partition in the same order, so they pick the same outcome and the payments group pays exactly the work
the ledger credits. It uses the contributions embedded in that outcome, not the NodeContribution events:
those are also published for a losing rerun of a redelivered request, and are for analytics consumers.

Each consumer batch is written in one database transaction; offsets are committed after that commit.

The group is one FastStream `KafkaRouter`, declared at import: its subscriber on the sessions topic and the
publishers of what it emits (the weekly `payments.batch_closed`, published by the scheduled close through
`batch_closed`; dead letters). A service includes it into its broker with `bind()`, which puts the handler's
dependencies (its `PayableStore` port, its metrics) in that broker's context, where the handler's `Context(...)`
parameters find them: no closure holds them, so the unit tests bind in-memory fakes instead.
"""
from __future__ import annotations

import logging
from typing import Any

import asyncpg
from faststream import Context
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.payments.ports import PayableStore
from consumers.payments.repository import PostgresPayments
from farmesh.kafka import messaging
from farmesh.kafka.batches import outcomes_of
from schemas import topics
from schemas.events import DeadLetter, PaymentBatchClosed

log = logging.getLogger(__name__)

MAX_RECORDS = 500  # records per consumer batch: one database transaction each
STORE, METRICS = "payments_store", "payments_metrics"  # the handler's dependencies in its broker's context


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


router = KafkaRouter()

# What the group emits. A closed week's batch, keyed by its week (consumers/payments/schedule.py publishes it).
batch_closed = router.publisher(
    topics.PAYMENTS.name, schema=PaymentBatchClosed, title=f"{topics.PAYMENTS.name}:{topics.GROUP_PAYMENTS}",
    description="A closed ISO week's payment batch, one line per wallet, keyed by the week",
)
# Dead letters are sent by farmesh.kafka.messaging.send_dead_letter (it counts them in the service's registry), to
# this topic; declared so the group's contract names it and tests can watch it (.mock).
dead_letters = router.publisher(
    topics.DEAD_LETTER.name, schema=DeadLetter, title=f"{topics.DEAD_LETTER.name}:{topics.GROUP_PAYMENTS}",
    description="Session records the payments group will not pay, with why",
)


@router.subscriber(
    topics.SESSIONS.name, group_id=topics.GROUP_PAYMENTS, batch=True, max_records=MAX_RECORDS,
    auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
    title="payments", description="Records the payable work of each session by ISO week",
)
async def record(_: list[Any], message: KafkaMessage, broker: KafkaBroker = Context(),
                 store: PayableStore = Context(STORE), metrics: Metrics = Context(METRICS)) -> None:
    """Record a consumer batch's payable work through the store; dead-letter what it rejected (after the commit: a
    failed write sends nothing, and the redelivered batch is judged again)."""
    records, outcomes, sources = await outcomes_of(broker, topics.GROUP_PAYMENTS, message)
    payable = await store.record_payable(outcomes)
    for i, reason in payable.rejected.items():
        await messaging.send_dead_letter(broker, topics.GROUP_PAYMENTS, sources[i], f"not payable: {reason}")
    result = payable.recorded
    metrics.batch.observe(len(records))
    metrics.sessions.inc(result.sessions)
    metrics.items.inc(result.items)
    metrics.duplicates.inc(result.duplicates)
    metrics.rejected.inc(len(payable.rejected))


def bind(broker: KafkaBroker, store: PayableStore, registry: CollectorRegistry) -> None:
    """The payments group on `broker`: its dependencies in the broker's context, its router included.

    The router is the module's: a process serves one payments broker at a time (including it elsewhere moves it).
    """
    broker.context.set_global(STORE, store)
    broker.context.set_global(METRICS, Metrics(registry))
    broker.include_router(router)


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry) -> None:
    """The payments group on `broker`, recording to `pool`'s database (the service's set-up, and the tests')."""
    bind(broker, PostgresPayments(pool), registry)
