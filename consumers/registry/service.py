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
    """The registry group, and the sweeper that times out silent nodes (its decisions signed with the registry's
    key, FARMESH_REGISTRY_KEY, created on first start)."""
    from consumers.registry import consumer
    from consumers.registry.decisions import registry_keys
    from consumers.registry.sweeper import Sweeper

    created = not settings.registry_key_path.exists()
    key, trusted = registry_keys(settings.registry_key_path, settings.registry_public_keys, signing=True)
    assert key is not None
    log.info("registry key %s %s (id %s, public key %s; pin it with FARMESH_REGISTRY_PUBLIC_KEYS)",
             settings.registry_key_path, "created" if created else "loaded", key.key_id, key.public_key_text)

    def register(broker, pool: asyncpg.Pool, registry: CollectorRegistry) -> list[Callable[[], Awaitable[None]]]:
        group = consumer.register(broker, pool, registry, key=key, trusted=trusted,
                                  max_skew=settings.heartbeat_max_skew)
        return [Sweeper(group.decisions, group.store, settings.node_timeout, metrics=group.metrics, key=key).run]

    await run_database_consumer(settings, host, port, topics.GROUP_REGISTRY, topics.HEARTBEATS.name, register)
