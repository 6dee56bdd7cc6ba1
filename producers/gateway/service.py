"""`farmesh gateway`: the gateway's process (FastAPI app, swarm view of the DHT)."""
from __future__ import annotations

import asyncio
import logging


from farmesh.kafka import messaging
from farmesh.runtime.serving import serve
from farmesh.runtime.settings import Settings

log = logging.getLogger(__name__)


async def run_gateway(settings: Settings) -> None:
    from farmesh.swarm.view import SwarmView, num_blocks_of
    from producers.gateway.app import create_app

    await messaging.ensure_topics(settings.kafka_bootstrap, messaging.mesh_topics(settings.topic_partitions))
    view = await asyncio.to_thread(SwarmView, settings.initial_peers, settings.dht_prefix, num_blocks_of(settings.model_dir))
    try:
        app = create_app(settings, route_check=lambda: asyncio.to_thread(view.full_route),
                         live_coverage=lambda: asyncio.to_thread(view.coverage))
        await serve(app, settings.gateway_host, settings.gateway_port, "gateway")
    finally:
        view.shutdown()
