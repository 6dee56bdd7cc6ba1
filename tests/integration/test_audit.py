"""`farmesh ledger audit` finds each kind of break (the data is tampered with inside a rolled-back savepoint)."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from consumers.ledger import consumer as ledger
from consumers.ledger.audit import audit
from consumers.payments import consumer as payments
from consumers.payments.repository import close_week, iso_week
from farmesh.billing import accounts
from schemas import money
from schemas import topics
from tests.support.consumers import running
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env, outcome, producer, reserve_for

pytestmark = pytest.mark.integration


class Undo(Exception):
    pass


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("audit"), postgres_admin_url) as e:
        groups = {
            topics.GROUP_LEDGER: lambda b, r: ledger.register(b, e.pool, r),
            topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, e.pool, r),
        }
        async with running(e.bootstrap, groups):
            yield e


TAMPERS = {
    "transactions balanced": "DELETE FROM far_ledger_entries WHERE id = (SELECT min(id) FROM far_ledger_entries "
                             "WHERE contribution_id IS NOT NULL)",
    "sessions settled": "UPDATE far_mesh_sessions SET cost = cost + 0.0001 WHERE request_id = (SELECT min(request_id) "
                        "FROM far_mesh_sessions)",
    "contributions = node credits": "UPDATE far_ledger_entries SET account_id = (SELECT account_id FROM far_accounts "
                                    "WHERE kind = 'node' ORDER BY peer_id DESC LIMIT 1) WHERE id = (SELECT min(id) "
                                    "FROM far_ledger_entries e JOIN far_accounts a USING (account_id) "
                                    "WHERE a.kind = 'node' AND a.peer_id = (SELECT min(peer_id) FROM far_accounts))",
    "balances = sum of entries": """
        WITH t AS (INSERT INTO far_ledger_transactions (txn_id, kind, occurred_at)
                   VALUES (gen_random_uuid(), 'deposit', now()) RETURNING txn_id)
        INSERT INTO far_ledger_entries (txn_id, account_id, side, amount)
        SELECT txn_id, '00000000-0000-4000-8000-000000000002', 'debit', 1 FROM t UNION ALL
        SELECT txn_id, (SELECT account_id FROM far_accounts WHERE kind = 'node' LIMIT 1), 'credit', 1 FROM t""",
    "reservations consistent": "UPDATE far_reservations SET status = 'open', closed_at = NULL, charged = NULL "
                               "WHERE request_id = (SELECT min(request_id) FROM far_reservations)",
    "payment batches": "UPDATE far_payment_batches SET amount = amount + 0.000000000000000001 "
                       "WHERE id = (SELECT min(id) FROM far_payment_batches)",
}


async def test_the_audit_reports_every_kind_of_break(env):
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "audited", money.to_base_units(Decimal(1)))
    moment = datetime.now(timezone.utc) - timedelta(days=7)  # last week: closable whatever today is
    sessions = [outcome(f"audit-{uuid.uuid4().hex[:6]}", issued.account_id, 1 + i, moment, i=i,
                        fee=Decimal("0.02"), failed=i == 2) for i in range(6)]
    for o in sessions:
        await reserve_for(env.pool, issued.key, o)
    p = await producer(env.bootstrap)
    try:
        for o in sessions:
            await p.publish(o, topics.SESSIONS.name, key=o.request_id.encode())
    finally:
        await p.stop()
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name)
    await env.pool.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                               [("QmPeerAlpha", "0xA"), ("QmPeerBeta", "0xB"), ("QmPeerGamma", "0xC")])
    async with env.pool.acquire() as conn:
        await close_week(conn, iso_week(moment), 0)
    assert await audit_breaks(env.pool) == []

    async with env.pool.acquire() as conn, conn.transaction():
        for check, sql in TAMPERS.items():
            try:
                async with conn.transaction():  # a savepoint, rolled back by Undo
                    await conn.execute(sql)
                    _, breaks = await audit(conn)
                    assert check in {b.check for b in breaks}, (check, [str(b) for b in breaks])
                    raise Undo
            except Undo:
                pass
        _, breaks = await audit(conn)
        assert breaks == []

    # The CLI prints each break and exits non-zero.
    await env.pool.execute(TAMPERS["payment batches"])
    try:
        result = await farmesh("ledger", "audit", "--database-url", env.database_url)
        assert result.exit_code == 1
        assert "BREAK [payment batches] line" in result.output and "FAIL payment batches" in result.output
    finally:
        await env.pool.execute("UPDATE far_payment_batches SET amount = amount - 0.000000000000000001 "
                               "WHERE id = (SELECT min(id) FROM far_payment_batches)")
    assert (await farmesh("ledger", "audit", "--database-url", env.database_url)).exit_code == 0
