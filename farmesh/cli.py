"""`farmesh` command line: every service, the local mesh and the operator tools.

Every setting comes from a FARMESH_* environment variable and can be overridden by the flag
of the same name (FARMESH_KAFKA_BOOTSTRAP <-> --kafka-bootstrap).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import warnings
from typing import Any, Callable

import click

from farmesh.settings import Settings

# Flags shared by the services; each maps onto a Settings field of the same name.
_SETTING_FLAGS = {
    "kafka_bootstrap": click.option("--kafka-bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers [FARMESH_KAFKA_BOOTSTRAP]"),
    "database_url": click.option("--database-url", metavar="URL", help="PostgreSQL URL [FARMESH_DATABASE_URL]"),
    "initial_peers": click.option("--initial-peers", metavar="MADDRS", help="Our DHT bootstrap multiaddrs, comma separated [FARMESH_INITIAL_PEERS]"),
    "model": click.option("--model", metavar="DIR", help="Model directory [FARMESH_MODEL]"),
    "dht_prefix": click.option("--dht-prefix", help="DHT prefix of the model's blocks [FARMESH_DHT_PREFIX]"),
    "price_per_token": click.option("--price-per-token", metavar="FAR", help="Price per generated token [FARMESH_PRICE_PER_TOKEN]"),
    "node_timeout": click.option("--node-timeout", metavar="SECONDS", help="A node not heard from this long is offline [FARMESH_NODE_TIMEOUT]"),
    "heartbeat_max_skew": click.option("--heartbeat-max-skew", metavar="SECONDS", help="Refuse heartbeats this far from their log time [FARMESH_HEARTBEAT_MAX_SKEW]"),
}


def with_settings(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named setting flags and pass a `settings` built from env + flags."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            overrides = {n: v for n, v in given.items() if v is not None}
            try:
                settings = Settings(**overrides)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from exc
            return fn(settings=settings, **kwargs)
        for name in reversed(names):
            wrapper = _SETTING_FLAGS[name](wrapper)
        return wrapper
    return decorate


def flags_to_subcommand(ctx: click.Context) -> None:
    """For a group that is also a service (`farmesh ledger`, `farmesh payments`): flags given before a
    subcommand (`farmesh payments --database-url URL close ...`) become that subcommand's defaults."""
    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if given and ctx.invoked_subcommand:
        defaults = dict(ctx.default_map or {})
        defaults[ctx.invoked_subcommand] = {**given, **(defaults.get(ctx.invoked_subcommand) or {})}
        ctx.default_map = defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", envvar="FARMESH_LOG_LEVEL", show_default=True)
def cli(log_level: str) -> None:
    """Far Mesh: pay-per-token distributed LLM inference."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix", "price_per_token")
@click.option("--host", default=None, help="Listen address [FARMESH_GATEWAY_HOST, 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Listen port [FARMESH_GATEWAY_PORT, 8000]")
def gateway(settings: Settings, host: str | None, port: int | None) -> None:
    """The HTTP gateway (SSE generation, sessions, health, metrics)."""
    from farmesh.services import run_gateway

    settings = settings.model_copy(update={k: v for k, v in (("gateway_host", host), ("gateway_port", port)) if v is not None})
    asyncio.run(run_gateway(settings))


@cli.command()
@with_settings("kafka_bootstrap", "database_url", "initial_peers", "model", "dht_prefix")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9101, show_default=True, help="/metrics and /health")
def worker(settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `inference`: runs requests on the Petals swarm.

    With a database it prefers routes through the nodes the registry knows as online.
    """
    from farmesh.services import run_worker

    asyncio.run(run_worker(settings, metrics_host, metrics_port))


