"""Batch membership by rule (migration 008): which line pays each item, at the edges of the rule.

An item belongs to the first line (week order) of its wallet with item.seq <= line.through_seq and
item.week <= line.week (view far_payment_item_lines); closing writes lines only. These tests write the
payments group's rows directly (plus the ledger's matching contribution rows, for the audit's
"payment batches" checks) and close weeks with consumers.payments.repository.close_week.
"""
from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from consumers.ledger.audit import audit
from consumers.payments.repository import close_week, week_start
from db.migrate import migrate
from schemas import money
pytestmark = pytest.mark.integration

W10, W11, W12, W13 = "2025-W10", "2025-W11", "2025-W12", "2025-W13"


@pytest.fixture
async def conn(empty_database_url):
    await migrate(empty_database_url)
    c = await asyncpg.connect(empty_database_url)
    try:
        await c.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                            [("QmA", "0xA"), ("QmB", "0xB")])
        yield c
    finally:
        await c.close()


async def record(conn: asyncpg.Connection, peer: str, week: str, amount: str) -> uuid.UUID:
    """One paid contribution as the ledger and the payments group record it; returns its id."""
    request_id, contribution_id, at = f"r-{uuid.uuid4().hex[:12]}", uuid.uuid4(), week_start(week) + timedelta(hours=7)
    await conn.execute(
        """INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens,
               completion, price_per_token, cost, started_at, finished_at, worker)
           VALUES ($1, gen_random_uuid(), 'm', 'completed', 1, 1, 'x', 0, $2, $3, $3, 'w')""", request_id,
        Decimal(amount), at)
    await conn.execute(
        """INSERT INTO far_session_contributions (event_id, request_id, model, peer_id, start_block, end_block,
               tokens_processed, earnings, occurred_at) VALUES ($1, $2, 'm', $3, 0, 1, 1, $4, $5)""",
        contribution_id, request_id, peer, Decimal(amount), at)
    await conn.execute("INSERT INTO far_payment_sessions (request_id, event_id) VALUES ($1, gen_random_uuid())",
                       request_id)
    await conn.execute(
        """INSERT INTO far_payment_items (contribution_id, request_id, peer_id, wallet, amount, occurred_at, week)
           SELECT $1, $2, $3, (SELECT wallet FROM far_nodes WHERE peer_id = $3), $4, $5, $6""",
        contribution_id, request_id, peer, Decimal(amount), at, week)
    return contribution_id


async def members(conn: asyncpg.Connection, week: str, wallet: str) -> set[uuid.UUID]:
    return {r["contribution_id"] for r in await conn.fetch(
        "SELECT v.contribution_id FROM far_payment_item_lines v JOIN far_payment_batches l ON l.id = v.line_id "
        "WHERE l.week = $1 AND l.wallet = $2", week, wallet)}


async def lines(conn: asyncpg.Connection) -> dict[tuple[str, str], tuple[Decimal, int]]:
    return {(r["week"], r["wallet"]): (r["amount"], r["contributions"])
            for r in await conn.fetch("SELECT * FROM far_payment_batches")}


async def batch_breaks(conn: asyncpg.Connection) -> list[str]:
    _, breaks = await audit(conn)
    return [str(b) for b in breaks if b.check == "payment batches"]


async def test_late_work_of_a_closed_week_is_paid_by_the_next_close_and_closing_twice_changes_nothing(conn):
    a1, b1 = await record(conn, "QmA", W10, "0.5"), await record(conn, "QmB", W10, "0.25")
    first = await close_week(conn, W10, 0)
    assert first.created and await members(conn, W10, "0xA") == {a1} and await members(conn, W10, "0xB") == {b1}
    late = await record(conn, "QmA", W10, "0.125")  # W10's work, recorded after W10 closed
    again = await close_week(conn, W10, 0)
    assert not again.created and again.event == first.event  # same batch, same event id
    assert again.carried == [("0xA", Decimal("0.125"), 1)]  # open, waiting for the next close
    assert await members(conn, W10, "0xA") == {a1}  # the closed line did not grow
    await close_week(conn, W11, 0)
    assert await members(conn, W11, "0xA") == {late}
    assert await lines(conn) == {(W10, "0xA"): (Decimal("0.5"), 1), (W10, "0xB"): (Decimal("0.25"), 1),
                                 (W11, "0xA"): (Decimal("0.125"), 1)}
    assert await batch_breaks(conn) == []


