"""`farmesh worker`: the inference group's process (Petals client, subscribers, /metrics, /health)."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client import CollectorRegistry

from farmesh.kafka import messaging
from farmesh.runtime.serving import consumer_app, serve
from farmesh.runtime.settings import Settings
from schemas import topics

if TYPE_CHECKING:
    from consumers.inference.generation import MeshClient

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, host: str, port: int) -> None:
    from consumers.inference.generation import load_client

    await messaging.ensure_topics(settings.kafka_bootstrap, messaging.mesh_topics(settings.topic_partitions))
    client = await asyncio.to_thread(
        load_client, settings.model_dir, settings.initial_peers, settings.dht_prefix,
        request_timeout=settings.request_timeout, max_retries=settings.max_retries,
    )
    try:
        await _serve_with(client, settings, host, port)
    finally:
        client.close()  # its DHT and p2pd handle; left to the garbage collector at exit they fail noisily


async def _serve_with(client: MeshClient, settings: Settings, host: str, port: int) -> None:
    from consumers.inference import consumer as worker

    registry = CollectorRegistry()
    broker = messaging.create_broker(settings.kafka_bootstrap, topics.GROUP_INFERENCE, registry)
    worker.register(broker, client, settings.model_name, registry, concurrency=settings.worker_concurrency,
                    fetch_wait_ms=settings.latency_fetch_wait_ms)
    # Prefer routes through the nodes the registry knows as online (they are the ones that get paid).
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) if settings.database_url else None
    preferring = None
    if pool is not None:
        from consumers.inference.routing import (
            RoutePreference,
            keep_preferring_registered,
        )

        preference = RoutePreference(client.model.transformer.h.sequence_manager)
        preferring = asyncio.create_task(
            keep_preferring_registered(pool, settings.model_name, preference, settings.route_refresh))
    else:
        log.warning("FARMESH_DATABASE_URL is not set: routes ignore the node registry")
    try:
        await serve(consumer_app(broker, registry, settings, topics.GROUP_INFERENCE, topics.REQUESTS.name),
                     host, port, "worker")
    finally:
        if preferring is not None:
            preferring.cancel()
        if pool is not None:
            await pool.close()
