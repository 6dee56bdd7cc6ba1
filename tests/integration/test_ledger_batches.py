"""consumers.ledger.repository.record_outcomes on its own: one consumer batch with duplicates, reruns, a failed
session and a free one; then the same batch again (nothing changes) and the audit stays clean."""
from __future__ import annotations

import uuid

from datetime import datetime, timezone
from decimal import Decimal

import asyncpg
import pytest

from consumers.ledger.repository import record_outcomes
from db.migrate import migrate
from farmesh.billing import accounts
from schemas import money
from tests.support.money import audit_breaks, outcome

pytestmark = pytest.mark.integration

_TABLES = ("far_mesh_sessions", "far_session_contributions", "far_ledger_transactions", "far_ledger_entries",
           "far_accounts")


@pytest.fixture
async def db_pool(empty_database_url):
    """A database of this module's own: the snapshots and the audit cover whole tables."""
    await migrate(empty_database_url)
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def _snapshot(conn) -> dict[str, list]:
    state = {t: sorted(map(tuple, await conn.fetch(f"SELECT * FROM {t}")), key=repr) for t in _TABLES}
    state["far_reservations"] = sorted(map(tuple, await conn.fetch(
        "SELECT request_id, status, charged, settlement_txn, reason FROM far_reservations")), key=repr)
    return state


async def test_a_batch_records_each_request_once_and_again_changes_nothing(db_pool):
    async with db_pool.acquire() as conn:
        issued = await accounts.create_client(conn, "batches", money.to_base_units(Decimal(1)))
        now, run = datetime.now(timezone.utc), uuid.uuid4().hex[:8]
        first = outcome(f"{run}-b-1", issued.account_id, 7, now, fee=Decimal("0.05"))
        rerun = outcome(f"{run}-b-1", issued.account_id, 3, now, i=1)  # the same request ran again: ignored
        failed = outcome(f"{run}-b-2", issued.account_id, 2, now, failed=True, i=2)
        free = outcome(f"{run}-b-3", issued.account_id, 0, now, i=3)  # nothing delivered: no entries, reservation closed
        batch = [first, first, rerun, failed, free, failed]
        for o in (first, failed, free):
            await accounts.reserve(db_pool, f"Bearer {issued.key}", accounts.Reservation(
                o.request_id, o.model, 10, o.price_per_token, o.platform_fee_rate))

        result = await record_outcomes(conn, batch)
        assert (result.sessions, result.duplicates, result.settled, result.released) == (3, 3, 2, 1)
        assert result.contributions == sum(len(o.contributions) for o in (first, failed, free))
        assert {c.contribution_id for c in result.credited} == \
            {c.contribution_id for o in (first, failed, free) for c in o.contributions}
        session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", first.request_id)
        assert session["event_id"] == first.event_id and session["cost"] == first.cost_far
        entries = await conn.fetch("SELECT account_id, side, amount, contribution_id FROM far_ledger_entries "
                                   "WHERE txn_id = $1 ORDER BY id", first.event_id)
        assert [(e["account_id"], e["side"], e["amount"]) for e in entries] == [
            (issued.account_id, "debit", first.cost_far),
            *((accounts.node_account_id(c.peer_id), "credit", c.earnings_far) for c in first.contributions
              if c.earnings_far > 0),
            (accounts.PLATFORM_ACCOUNT, "credit", first.platform_fee_far)]
        assert await conn.fetchval("SELECT count(*) FROM far_ledger_entries WHERE txn_id = $1", free.event_id) == 0
        reservations = {r["request_id"]: r for r in await conn.fetch("SELECT * FROM far_reservations")}
        assert reservations[f"{run}-b-1"]["status"] == "settled" and reservations[f"{run}-b-1"]["charged"] == first.cost_far
        assert reservations[f"{run}-b-2"]["status"] == "released" and reservations[f"{run}-b-2"]["settlement_txn"] == failed.event_id
        assert reservations[f"{run}-b-3"]["status"] == "settled" and reservations[f"{run}-b-3"]["charged"] == 0

        before = await _snapshot(conn)
        again = await record_outcomes(conn, batch)
        assert (again.sessions, again.contributions, again.duplicates, again.credited) == (0, 0, len(batch), ())
        assert await _snapshot(conn) == before

        # Inside a caller's transaction (a savepoint), a new batch is recorded with it.
        late = outcome(f"{run}-b-4", issued.account_id, 4, now, i=4)
        await accounts.reserve(db_pool, f"Bearer {issued.key}", accounts.Reservation(
            late.request_id, late.model, 10, late.price_per_token, late.platform_fee_rate))
        async with conn.transaction():
            assert (await record_outcomes(conn, [late])).sessions == 1
        assert await conn.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id LIKE $1", f"{run}-%") == 4
    assert await audit_breaks(db_pool) == []


async def test_a_failed_batch_leaves_nothing_and_the_connection_usable(db_pool):
    async with db_pool.acquire() as conn:
        issued = await accounts.create_client(conn, "broken", money.to_base_units(Decimal(1)))
        good = outcome("f-1", issued.account_id, 2, datetime.now(timezone.utc))
        clash = outcome("f-2", issued.account_id, 2, datetime.now(timezone.utc))
        clash = clash.model_copy(update={"event_id": good.event_id})  # another request with the same event id
        with pytest.raises(Exception):
            await record_outcomes(conn, [good, clash])
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id LIKE 'f-%'") == 0
        assert (await record_outcomes(conn, [good])).sessions == 1
        assert await conn.fetchval("SELECT count(*) FROM far_ledger_entries WHERE txn_id = $1", good.event_id) > 0