async def test_carried_balance_is_paid_once_the_wallet_reaches_the_minimum(conn):
    minimum = money.to_base_units(Decimal("0.01"))
    items = [await record(conn, "QmB", W10, "0.004")]
    big = await record(conn, "QmA", W10, "0.02")
    closed = await close_week(conn, W10, minimum)
    assert [line.wallet for line in closed.event.lines] == ["0xA"] and closed.carried == [("0xB", Decimal("0.004"), 1)]
    items.append(await record(conn, "QmB", W11, "0.003"))
    closed = await close_week(conn, W11, minimum)
    assert closed.event.lines == [] and closed.carried == [("0xB", Decimal("0.007"), 2)]
    items.append(await record(conn, "QmB", W12, "0.005"))
    closed = await close_week(conn, W12, minimum)
    assert [(line.wallet, line.amount_far, line.contributions) for line in closed.event.lines] == \
        [("0xB", Decimal("0.012"), 3)] and closed.carried == []
    assert await members(conn, W12, "0xB") == set(items) and await members(conn, W10, "0xA") == {big}
    assert await batch_breaks(conn) == []


async def test_work_without_a_wallet_is_paid_after_the_wallet_registers_and_never_by_a_closed_line(conn):
    a1 = await record(conn, "QmA", W10, "0.5")
    d1 = await record(conn, "QmD", W10, "0.25")  # QmD has no wallet yet
    closed = await close_week(conn, W10, 0)
    assert closed.no_wallet == [("QmD", Decimal("0.25"), 1)] and await members(conn, W10, "0xA") == {a1}
    # QmD registers the wallet QmA is paid to: its W10 work must not slip into 0xA's closed W10 line.
    await conn.execute("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ('QmD', '0xA', 'online')")
    assert await members(conn, W10, "0xA") == {a1}
    closed = await close_week(conn, W11, 0)
    assert closed.no_wallet == [] and await members(conn, W11, "0xA") == {d1}
    assert await members(conn, W10, "0xA") == {a1}  # and the rule still gives W10 what it paid
    assert await lines(conn) == {(W10, "0xA"): (Decimal("0.5"), 1), (W11, "0xA"): (Decimal("0.25"), 1)}
    assert await batch_breaks(conn) == []


async def test_next_weeks_work_recorded_before_a_close_waits_for_its_own_week(conn):
    a10 = await record(conn, "QmA", W10, "0.5")
    a11_early = await record(conn, "QmA", W11, "0.25")  # W11 started before W10's close (the close's grace)
    await close_week(conn, W10, 0)
    assert await members(conn, W10, "0xA") == {a10}
    a11_late = await record(conn, "QmA", W11, "0.125")
    a12_early = await record(conn, "QmA", W12, "1")
    await close_week(conn, W11, 0)
    assert await members(conn, W11, "0xA") == {a11_early, a11_late}
    await close_week(conn, W12, 0)
    assert await members(conn, W12, "0xA") == {a12_early}
    assert await conn.fetchval("SELECT count(*) FROM far_payment_item_lines") == 4  # each item in one line
    assert await batch_breaks(conn) == []


async def test_a_close_waits_for_items_being_recorded(conn, empty_database_url):
    """An item that took its seq before the close's high-water mark but commits after it must not land in a
    closed line without being counted: the close waits for the recording transaction."""
    a1 = await record(conn, "QmA", W10, "0.5")
    other = await asyncpg.connect(empty_database_url)
    try:
        tx = other.transaction()
        await tx.start()
        pending = await record(other, "QmA", W10, "0.25")
        closing = asyncio.create_task(close_week(conn, W10, 0))
        await asyncio.sleep(0.5)
        assert not closing.done()
        await tx.commit()
        closed = await asyncio.wait_for(closing, 10)
    finally:
        await other.close()
    assert [(line.amount_far, line.contributions) for line in closed.event.lines] == [(Decimal("0.75"), 2)]
    assert await members(conn, W10, "0xA") == {a1, pending}
    assert await batch_breaks(conn) == []


