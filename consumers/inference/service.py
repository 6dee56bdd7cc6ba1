"""`farmesh worker`: the inference group's process (Petals client, subscribers, /metrics, /health).

It needs the database: a request runs only if it matches the open reservation the gateway made for it
(consumers/inference/ports.py), and that is read from far_reservations. Without FARMESH_DATABASE_URL the worker
refuses to start (one error line) rather than run whatever the requests topic carries; the same database gives
it the registry's online nodes to route through.
"""
from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client import CollectorRegistry

from farmesh.kafka import messaging
from farmesh.runtime.serving import DatabaseWait, consumer_app, serve
from farmesh.runtime.settings import Settings
from schemas import topics

if TYPE_CHECKING:
    from consumers.inference.generation import MeshClient


async def run_worker(settings: Settings, host: str, port: int) -> None:
    from consumers.inference.generation import load_client

    settings.require_database_url()  # before anything slow: no reservations to check, no worker
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

    from consumers.inference.repository import PostgresReservations
    from consumers.inference.routing import RoutePreference, keep_preferring_registered

    registry = CollectorRegistry()
    broker = messaging.create_broker(settings.kafka_bootstrap, topics.GROUP_INFERENCE, registry)
    # One reservation lookup per request (each of `concurrency` generations at a time), plus the route refresh.
    pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1,
                                     max_size=max(2, settings.worker_concurrency + 1))
    # A request whose reservation cannot be read (the database is away) waits for the database, then is rewound
    # and read again: not refused, not run unchecked, and no retry storm (added before the group: it covers it).
    broker.add_middleware(partial(DatabaseWait, pool=pool))
    worker.register(broker, client, settings.model_name, registry, reservations=PostgresReservations(pool),
                    concurrency=settings.worker_concurrency, fetch_wait_ms=settings.latency_fetch_wait_ms)
    # Prefer routes through the nodes the registry knows as online (they are the ones that get paid).
    preference = RoutePreference(client.model.transformer.h.sequence_manager)
    preferring = asyncio.create_task(
        keep_preferring_registered(pool, settings.model_name, preference, settings.route_refresh))
    try:
        await serve(consumer_app(broker, registry, settings, topics.GROUP_INFERENCE, topics.REQUESTS.name),
                     host, port, "worker")
    finally:
        preferring.cancel()
        await pool.close()
