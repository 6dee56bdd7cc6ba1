"""Gateways, inference workers and the ledger, in this process, over a running swarm: what a client of the
OpenAI-compatible API talks to in the end-to-end tests (tests/e2e/test_openai_swarm.py, test_real_model.py)."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

from prometheus_client import CollectorRegistry

from consumers.inference import consumer as worker
from consumers.inference.generation import load_client
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from farmesh.kafka import messaging
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import money, topics
from tests.support.services import serve
from tests.support.swarm import Swarm


@contextlib.asynccontextmanager
async def openai_mesh(swarm: Swarm, kafka_bootstrap: str, database_url: str, db_pool, *, name: str,
                      workers: int = 2, gateways: int = 2, concurrency: int = 3, credit_far: int = 5,
                      **settings: object) -> AsyncIterator[tuple[list[str], accounts.IssuedKey, list]]:
    """(gateway URLs, a client's key with `credit_far`, the gateway apps); everything stopped on exit."""
    clients = [await asyncio.to_thread(load_client, swarm.model_dir, swarm.initial_peers, swarm.dht_prefix,
                                       request_timeout=10, max_retries=2) for _ in range(workers)]
    apps = []
    async with db_pool.acquire() as conn:
        issued = await accounts.create_client(conn, f"{name}-{uuid.uuid4().hex[:6]}",
                                              money.to_base_units(Decimal(credit_far)))
    try:
        async with contextlib.AsyncExitStack() as stack:
            await messaging.ensure_topics(kafka_bootstrap, messaging.mesh_topics(3))
            brokers = []
            for client in clients:  # the workers of the inference group, `concurrency` generations at once each
                b = messaging.create_broker(kafka_bootstrap, topics.GROUP_INFERENCE, CollectorRegistry())
                worker.register(b, client, swarm.dht_prefix, CollectorRegistry(),
                                reservations=PostgresReservations(db_pool), concurrency=concurrency)
                brokers.append(b)
            b = messaging.create_broker(kafka_bootstrap, topics.GROUP_LEDGER, CollectorRegistry())
            ledger.register(b, db_pool, CollectorRegistry())
            brokers.append(b)
            for b in brokers:
                await b.start()
                stack.push_async_callback(b.stop)
            urls = []
            for i in range(gateways):
                config = Settings(kafka_bootstrap=kafka_bootstrap, database_url=database_url,
                                  model=str(swarm.model_dir), initial_peers=swarm.initial_peers,
                                  dht_prefix=swarm.dht_prefix, gateway_id=f"{name}-{i}", **settings)
                app = create_app(config, route_check=lambda: asyncio.sleep(0, True))
                apps.append(app)
                urls.append(await stack.enter_async_context(serve(app)))
            yield urls, issued, apps
    finally:
        for client in clients:
            client.close()