async def test_the_audit_finds_lines_that_do_not_nest(conn):
    await record(conn, "QmA", W10, "0.5")
    await close_week(conn, W10, 0)
    await record(conn, "QmA", W11, "0.25")
    await close_week(conn, W11, 0)
    assert await batch_breaks(conn) == []
    await conn.execute("UPDATE far_payment_batches SET through_seq = 0 WHERE week = $1", W11)
    assert any("nesting" in b for b in await batch_breaks(conn))


async def test_migration_008_converts_recorded_batches_and_refuses_what_the_rule_cannot_reproduce(
        empty_database_url, tmp_path):
    from db.migrate import MigrationError, default_migrations_dir, rollback

    before_008 = tmp_path / "migrations"
    before_008.mkdir()
    for f in default_migrations_dir().iterdir():
        if f.name.endswith(".sql") and int(f.name[:3]) < 8:
            (before_008 / f.name).write_text(f.read_text())
    url = empty_database_url
    await migrate(url, migrations_dir=before_008)
    c = await asyncpg.connect(url)
    try:
        await c.execute("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ('QmA', '0xA', 'online')")
        ids = {name: await record(c, peer, week, "0.5") for name, peer, week in [
            ("a10", "QmA", W10), ("a11_early", "QmA", W11), ("late10", "QmA", W10), ("d10", "QmD", W10),
            ("a11", "QmA", W11)]}
        # As the pre-008 close left them: W10 paid a10; W11 paid late10, a11_early and a11; d10 has no wallet.
        l10 = await c.fetchval("INSERT INTO far_payment_batches (week, wallet, amount, contributions, status, closed_at) "
                               "VALUES ($1, '0xA', 0.5, 1, 'closed', now()) RETURNING id", W10)
        l11 = await c.fetchval("INSERT INTO far_payment_batches (week, wallet, amount, contributions, status, closed_at) "
                               "VALUES ($1, '0xA', 1.5, 3, 'closed', now()) RETURNING id", W11)
        paid = {ids["a10"]: l10, ids["late10"]: l11, ids["a11_early"]: l11, ids["a11"]: l11}
        for contribution, line in paid.items():
            await c.execute("UPDATE far_payment_items SET batch_id = $2 WHERE contribution_id = $1", contribution, line)
            await c.execute("UPDATE far_session_contributions SET payment_batch_id = $2 WHERE event_id = $1",
                            contribution, line)
        await c.execute("INSERT INTO far_payment_weeks (week, event_id, min_payout, lines, total, carried_over, "
                        "unpaid_no_wallet) VALUES ($1, gen_random_uuid(), 0, 1, 0.5, 0, 0.5), "
                        "($2, gen_random_uuid(), 0, 1, 1.5, 0, 0.5)", W10, W11)

        # An assignment the rule cannot give (W11's work in W10's line) is refused; nothing is dropped.
        await c.execute("UPDATE far_payment_items SET batch_id = $2 WHERE contribution_id = $1", ids["a11"], l10)
        with pytest.raises(MigrationError, match="membership rule differs"):
            await migrate(url)
        await c.execute("UPDATE far_payment_items SET batch_id = $2 WHERE contribution_id = $1", ids["a11"], l11)

        await migrate(url)
        assert {r["contribution_id"]: r["line_id"] for r in await c.fetch(
            "SELECT contribution_id, line_id FROM far_payment_item_lines")} == paid
        assert await batch_breaks(c) == []
        # The next close carries on from the converted lines: d10 once QmD has a wallet, nothing paid twice.
        await c.execute("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ('QmD', '0xA', 'online')")
        closed = await close_week(c, W12, 0)
        assert [(line.amount_far, line.contributions) for line in closed.event.lines] == [(Decimal("0.5"), 1)]
        assert await members(c, W12, "0xA") == {ids["d10"]}
        assert await batch_breaks(c) == []

        await rollback(url, to_version=7)  # the pointers come back from the rule (008 and what came after it)
        assert {r["contribution_id"]: r["batch_id"] for r in await c.fetch(
            "SELECT contribution_id, batch_id FROM far_payment_items WHERE batch_id IS NOT NULL")} == \
            {**paid, ids["d10"]: closed.event.lines[0].line_id}
        assert await c.fetchval("SELECT count(*) FROM far_session_contributions WHERE payment_batch_id IS NOT NULL") == 5
    finally:
        await c.close()
