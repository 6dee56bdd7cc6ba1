"""`farmesh ledger`: the ledger group's process."""
from __future__ import annotations

import logging

import asyncpg
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry

from farmesh.runtime.serving import run_database_consumer
from farmesh.runtime.settings import Settings
from schemas import topics

log = logging.getLogger(__name__)


async def run_ledger(settings: Settings, host: str, port: int) -> None:
    """The ledger group's router on the service's broker, its store on the service's pool (consumer.register);
    run_database_consumer gives the broker the DatabaseWait middleware first, so it covers the group's subscriber."""
    from consumers.ledger import consumer

    def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry) -> None:
        consumer.register(broker, pool, registry)  # the group's router: nothing of it runs beside the subscriber

    await run_database_consumer(settings, host, port, topics.GROUP_LEDGER, topics.SESSIONS.name, register)
