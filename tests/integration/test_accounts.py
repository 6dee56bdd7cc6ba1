"""Client accounts and API keys (`farmesh keys ...`) and reservations, on the real PostgreSQL."""
from __future__ import annotations

import asyncio
import hashlib
import uuid
from decimal import Decimal

import pytest

from farmesh.billing import accounts

from schemas import money
from tests.support.money import farmesh

pytestmark = pytest.mark.integration


async def test_keys_cli_create_list_credit_revoke(database_url, db_pool):
    db = ["--database-url", database_url]
    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = await farmesh("keys", "create", "--name", name, "--credit", "0.5", *db)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("fmk_") and len(key) > 40
    # Only a hash is stored: the key itself appears nowhere in the database.
    row = await db_pool.fetchrow("SELECT k.* FROM far_api_keys k JOIN far_accounts a USING (account_id) WHERE a.name = $1", name)
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest() and key.startswith(row["prefix"])
    assert key not in str(dict(row))
    assert (await farmesh("keys", "create", "--name", name, *db)).exit_code != 0  # names are unique

    credited = await farmesh("keys", "credit", name, "0.25", *db)
    assert credited.exit_code == 0 and "balance 0.75 FAR" in credited.output
    assert (await farmesh("keys", "credit", name, "0", *db)).exit_code != 0
    assert (await farmesh("keys", "credit", name, "1e-19", *db)).exit_code != 0  # finer than a base unit

    listed = await farmesh("keys", "list", *db)
    line = next(ln for ln in listed.output.splitlines() if ln.startswith(name))
    assert f"{row['prefix']}..." in line and "active" in line and "0.75" in line

    revoked = await farmesh("keys", "revoke", row["prefix"], *db)
    assert revoked.exit_code == 0 and row["prefix"] in revoked.output
    line = next(ln for ln in (await farmesh("keys", "list", *db)).output.splitlines() if ln.startswith(name))
    assert "revoked" in line
    with pytest.raises(accounts.Unauthorized, match="revoked"):
        await accounts.authenticate(db_pool, f"Bearer {key}")
    assert (await farmesh("keys", "revoke", "fmk_nosuchkey", *db)).exit_code != 0


async def test_concurrent_requests_never_hold_more_than_the_balance(db_pool):
    async with db_pool.acquire() as conn:
        issued = await accounts.create_client(conn, f"race-{uuid.uuid4().hex[:6]}", money.to_base_units(Decimal("0.005")))

    async def attempt(i: int) -> str:
        try:
            await accounts.reserve(db_pool, f"Bearer {issued.key}",
                                   accounts.Reservation(f"{issued.prefix}-{i}", "m", 10, Decimal("0.0001"), Decimal(0)))
            return "held"
        except accounts.InsufficientFunds:
            return "402"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sorted(outcomes).count("held") == 5  # 5 x 0.001 = 0.005: never more
    have, reserved = await accounts.balance(db_pool, issued.account_id)
    assert (have, reserved) == (money.to_base_units(Decimal("0.005")), money.to_base_units(Decimal("0.005")))


async def test_demo_key_is_fresh_each_time_and_tops_the_account_up(db_pool):
    name = f"demo-{uuid.uuid4().hex[:6]}"
    async with db_pool.acquire() as conn:
        first = await accounts.ensure_demo_key(conn, name, credit=money.to_base_units(Decimal(2)))
        await accounts.reserve(db_pool, f"Bearer {first.key}",
                               accounts.Reservation(f"{name}-r", "m", 1000, Decimal("0.001"), Decimal(0)))
        second = await accounts.ensure_demo_key(conn, name, credit=money.to_base_units(Decimal(2)))
    assert first.account_id == second.account_id and first.key != second.key
    have, reserved = await accounts.balance(db_pool, first.account_id)
    assert have - reserved == money.to_base_units(Decimal(2))  # topped up to what it can spend
    assert (await accounts.authenticate(db_pool, f"Bearer {first.key}")).account_id == first.account_id
