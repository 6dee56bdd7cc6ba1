"""`farmesh worker`: the inference group's service."""
from __future__ import annotations

import asyncio

import click

from farmesh.runtime.options import require_initial_peers, with_settings
from farmesh.runtime.settings import Settings
from farmesh.swarm.dht import check_swarm_addresses, swarm_options


@click.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9101, show_default=True, help="/metrics and /health")
@swarm_options
def worker(settings: Settings, metrics_host: str, metrics_port: int, host: str | None, announce_host: str | None,
           swarm_networks: str | None) -> None:
    """Consumer group `inference`: runs requests on the Petals swarm.

    Needs the database: it runs only requests that match the open reservation the gateway made for them, and it
    prefers routes through the nodes the registry knows as online.
    """
    require_initial_peers(settings)
    # Its Petals client listens on --host (a client dials out: nothing needs to reach it), inside the networks.
    check_swarm_addresses(host, announce_host, swarm_networks, settings.initial_peers)
    from consumers.inference.service import run_worker

    asyncio.run(run_worker(settings, metrics_host, metrics_port))
