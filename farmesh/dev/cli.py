"""`farmesh up` and `farmesh demo`: the whole mesh on this machine, on embedded defaults."""
from __future__ import annotations

import sys

import click

from farmesh.runtime.options import with_settings
from farmesh.runtime.settings import Settings


@click.command()
@with_settings("kafka_bootstrap", "broker", "database_url", "model", "dht_prefix", "price_per_token")
@click.option("--gateway-port", type=int, default=None, help="Gateway port (default: FARMESH_GATEWAY_PORT, 8000; 0 = any free port)")
@click.option("--nodes", type=click.IntRange(1, 8), default=2, show_default=True, help="Petals nodes sharing the model's blocks")
def up(settings: Settings, gateway_port: int | None, nodes: int) -> None:
    """Run the whole mesh locally until Ctrl-C / SIGTERM.

    --model: smollm2 (default: SmolLM2-135M-Instruct, imported from its package once), tiny (the random
    4-block model) or a Hugging Face Llama directory.
    """
    from farmesh.dev.local_mesh import run_up

    sys.exit(run_up(settings, gateway_port, nodes))


@click.command()
@with_settings("kafka_bootstrap", "broker", "database_url", "model", "dht_prefix", "price_per_token")
@click.option("--gateway-port", type=int, default=0, show_default=True, help="0 = any free port")
@click.option("--nodes", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--prompt", default="Hello, how are you?", show_default=True)
@click.option("--max-tokens", type=int, default=100, show_default=True)
@click.option("--question", default="What is the capital of France?", show_default=True,
              help="Asked through the OpenAI-compatible API after the native request")
def demo(settings: Settings, gateway_port: int, nodes: int, prompt: str, max_tokens: int, question: str) -> None:
    """Start the local mesh, send the plan's request, print the stream and the ledger, stop.

    --model: smollm2 (default), tiny or a Hugging Face Llama directory, as for `farmesh up`.
    """
    from farmesh.dev.local_mesh import run_demo

    sys.exit(run_demo(settings, gateway_port, nodes, prompt, max_tokens, question))
