"""Consumer group `ledger`: sessions, contributions and their double-entry settlement.

Batches of session events are written in one database transaction (sessions, contributions, the
balanced postings that debit the client and credit the nodes and the platform fee, the reservations
closed); the Kafka offsets are committed only after that commit (a failed write rewinds the batch for
redelivery). Writes are keyed by event ids, so replaying the topic changes nothing. Outcomes whose money
does not add up, that name no client account, or that do not match the reservation the gateway made for their
request (its terms, the pricing rule's split) are dead-lettered with the reason (farmesh/billing/acceptance.py).

The group is a FastStream `KafkaRouter` (`LedgerRouter`): its subscriber on the sessions topic and the publisher
it declares for what it emits (dead letters). The handler is a plain function; what it needs (its `LedgerStore`
port, its metrics) `bind()` puts in the broker's context, where the handler's `Context(...)` parameters find it:
no closure holds them, so the unit tests bind in-memory fakes instead. A router belongs to one broker, so `bind()`
includes one of its own per broker and returns it (its publishers are that broker's); the module's `router` is
the group as declared, which the AsyncAPI document (consumers/asyncapi.py) describes.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import asyncpg
from faststream import Context
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.ledger.ports import LedgerStore
from consumers.ledger.repository import PostgresLedger
from farmesh.kafka import messaging
from farmesh.kafka.batches import outcomes_of
from schemas import topics
from schemas.events import Contribution

log = logging.getLogger(__name__)

MAX_RECORDS = 500  # records per consumer batch: one database transaction each
STORE, METRICS = "ledger_store", "ledger_metrics"  # the handler's dependencies in its broker's context


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


async def record(_: list[Any], message: KafkaMessage, broker: KafkaBroker = Context(),
                 store: LedgerStore = Context(STORE), metrics: Metrics = Context(METRICS)) -> None:
    """Settle a consumer batch through the store; dead-letter what it rejected (after the commit: a failed write
    sends nothing, and the redelivered batch is judged again)."""
    records, outcomes, sources = await outcomes_of(broker, topics.GROUP_LEDGER, message)
    settled = await store.settle(outcomes)
    for i, reason in settled.rejected.items():
        await messaging.send_dead_letter(broker, topics.GROUP_LEDGER, sources[i], f"not settled: {reason}")
    result = settled.recorded
    metrics.batch.observe(len(records))
    metrics.recorded.inc(result.sessions)
    metrics.contributions.inc(result.contributions)
    metrics.duplicates.inc(result.duplicates)
    metrics.rejected.inc(len(settled.rejected))
    metrics.settled.labels("settled").inc(result.settled)
    metrics.settled.labels("released").inc(result.released)
    metrics.count_node_work(result.credited)
    if result.duplicates:
        log.info("ignored %d outcome(s) of sessions already recorded", result.duplicates)


class LedgerRouter(KafkaRouter):
    """The group: its subscriber on the sessions topic and its declared publisher."""

    def __init__(self) -> None:
        super().__init__()
        self.dead_letters = messaging.declare_dead_letters(
            self, topics.GROUP_LEDGER,
            "Session records the ledger cannot settle, with why",
        )
        self.subscriber(
            topics.SESSIONS.name, group_id=topics.GROUP_LEDGER, batch=True, max_records=MAX_RECORDS,
            auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
            title="ledger", description="Records finished sessions and their contributions",
        )(record)


router = LedgerRouter()  # the group as declared (the AsyncAPI document); bind() includes a router of its own


def bind(broker: KafkaBroker, store: LedgerStore, registry: CollectorRegistry) -> LedgerRouter:
    """The ledger group on `broker`, on any `LedgerStore`: a router of its own included, its dependencies in the
    broker's context. Returns that router (its publishers are the broker's)."""
    group = LedgerRouter()
    broker.context.set_global(STORE, store)
    broker.context.set_global(METRICS, Metrics(registry))
    broker.include_router(group)
    return group


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry) -> LedgerRouter:
    """The ledger group on `broker`, writing to `pool`'s database (the service's set-up, and the tests')."""
    return bind(broker, PostgresLedger(pool), registry)
