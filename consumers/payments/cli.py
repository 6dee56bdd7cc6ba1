"""`farmesh payments`: the payments consumer service, and the weekly batches (close, export, mark-paid)."""
from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import click
from prometheus_client import CollectorRegistry, write_to_textfile

from consumers.payments import repository
from farmesh.kafka import messaging
from schemas import money
from farmesh.runtime.options import CONNECT_TIMEOUT, connection, far_amount, flags_to_subcommand, with_settings
from farmesh.runtime.settings import Settings
from schemas import topics


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return money.text(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _far(value: Decimal) -> str:
    return money.text(value)


@click.group("payments", invoke_without_command=True)
@with_settings("kafka_bootstrap", "database_url")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--metrics-port", type=int, default=9103, show_default=True, help="/metrics and /health")
@click.pass_context
def payments_group(ctx: click.Context, settings: Settings, metrics_host: str, metrics_port: int) -> None:
    """Consumer group `payments`: payable work by ISO week; weekly payment batches.

    Without a subcommand, runs the consumer service (like `farmesh ledger`); the subcommands close a
    week's batch, export it and mark it paid.
    """
    if ctx.invoked_subcommand is not None:
        flags_to_subcommand(ctx)
        return
    from consumers.payments.service import run_payments

    asyncio.run(run_payments(settings, metrics_host, metrics_port))


async def _close(settings: Settings, week: str, min_payout: int, textfile: str | None) -> repository.Closed:
    from consumers.payments.schedule import CloseMetrics, close_and_publish

    await messaging.ensure_topics(settings.kafka_bootstrap, [(topics.PAYMENTS.name, settings.topic_partitions)])
    registry = CollectorRegistry()
    broker = messaging.create_broker(settings.kafka_bootstrap, "payments-close", registry)
    conn = await asyncpg.connect(settings.require_database_url(), timeout=CONNECT_TIMEOUT)
    try:
        await broker.connect()
        closed = await close_and_publish(conn, broker, week, min_payout)
    finally:
        await conn.close()
        await broker.stop()
    if textfile:  # a batch job's metrics, for node_exporter's textfile collector
        CloseMetrics(registry).closed(closed)
        write_to_textfile(textfile, registry)
    return closed


def unfinished(week: str, now: datetime) -> str | None:
    """Why closing `week` at `now` needs --force (it has not ended yet, in UTC), or None when it has ended.

    Only the end of the week counts, not FARMESH_PAYMENTS_CLOSE_GRACE: the grace is how long the service's own
    schedule waits for work still in flight; an operator who closes an ended week by hand chose not to wait
    (work recorded after the close is paid by the next batch, never lost). A week still running is different:
    its batch would pay only part of it and close it for good, so that takes an explicit --force.
    """
    from consumers.payments.schedule import week_end

    end = week_end(week)  # refuses what is not an ISO week
    if end <= now:
        return None
    return (f"{week} has not ended yet (it ends {end:%Y-%m-%d %H:%M} UTC): its batch would pay only the work "
            f"recorded so far and close the week; pass --force to close it anyway")


@payments_group.command("close")
@with_settings("kafka_bootstrap", "database_url")
@click.option("--week", required=True, metavar="YYYY-Www", help="ISO week (UTC), e.g. 2026-W48")
@click.option("--min-payout", default=None, metavar="FAR",
              help="Carry wallets owed less than this to the next batch [FARMESH_MIN_PAYOUT, 0]")
@click.option("--metrics-textfile", default=None, metavar="PATH", help="Write the close's metrics (Prometheus text)")
@click.option("--force", is_flag=True, help="Close a week that has not ended yet (UTC)")
def close(settings: Settings, week: str, min_payout: str | None, metrics_textfile: str | None, force: bool) -> None:
    """Close WEEK's batch: one line per payout wallet; idempotent; publishes payments.batch_closed.

    A week that has not ended yet (UTC) is refused without --force; an ended one closes at once, grace or not.
    """
    minimum = (far_amount(min_payout, param_hint="--min-payout") if min_payout is not None
               else settings.min_payout_base_units)
    if not force and (why := unfinished(week, datetime.now(timezone.utc))) is not None:
        raise repository.PaymentsError(why)
    closed = asyncio.run(_close(settings, week, minimum, metrics_textfile))
    e = closed.event
    state = "closed" if closed.created else f"was closed already at {e.closed_at.isoformat(timespec='seconds')}; same batch"
    click.echo(f"{e.week} {state}: {len(e.lines)} line(s), total {_far(e.total_far)} FAR "
               f"(minimum payout {_far(e.min_payout_far)} FAR, batch event {e.event_id})")
    for line in e.lines:
        click.echo(f"  line {line.line_id:<6} {line.wallet:44} {_far(line.amount_far):>22} FAR  {line.contributions} contribution(s)")
    for wallet, amount, n in closed.carried:
        click.echo(f"  carried over (below the minimum): {wallet} {_far(amount)} FAR, {n} contribution(s)")
    for peer, amount, n in closed.no_wallet:
        click.echo(f"  NOT PAID, no wallet registered: node {peer} {_far(amount)} FAR, {n} contribution(s)")


@payments_group.command("export")
@with_settings("database_url")
@click.option("--week", required=True, metavar="YYYY-Www")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", "-o", type=click.File("w"), default="-", help="File (default: stdout)")
def export(settings: Settings, week: str, fmt: str, output: Any) -> None:
    """Export a closed week's batch: one line per wallet, exact FAR amounts."""
    async def work() -> dict[str, Any]:
        async with connection(settings) as conn:
            return await repository.export_week(conn, week)

    batch = asyncio.run(work())
    if fmt == "json":
        output.write(json.dumps(batch, default=_json_default, indent=2) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["week", "line_id", "wallet", "amount_far", "contributions", "status", "tx_ref", "paid_at"])
    for line in batch["lines"]:
        writer.writerow([week, line["line_id"], line["wallet"], _far(line["amount_far"]), line["contributions"],
                         line["status"], line["tx_ref"] or "", line["paid_at"].isoformat() if line["paid_at"] else ""])
    output.write(buffer.getvalue())


@payments_group.command("mark-paid")
@with_settings("database_url")
@click.argument("batch", metavar="LINE_ID|WEEK")
@click.option("--tx", "tx_ref", required=True, metavar="REF", help="Reference of the transfer that paid it")
def mark_paid(settings: Settings, batch: str, tx_ref: str) -> None:
    """Mark a batch line (or every line of a closed week) paid; posts the payout to the ledger."""
    async def work() -> list[int]:
        async with connection(settings) as conn:
            return await repository.mark_paid(conn, batch, tx_ref)

    paid = asyncio.run(work())
    click.echo(f"marked paid with {tx_ref}: line(s) {', '.join(map(str, paid))}" if paid else f"already paid with {tx_ref}")

