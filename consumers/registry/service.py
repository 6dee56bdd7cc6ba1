"""`farmesh registry`: the registry group's process, with the sweeper that times silent nodes out."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
from prometheus_client import CollectorRegistry

from farmesh.runtime.serving import run_database_consumer
from farmesh.runtime.settings import Settings
from schemas import topics

log = logging.getLogger(__name__)


async def run_registry(settings: Settings, host: str, port: int) -> None:
    """The registry group, and the sweeper that times out silent nodes."""
    from consumers.registry import consumer
    from consumers.registry.sweeper import Sweeper

    def register(broker, pool: asyncpg.Pool, registry: CollectorRegistry) -> list[Callable[[], Awaitable[None]]]:
        group = consumer.register(broker, pool, registry, max_skew=settings.heartbeat_max_skew)
        return [Sweeper(group.decisions, group.store, settings.node_timeout, metrics=group.metrics).run]

    await run_database_consumer(settings, host, port, topics.GROUP_REGISTRY, topics.HEARTBEATS.name, register)
