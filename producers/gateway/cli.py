"""`farmesh gateway`: the HTTP gateway's service."""
from __future__ import annotations

import asyncio

import click

from farmesh.runtime.options import require_initial_peers, with_settings
from farmesh.runtime.settings import Settings


@click.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix", "price_per_token")
@click.option("--host", default=None, help="Listen address [FARMESH_GATEWAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [FARMESH_GATEWAY_PORT, 8000]")
def gateway(settings: Settings, host: str | None, port: int | None) -> None:
    """The HTTP gateway (SSE generation, sessions, health, metrics)."""
    require_initial_peers(settings)
    settings.require_database_url()  # its accounts and sessions; checked before it joins the swarm
    from producers.gateway.service import run_gateway

    settings = settings.model_copy(update={k: v for k, v in (("gateway_host", host), ("gateway_port", port)) if v is not None})
    asyncio.run(run_gateway(settings))
