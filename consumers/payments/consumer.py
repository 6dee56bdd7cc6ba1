"""Consumer group `payments`: the work to pay, per ISO week, read from the sessions topic.

It consumes farmesh.sessions independently of the ledger and applies the ledger's rule
(farmesh/billing/acceptance.py): an outcome counts only if it matches its request's reservation, and the
first accepted outcome of a request_id wins (or the one the ledger already recorded). Both groups read each
partition in the same order and see each other's choice, so they pick the same outcome and the payments
group pays exactly the work the ledger credits. It uses the contributions embedded in that outcome, not the NodeContribution events:
those are also published for a losing rerun of a redelivered request, and are for analytics consumers.

Each consumer batch is written in one database transaction; offsets are committed after that commit.

The group is a FastStream `KafkaRouter` (`PaymentsRouter`): its subscriber on the sessions topic and the
publishers it declares for what it emits (the weekly `payments.batch_closed`, published by the scheduled close
through `batch_closed`; dead letters). The handler is a plain function; what it needs (its `PayableStore` port,
its metrics) `bind()` puts in the broker's context, where the handler's `Context(...)` parameters find it: no
closure holds them, so the unit tests bind in-memory fakes instead. A router belongs to one broker, so `bind()`
includes one of its own per broker and returns it (the service's close publishes through its `batch_closed`); the
module's `router` is the group as declared, which the AsyncAPI document (consumers/asyncapi.py) describes.
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
from schemas.events import PaymentBatchClosed

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


class PaymentsRouter(KafkaRouter):
    """The group: its subscriber on the sessions topic and its declared publishers."""

    def __init__(self) -> None:
        super().__init__()
        # A closed week's batch, keyed by its week (consumers/payments/schedule.py publishes it).
        self.batch_closed = self.publisher(
            topics.PAYMENTS.name, schema=PaymentBatchClosed, title=f"{topics.PAYMENTS.name}:{topics.GROUP_PAYMENTS}",
            description="A closed ISO week's payment batch, one line per wallet, keyed by the week",
        )
        self.dead_letters = messaging.declare_dead_letters(
            self, topics.GROUP_PAYMENTS,
            "Session records the payments group will not pay, with why",
        )
        self.subscriber(
            topics.SESSIONS.name, group_id=topics.GROUP_PAYMENTS, batch=True, max_records=MAX_RECORDS,
            auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
            title="payments", description="Records the payable work of each session by ISO week",
        )(record)


router = PaymentsRouter()  # the group as declared (the AsyncAPI document); bind() includes a router of its own


def bind(broker: KafkaBroker, store: PayableStore, registry: CollectorRegistry) -> PaymentsRouter:
    """The payments group on `broker`, on any `PayableStore`: a router of its own included, its dependencies in the
    broker's context. Returns that router (its publishers, `batch_closed` among them, are the broker's)."""
    group = PaymentsRouter()
    broker.context.set_global(STORE, store)
    broker.context.set_global(METRICS, Metrics(registry))
    broker.include_router(group)
    return group


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry) -> PaymentsRouter:
    """The payments group on `broker`, recording to `pool`'s database (the service's set-up, and the tests')."""
    return bind(broker, PostgresPayments(pool), registry)
