"""`farmesh ledger audit`: print every break of the money invariants; exit 1 on any."""
from __future__ import annotations

import asyncio

import asyncpg
import click

from consumers.ledger.audit import run_audit
from farmesh.cli import with_settings
from farmesh.settings import Settings


@click.command("audit")
@with_settings("database_url")
def audit_command(settings: Settings) -> None:
    """Check every money invariant (balanced postings, settlements, node credits, balances,
    reservations, payment batches); print each break and exit non-zero on any."""
    try:
        checks, breaks = asyncio.run(run_audit(settings.require_database_url()))
    except asyncpg.UndefinedTableError as exc:
        raise click.ClickException(f"{exc} (run `farmesh db migrate`)") from exc
    except (asyncpg.PostgresError, OSError) as exc:
        raise click.ClickException(f"database error: {type(exc).__name__}: {exc}") from exc
    for b in breaks:
        click.echo(str(b))
    failed = {b.check for b in breaks}
    for check in checks:
        click.echo(f"{'FAIL' if check in failed else 'ok  '} {check}")
    click.echo(f"audit: {len(breaks)} break(s) in {len(checks)} checks")
    if breaks:
        raise SystemExit(1)
