"""`farmesh gateway`: the HTTP gateway's service."""
from __future__ import annotations

import asyncio

import click

from farmesh.runtime.options import require_initial_peers, with_settings
from farmesh.runtime.settings import Settings
from farmesh.swarm import petals_compat
from farmesh.swarm.dht import check_swarm_addresses


@click.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix", "price_per_token")
@click.option("--host", default=None, help="Listen address [FARMESH_GATEWAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [FARMESH_GATEWAY_PORT, 8000]")
@click.option("--swarm-host", envvar=petals_compat.SWARM_HOST_ENV, default=None,
              help=f"IP address its swarm view (a DHT client) listens on [{petals_compat.SWARM_HOST_ENV}, 127.0.0.1]")
@click.option("--swarm-networks", envvar=petals_compat.SWARM_NETWORKS_ENV, default=None,
              help=f"CIDRs where libp2p may listen and dial [{petals_compat.SWARM_NETWORKS_ENV}, loopback]")
def gateway(settings: Settings, host: str | None, port: int | None, swarm_host: str | None,
            swarm_networks: str | None) -> None:
    """The HTTP gateway (SSE generation, sessions, heartbeat ingress, discovery, health, metrics)."""
    require_initial_peers(settings)
    settings.require_database_url()  # its accounts and sessions; checked before it joins the swarm
    check_swarm_addresses(swarm_host, None, swarm_networks, settings.initial_peers)
    from producers.gateway.service import run_gateway

    settings = settings.model_copy(update={k: v for k, v in (("gateway_host", host), ("gateway_port", port)) if v is not None})
    asyncio.run(run_gateway(settings))