@cli.group(invoke_without_command=True)
@with_settings("kafka_bootstrap", "database_url")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9102, show_default=True, help="/metrics and /health")
@click.pass_context
def ledger(ctx: click.Context, settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `ledger`: records sessions and contributions in PostgreSQL.

    Without a subcommand, runs the consumer service; `farmesh ledger audit` checks the money invariants.
    """
    if ctx.invoked_subcommand is not None:
        flags_to_subcommand(ctx)
        return
    from farmesh.services import run_ledger

    asyncio.run(run_ledger(settings, metrics_host, metrics_port))


@cli.group(invoke_without_command=True)
@with_settings("kafka_bootstrap", "database_url", "node_timeout", "heartbeat_max_skew")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9104, show_default=True, help="/metrics and /health")
@click.pass_context
def registry(ctx: click.Context, settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `registry`: verifies signed heartbeats, keeps far_nodes, times silent nodes out.

    Without a subcommand, runs the consumer service; `farmesh registry rebuild` replays the heartbeat topic.
    """
    if ctx.invoked_subcommand is not None:
        return
    from farmesh.services import run_registry

    asyncio.run(run_registry(settings, metrics_host, metrics_port))


@cli.group()
def docs() -> None:
    """Generated documentation."""


@docs.command("asyncapi")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
def asyncapi(fmt: str) -> None:
    """Print the AsyncAPI document of every topic and event (generated from schemas/)."""
    from schemas.asyncapi import document

    click.echo(document(fmt))


@cli.command()
@with_settings("kafka_bootstrap", "database_url", "model", "price_per_token")
@click.option("--gateway-port", type=int, default=None, help="Gateway port (default: FARMESH_GATEWAY_PORT, 8000; 0 = any free port)")
@click.option("--nodes", type=click.IntRange(1, 8), default=2, show_default=True, help="Petals nodes sharing the model's blocks")
def up(settings: Settings, gateway_port: int | None, nodes: int) -> None:
    """Run the whole mesh locally until Ctrl-C / SIGTERM."""
    from farmesh.local_mesh import run_up

    sys.exit(run_up(settings, gateway_port, nodes))


@cli.command()
@with_settings("kafka_bootstrap", "database_url", "model", "price_per_token")
@click.option("--gateway-port", type=int, default=0, show_default=True, help="0 = any free port")
@click.option("--nodes", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--prompt", default="Hello, how are you?", show_default=True)
@click.option("--max-tokens", type=int, default=100, show_default=True)
def demo(settings: Settings, gateway_port: int, nodes: int, prompt: str, max_tokens: int) -> None:
    """Start the local mesh, send the plan's request, print the stream and the ledger, stop."""
    from farmesh.local_mesh import run_demo

    sys.exit(run_demo(settings, gateway_port, nodes, prompt, max_tokens))


def _register() -> None:
    # Commands that live next to what they run.
    from db import migrate
    from farmesh import swarm, tiny_model

    cli.add_command(tiny_model.model_group)   # farmesh model tiny DIR
    cli.add_command(swarm.dht_command)        # farmesh dht
    cli.add_command(swarm.node_command)       # farmesh node
    cli.add_command(migrate.db_group)         # farmesh db migrate|rollback|status
    from consumers.registry.cli import rebuild_command

    registry.add_command(rebuild_command)     # farmesh registry rebuild
    # Money: accounts and keys, the ledger's audit, payments, analytics replay and reports.
    from consumers.ledger.cli import audit_command
    from consumers.payments.cli import payments_group
    from farmesh.keys import keys_group
    from farmesh.replay import replay_command
    from farmesh.reports import report_group

    ledger.add_command(audit_command)         # farmesh ledger audit
    cli.add_command(keys_group)               # farmesh keys create|list|revoke|credit
    cli.add_command(payments_group)           # farmesh payments [close|export|mark-paid]
    cli.add_command(replay_command)           # farmesh replay [--since] [--verify]
    cli.add_command(report_group)             # farmesh report usage --by model|node|day


def main() -> None:
    # hivemind forks after tokenizers may have started threads; their parallelism only adds a warning here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Models are local directories; never let transformers or the hub client reach out.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 4.33 warns about a torch API rename on import; it is the pinned pair, not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    _register()
    cli()


if __name__ == "__main__":
    main()
