"""`farmesh worker`: the inference group's service."""
from __future__ import annotations

import asyncio

import click

from farmesh.runtime.options import require_initial_peers, with_settings
from farmesh.runtime.settings import Settings


@click.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9101, show_default=True, help="/metrics and /health")
def worker(settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `inference`: runs requests on the Petals swarm.

    Needs the database: it runs only requests that match the open reservation the gateway made for them, and it
    prefers routes through the nodes the registry knows as online.
    """
    require_initial_peers(settings)
    from consumers.inference.service import run_worker

    asyncio.run(run_worker(settings, metrics_host, metrics_port))
