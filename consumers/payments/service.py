"""`farmesh payments`: the payments group's process, with the weekly close on its schedule."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry

from farmesh.runtime.serving import run_database_consumer
from farmesh.runtime.settings import Settings
from schemas import topics

log = logging.getLogger(__name__)


async def run_payments(settings: Settings, host: str, port: int) -> None:
    """The payments group, and the weekly batch close on its schedule (consumers/payments/schedule.py).

    The group's router goes on the service's broker, its store on the service's pool (consumer.register;
    run_database_consumer gives the broker the DatabaseWait middleware first, so it covers the group's subscriber);
    the close publishes through the `batch_closed` publisher of the router register() included, i.e. on the same
    broker.
    """
    from consumers.payments import consumer
    from consumers.payments.repository import PostgresPayments
    from consumers.payments.schedule import WeeklyClose

    def register(broker: KafkaBroker, pool: asyncpg.Pool,
                 registry: CollectorRegistry) -> list[Callable[[], Awaitable[None]]]:
        group = consumer.register(broker, pool, registry)
        closer = WeeklyClose(PostgresPayments(pool), group.batch_closed, registry,
                             grace=settings.payments_close_grace, min_payout=settings.min_payout_base_units)
        return [closer.run]

    await run_database_consumer(settings, host, port, topics.GROUP_PAYMENTS, topics.SESSIONS.name, register)
