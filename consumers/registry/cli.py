"""The registry group's commands: `farmesh registry` (the consumer service) and `farmesh registry rebuild` (the
node registry rebuilt from the heartbeat topic alone)."""
from __future__ import annotations

import asyncio

import asyncpg
import click

from farmesh.runtime.options import CONNECT_TIMEOUT, with_settings
from farmesh.runtime.settings import Settings
from schemas import topics


@click.command("rebuild")
@click.option("--database-url", required=True, metavar="URL",
              help="An empty database to rebuild into (migrated first); never the live one.")
@click.option("--kafka-bootstrap", envvar="FARMESH_KAFKA_BOOTSTRAP", default=None, metavar="HOST:PORT",
              help="Kafka bootstrap servers [FARMESH_KAFKA_BOOTSTRAP]")
@click.option("--until-group", default=None, metavar="GROUP",
              help="Stop where this consumer group's committed offsets are (e.g. `registry`, stopped), so the "
                   "result can be compared with its table; default: the end of the topic now.")
def rebuild_command(database_url: str, kafka_bootstrap: str | None, until_group: str | None) -> None:
    """Replay the heartbeat topic from the beginning into an empty registry (same rules, publishes nothing)."""
    settings = Settings(**({"kafka_bootstrap": kafka_bootstrap} if kafka_bootstrap else {}))
    counts = asyncio.run(_rebuild(settings, database_url, until_group))
    click.echo(f"rebuilt {counts['nodes']} nodes and {counts['changes']} state changes from {counts['read']} "
               f"records ({counts['refused']} refused)")


async def _rebuild(settings: Settings, database_url: str, until_group: str | None) -> dict[str, int]:
    from consumers.registry.rebuild import committed_offsets, rebuild
    from db.migrate import migrate

    await migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, timeout=CONNECT_TIMEOUT)
    try:
        if await pool.fetchval("SELECT count(*) FROM far_nodes"):
            raise click.ClickException("far_nodes is not empty: rebuild into an empty database")
        until = await committed_offsets(settings.kafka_bootstrap, until_group) if until_group else None
        counts = await rebuild(settings.kafka_bootstrap, pool, topic=topics.HEARTBEATS.name, until=until,
                               max_skew=settings.heartbeat_max_skew)
        counts["nodes"] = await pool.fetchval("SELECT count(*) FROM far_nodes")
        counts["changes"] = await pool.fetchval("SELECT count(*) FROM far_node_state_changes")
        return counts
    finally:
        await pool.close()


@click.group("registry", invoke_without_command=True)
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
    from consumers.registry.service import run_registry

    asyncio.run(run_registry(settings, metrics_host, metrics_port))


registry.add_command(rebuild_command)
