"""The registry group's commands: `farmesh registry` (the consumer service), `farmesh registry rebuild` (the
node registry rebuilt from the heartbeat topic alone) and `farmesh registry key` (the key that signs its time-out
decisions, to pin or back up)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
import click

from farmesh.runtime.options import CONNECT_TIMEOUT, with_settings
from farmesh.runtime.settings import Settings
from schemas import topics

if TYPE_CHECKING:
    from consumers.registry.decisions import TrustedKeys


@click.command("rebuild")
@click.option("--database-url", required=True, metavar="URL",
              help="An empty database to rebuild into (migrated first); never the live one.")
@with_settings("kafka_bootstrap", "heartbeat_max_skew", "registry_key", "registry_public_keys")
@click.option("--until-group", default=None, metavar="GROUP",
              help="Stop where this consumer group's committed offsets are (e.g. `registry`, stopped), so the "
                   "result can be compared with its table; default: the end of the topic now.")
def rebuild_command(settings: Settings, database_url: str, until_group: str | None) -> None:
    """Replay the heartbeat topic from the beginning into an empty registry (same rules, publishes nothing).

    Time-out decisions are verified with the live registry's key: its key file (FARMESH_REGISTRY_KEY, read only,
    never created) or its pinned public keys (FARMESH_REGISTRY_PUBLIC_KEYS)."""
    from consumers.registry.decisions import registry_keys

    _, trusted = registry_keys(settings.registry_key_path, settings.registry_public_keys, signing=False)
    counts = asyncio.run(_rebuild(settings, database_url, until_group, trusted))
    click.echo(f"rebuilt {counts['nodes']} nodes and {counts['changes']} state changes from {counts['read']} "
               f"records ({counts['refused']} refused)")


async def _rebuild(settings: Settings, database_url: str, until_group: str | None, trusted: TrustedKeys) -> dict[str, int]:
    from consumers.registry.rebuild import committed_offsets, rebuild
    from db.migrate import migrate

    await migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, timeout=CONNECT_TIMEOUT)
    try:
        if await pool.fetchval("SELECT count(*) FROM far_nodes"):
            raise click.ClickException("far_nodes is not empty: rebuild into an empty database")
        until = await committed_offsets(settings.kafka_bootstrap, until_group) if until_group else None
        counts = await rebuild(settings.kafka_bootstrap, pool, trusted=trusted, topic=topics.HEARTBEATS.name,
                               until=until, max_skew=settings.heartbeat_max_skew)
        counts["nodes"] = await pool.fetchval("SELECT count(*) FROM far_nodes")
        counts["changes"] = await pool.fetchval("SELECT count(*) FROM far_node_state_changes")
        return counts
    finally:
        await pool.close()


@click.command("key")
@with_settings("registry_key")
def key_command(settings: Settings) -> None:
    """Print the registry key's id and public key (what FARMESH_REGISTRY_PUBLIC_KEYS pins); creates the key file
    first if there is none, as the registry's first start would."""
    from consumers.registry.decisions import registry_keys

    path = settings.registry_key_path
    created = not path.exists()
    key, _ = registry_keys(path, [], signing=True)
    assert key is not None
    click.echo(f"registry key {path}{' (created)' if created else ''} key_id={key.key_id} "
               f"public_key={key.public_key_text}")


@click.group("registry", invoke_without_command=True)
@with_settings("kafka_bootstrap", "database_url", "node_timeout", "heartbeat_max_skew", "registry_key",
               "registry_public_keys")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9104, show_default=True, help="/metrics and /health")
@click.pass_context
def registry(ctx: click.Context, settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `registry`: verifies signed heartbeats, keeps far_nodes, times silent nodes out.

    Without a subcommand, runs the consumer service (its time-out decisions signed with FARMESH_REGISTRY_KEY,
    created on first start); `farmesh registry rebuild` replays the heartbeat topic; `farmesh registry key` prints
    the key's public half.
    """
    if ctx.invoked_subcommand is not None:
        return
    from consumers.registry.service import run_registry

    asyncio.run(run_registry(settings, metrics_host, metrics_port))


registry.add_command(rebuild_command)
registry.add_command(key_command)
