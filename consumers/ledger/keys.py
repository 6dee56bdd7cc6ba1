"""`farmesh keys create|list|revoke|credit|release`: client accounts and their API keys (farmesh/billing/accounts.py)."""
from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg
import click

from farmesh.billing import accounts
from farmesh.runtime.errors import Refused
from farmesh.runtime.options import connection, far_amount, with_settings
from farmesh.runtime.settings import Settings
from schemas import money

T = TypeVar("T")


def run_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on one connection to the configured database (failures: farmesh/runtime/errors.py)."""
    async def main() -> T:
        async with connection(settings) as conn:
            return await work(conn)

    return asyncio.run(main())


@click.group("keys")
def keys_group() -> None:
    """Client accounts and their API keys (only a hash of each key is stored)."""


@keys_group.command("create")
@with_settings("database_url")
@click.option("--name", required=True, help="Client account name (unique)")
@click.option("--credit", "credit", default="0", show_default=True, metavar="FAR", help="Opening credit")
def create(settings: Settings, name: str, credit: str) -> None:
    """Create a client account with an API key; the key is printed once and cannot be shown again."""
    amount = far_amount(credit)
    issued = run_db(settings, lambda conn: accounts.create_client(conn, name, amount))
    click.echo(issued.key)
    click.echo(f"account {issued.name} ({issued.account_id}), key {issued.prefix}..., "
               f"credit {money.text(money.to_far(amount))} FAR. Store the key now: only its hash is kept.", err=True)


@keys_group.command("list")
@with_settings("database_url")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table")
def list_keys(settings: Settings, as_json: bool) -> None:
    """Every client account and key: status, balance, reserved and available FAR."""
    rows = run_db(settings, accounts.list_clients)
    if as_json:
        click.echo(json.dumps([{k: (money.text(v) if isinstance(v, Decimal) else str(v) if v is not None else None)
                                for k, v in r.items()} for r in rows], indent=2))
        return
    click.echo(f"{'name':20} {'key':16} {'status':8} {'balance':>14} {'reserved':>12} {'available':>14}  account")
    for r in rows:
        status = "revoked" if r["revoked_at"] else ("active" if r["prefix"] else "no key")
        click.echo(f"{r['name']:20} {(r['prefix'] or '-') + '...':16} {status:8} {money.text(r['balance']):>14} "
                   f"{money.text(r['reserved']):>12} {money.text(r['available']):>14}  {r['account_id']}")


@keys_group.command("revoke")
@with_settings("database_url")
@click.argument("ref", metavar="PREFIX|NAME")
def revoke(settings: Settings, ref: str) -> None:
    """Revoke a key (by its prefix) or every key of an account (by its name); requests with it get 401."""
    prefixes = run_db(settings, lambda conn: accounts.revoke(conn, ref))
    click.echo(f"revoked {', '.join(p + '...' for p in prefixes)}" if prefixes else "already revoked")


@keys_group.command("credit")
@with_settings("database_url")
@click.argument("ref", metavar="PREFIX|NAME")
@click.argument("amount", metavar="FAR")
def credit(settings: Settings, ref: str, amount: str) -> None:
    """Credit a client account (by a key prefix or its name) with AMOUNT FAR."""
    units = far_amount(amount)

    async def work(conn: asyncpg.Connection) -> Any:
        account = await accounts.find_client(conn, ref)
        txn = await accounts.deposit(conn, account["account_id"], units, description="credit via farmesh keys")
        have, reserved = await accounts.balance(conn, account["account_id"])
        return account, txn, have, reserved

    account, txn, have, reserved = run_db(settings, work)
    click.echo(f"credited {money.text(money.to_far(units))} FAR to {account['name']} (posting {txn}); "
               f"balance {money.text(money.to_far(have))} FAR, available {money.text(money.to_far(have - reserved))} FAR")


@keys_group.command("release")
@with_settings("database_url")
@click.argument("request_id")
@click.option("--reason", default="released by an operator", show_default=True)
def release(settings: Settings, request_id: str, reason: str) -> None:
    """Release a request's open reservation (a request that will never run); should its outcome arrive
    after all, the ledger still settles it (charging only what was delivered)."""
    async def work(conn: asyncpg.Connection) -> tuple[bool, str | None]:
        released = await accounts.release(conn, request_id, reason)
        return released, None if released else await accounts.reservation_status(conn, request_id)

    released, status = run_db(settings, work)
    if released:
        click.echo(f"released the reservation of {request_id}")
    elif status is None:  # a mistyped id must not look like success
        raise Refused(f"no reservation for request {request_id!r}")
    else:
        click.echo(f"{request_id} holds no open reservation ({status})")
