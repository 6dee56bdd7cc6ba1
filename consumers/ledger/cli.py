"""The ledger group's commands: `farmesh ledger` (the consumer service) and `farmesh ledger audit`, and the
operator tools that read the ledger: `farmesh replay [--verify]` and `farmesh report usage`.

Failures (database or broker unreachable, schema missing) are shown by the root command's one error mapping.
"""
from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import click

from consumers.ledger.audit import run_audit
from consumers.ledger.replay import SCHEMA, Replayed, replay
from consumers.ledger.replay_verify import verify
from consumers.ledger.reports import QUERIES, render, usage
from farmesh.runtime.options import connection, flags_to_subcommand, parse_time, with_settings
from farmesh.runtime.settings import Settings
from schemas import topics


@click.group("ledger", invoke_without_command=True)
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
    from consumers.ledger.service import run_ledger

    asyncio.run(run_ledger(settings, metrics_host, metrics_port))


@click.command("audit")
@with_settings("database_url")
def audit_command(settings: Settings) -> None:
    """Check every money invariant (balanced postings, settlements, node credits, balances,
    reservations, payment batches); print each break and exit non-zero on any."""
    checks, breaks = asyncio.run(run_audit(settings.require_database_url()))
    for b in breaks:
        click.echo(str(b))
    failed = {b.check for b in breaks}
    for check in checks:
        click.echo(f"{'FAIL' if check in failed else 'ok  '} {check}")
    click.echo(f"audit: {len(breaks)} break(s) in {len(checks)} checks")
    if breaks:
        raise SystemExit(1)


async def _replay(settings: Settings, since: datetime | None, check: bool) -> tuple[Replayed, list[str]]:
    url = settings.require_database_url()
    state = await replay(url, settings.kafka_bootstrap, since)
    if not check:
        return state, []
    async with connection(settings) as conn:
        return state, await verify(conn, since)


REJECTED_SHOWN = 50  # rejected records printed by `farmesh replay`


@click.command("replay")
@with_settings("kafka_bootstrap", "database_url")
@click.option("--since", default=None, metavar="TIME", help="Start at the log offsets of this time (ISO 8601, UTC if no zone)")
@click.option("--verify", "check", is_flag=True, help="Compare with the live ledger; exit 1 on any difference")
def replay_command(settings: Settings, since: str | None, check: bool) -> None:
    """Rebuild sessions, contributions and earnings from the event log into schema far_replay."""
    moment = parse_time(since) if since else None
    state, differences = asyncio.run(_replay(settings, moment, check))
    window = f"since {moment.isoformat()}" if moment else "from the earliest offset"
    click.echo(f"replay: {state.records} record(s) of {topics.SESSIONS.name} {window} in "
               f"{len(state.positions)} partition(s): {state.outcomes} outcome(s), {state.sessions} session(s), "
               f"{len(state.rejected)} rejected -> schema {SCHEMA}")
    # What the rule refused (a forged or malformed record in the log shows here; all of them: far_replay.rejected).
    for partition, offset, reason in state.rejected[:REJECTED_SHOWN]:
        click.echo(f"REJECTED {topics.SESSIONS.name}[{partition}]@{offset}: {reason}")
    if len(state.rejected) > REJECTED_SHOWN:
        click.echo(f"... and {len(state.rejected) - REJECTED_SHOWN} more rejected (table {SCHEMA}.rejected)")
    if not check:
        return
    for line in differences:
        click.echo(f"DIFF {line}")
    click.echo(f"verify: {len(differences)} difference(s) from the live ledger")
    if differences:
        raise SystemExit(1)


@click.group("report")
def report_group() -> None:
    """Usage and earnings reports from the ledger."""


@report_group.command("usage")
@with_settings("database_url")
@click.option("--by", "by", type=click.Choice(sorted(QUERIES)), default="model", show_default=True)
@click.option("--since", default=None, metavar="TIME", help="Sessions finished at/after (ISO 8601, UTC if no zone)")
@click.option("--until", default=None, metavar="TIME", help="Sessions finished before")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def usage_command(settings: Settings, by: str, since: str | None, until: str | None, fmt: str) -> None:
    """Sessions, tokens, charges, fees and node earnings by model, node or day (UTC)."""
    window = (parse_time(since) if since else None, parse_time(until) if until else None)

    async def work() -> list[dict[str, Any]]:
        async with connection(settings) as conn:
            return await usage(conn, by, *window)

    rows = asyncio.run(work())
    click.echo(render(rows, fmt))


ledger.add_command(audit_command)
