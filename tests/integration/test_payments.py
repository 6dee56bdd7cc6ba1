"""Consumer group `payments` and the weekly batches on the real broker and PostgreSQL (CLI included)."""
from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from consumers.ledger import consumer as ledger
from consumers.payments import consumer as payments
from consumers.payments.cli import unfinished
from consumers.payments.repository import iso_week, week_start
from farmesh.billing import accounts
from schemas import money
from schemas import topics
from schemas.events import PaymentBatchClosed
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env, outcome, producer, reserve_for

pytestmark = pytest.mark.integration

# Past ISO weeks (closing a week that has not started is refused).
W10, W11, W12, W13 = "2025-W10", "2025-W11", "2025-W12", "2025-W13"
WALLET_A, WALLET_B, WALLET_D = "0xA11CE", "0xB0B", "0xD0D0"
ALPHA, BETA, GAMMA, DELTA = "QmAlpha", "QmBeta", "QmGamma", "QmDelta"  # alpha and gamma share a wallet
# An item no batch line pays (membership is the rule of the view far_payment_item_lines, migration 008).
UNPAID = "NOT EXISTS (SELECT 1 FROM far_payment_item_lines v WHERE v.contribution_id = i.contribution_id)"


def at(week: str, hours: int = 30) -> datetime:
    return week_start(week) + timedelta(hours=hours)


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("payments"), postgres_admin_url) as e:
        # What the registry knows: delta never registered (no far_nodes row, so no wallet).
        await e.pool.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                                 [(ALPHA, WALLET_A), (BETA, WALLET_B), (GAMMA, WALLET_A)])
        groups = {
            topics.GROUP_LEDGER: lambda b, r: ledger.register(b, e.pool, r),
            topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, e.pool, r),
        }
        async with running(e.bootstrap, groups):
            yield e


@pytest.fixture(scope="module")
async def client(env):
    async with env.pool.acquire() as conn:
        return await accounts.create_client(conn, "payments-client", money.to_base_units(Decimal(10)))


async def publish(env, client, *outcomes) -> None:
    for o in outcomes:
        await reserve_for(env.pool, client.key, o)
    p = await producer(env.bootstrap)
    try:
        for o in outcomes:
            # The outcome, delivered twice, then a rerun of the same request: only the first is paid.
            rerun = outcome(o.request_id, client.account_id, o.completion_tokens, o.finished_at + timedelta(seconds=1),
                            peers=[(GAMMA, 0, 4)])
            for event in (o, o, rerun):
                await p.publish(event, topics.SESSIONS.name, key=o.request_id.encode())
    finally:
        await p.stop()
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name)


def session(client, week: str, tokens: int, peers, hours: int = 30, failed: bool = False):
    return outcome(f"{week}-{uuid.uuid4().hex[:8]}", client.account_id, tokens, at(week, hours), peers=peers,
                   failed=failed)


async def earned(env, week: str | None = None, wallet_known: bool = True) -> Decimal:
    """The ledger's contributions' earnings (optionally of one ISO week), by nodes with a wallet."""
    rows = await env.pool.fetch("SELECT c.occurred_at, c.earnings, n.wallet FROM far_session_contributions c "
                                "LEFT JOIN far_nodes n USING (peer_id)")
    return sum((r["earnings"] for r in rows if (week is None or iso_week(r["occurred_at"]) == week)
                and (r["wallet"] is not None) == wallet_known), Decimal(0))


def export_sum(csv_text: str) -> tuple[Decimal, list[dict]]:
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    return sum((Decimal(r["amount_far"]) for r in rows), Decimal(0)), rows


async def test_weekly_batches_close_once_and_late_work_goes_to_the_next_batch(env, client, tmp_path):
    two = [(ALPHA, 0, 2), (BETA, 2, 4)]
    three = [(GAMMA, 0, 1), (BETA, 1, 3), (DELTA, 3, 4)]
    w10 = [session(client, W10, 7, two), session(client, W10, 3, three, hours=100),
           session(client, W10, 2, two, failed=True)]
    w11 = [session(client, W11, 5, two)]
    await publish(env, client, *w10, *w11)

    db = ["--database-url", env.database_url]
    first = await farmesh("payments", "close", "--week", W10, "--kafka-bootstrap", env.bootstrap, *db)
    assert first.exit_code == 0, first.output
    again = await farmesh("payments", "close", "--week", W10, "--kafka-bootstrap", env.bootstrap, *db)
    assert again.exit_code == 0 and "closed already" in again.output
    assert f"NOT PAID, no wallet registered: node {DELTA}" in first.output

    exported = await farmesh("payments", "export", "--week", W10, "--format", "csv", *db)
    total, lines = export_sum(exported.stdout)
    assert total == await earned(env, W10) > 0  # the export sums equal the contributions' earnings
    assert sorted(r["wallet"] for r in lines) == [WALLET_A, WALLET_B]  # one line per wallet (alpha+gamma: one)
    as_json = json.loads((await farmesh("payments", "export", "--week", W10, "--format", "json", *db)).stdout)
    assert [line["line_id"] for line in as_json["lines"]] == [int(r["line_id"]) for r in lines]
    assert Decimal(as_json["total_far"]) == total and Decimal(as_json["unpaid_no_wallet_far"]) > 0
    # Closing twice gave one batch, and published the same batch-closed event (same id) both times.
    events = [PaymentBatchClosed.model_validate_json(v) for v in await read_all(env.bootstrap, topics.PAYMENTS.name)]
    mine = [e for e in events if e.week == W10]
    assert len(mine) == 2 and mine[0] == mine[1] and mine[0].total_far == total
    assert await env.pool.fetchval("SELECT count(*) FROM far_payment_batches WHERE week = $1", W10) == 2

    # Late work: a session of W10 recorded after W10 closed is paid by the next batch (W11), not lost.
    late = session(client, W10, 4, two, hours=120)
    await publish(env, client, late)
    textfile = tmp_path / "close.prom"
    closed = await farmesh("payments", "close", "--week", W11, "--kafka-bootstrap", env.bootstrap,
                           "--metrics-textfile", str(textfile), *db)
    assert closed.exit_code == 0, closed.output
    assert "farmesh_payments_batch_close_seconds_count 1.0" in textfile.read_text()  # for a textfile collector
    late_lines = await env.pool.fetch(
        "SELECT DISTINCT l.week FROM far_payment_item_lines i JOIN far_payment_batches l ON l.id = i.line_id "
        "WHERE i.request_id = $1", late.request_id)
    assert [r["week"] for r in late_lines] == [W11]
    w11_total, _ = export_sum((await farmesh("payments", "export", "--week", W11, *db)).stdout)
    assert w11_total == await earned(env, W11) + sum(c.earnings_far for c in late.contributions)
    # W10's batch did not change; every paid item was paid once.
    assert export_sum((await farmesh("payments", "export", "--week", W10, *db)).stdout)[0] == total
    assert await env.pool.fetchval("SELECT count(*) FROM far_payment_item_lines") == \
        await env.pool.fetchval("SELECT count(DISTINCT contribution_id) FROM far_payment_item_lines") > 0

    # Weeks close in order.
    refused = await farmesh("payments", "close", "--week", "2025-W09", "--kafka-bootstrap", env.bootstrap, *db)
    assert refused.exit_code != 0 and "in order" in refused.output
    assert await audit_breaks(env.pool) == []


async def test_minimum_payout_carries_small_balances_and_unregistered_work_waits(env, client):
    db = ["--database-url", env.database_url]
    big, small = [(ALPHA, 0, 4)], [(BETA, 0, 4)]
    await publish(env, client, session(client, W12, 30, big), session(client, W12, 1, small),
                  session(client, W12, 2, [(DELTA, 0, 4)]))
    owed_b = await env.pool.fetchval(f"SELECT sum(amount) FROM far_payment_items i WHERE {UNPAID} AND wallet = $1",
                                     WALLET_B)
    result = await farmesh("payments", "close", "--week", W12, "--min-payout", "0.001",
                           "--kafka-bootstrap", env.bootstrap, *db)
    assert result.exit_code == 0, result.output
    assert f"carried over (below the minimum): {WALLET_B} {money.text(owed_b)} FAR" in result.output
    assert [r["wallet"] for r in await env.pool.fetch("SELECT wallet FROM far_payment_batches WHERE week = $1", W12)] \
        == [WALLET_A]

    # Delta registers a wallet: its open work (W10's included) is paid by the next close, with beta's carry.
    owed_d = await env.pool.fetchval("SELECT sum(amount) FROM far_payment_items WHERE peer_id = $1", DELTA)
    await env.pool.execute("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')", DELTA, WALLET_D)
    result = await farmesh("payments", "close", "--week", W13, "--kafka-bootstrap", env.bootstrap, *db)
    assert result.exit_code == 0, result.output
    lines = {r["wallet"]: r["amount"] for r in await env.pool.fetch(
        "SELECT wallet, amount FROM far_payment_batches WHERE week = $1", W13)}
    assert lines == {WALLET_B: owed_b, WALLET_D: owed_d}
    # Everything earned so far is in exactly one batch line.
    assert await env.pool.fetchval("SELECT sum(amount) FROM far_payment_batches") == await earned(env) + await earned(env, wallet_known=False)
    assert await env.pool.fetchval(f"SELECT count(*) FROM far_payment_items i WHERE {UNPAID} AND amount > 0") == 0
    assert await audit_breaks(env.pool) == []


async def test_mark_paid_posts_the_payout_and_is_idempotent(env, client):
    db = ["--database-url", env.database_url]
    line = await env.pool.fetchrow("SELECT * FROM far_payment_batches WHERE week = $1 AND wallet = $2", W10, WALLET_A)
    node_before = await env.pool.fetchval("SELECT sum(balance) FROM far_account_balances WHERE kind = 'node'")
    result = await farmesh("payments", "mark-paid", str(line["id"]), "--tx", "0xfeed", *db)
    assert result.exit_code == 0, result.output
    paid = await env.pool.fetchrow("SELECT * FROM far_payment_batches WHERE id = $1", line["id"])
    assert paid["status"] == "paid" and paid["tx_ref"] == "0xfeed" and paid["paid_at"] is not None
    assert await env.pool.fetchval("SELECT sum(balance) FROM far_account_balances WHERE kind = 'node'") == \
        node_before - line["amount"]
    assert await env.pool.fetchval("SELECT balance FROM far_account_balances WHERE name = 'payouts'") == line["amount"]
    assert (await farmesh("payments", "mark-paid", str(line["id"]), "--tx", "0xfeed", *db)).exit_code == 0
    other = await farmesh("payments", "mark-paid", str(line["id"]), "--tx", "0xother", *db)
    assert other.exit_code != 0 and "paid already" in other.output
    whole_week = await farmesh("payments", "mark-paid", W11, "--tx", "0xweek11", *db)
    assert whole_week.exit_code == 0, whole_week.output
    exported = json.loads((await farmesh("payments", "export", "--week", W11, "--format", "json", *db)).stdout)
    assert {line["status"] for line in exported["lines"]} == {"paid"}
    assert await audit_breaks(env.pool) == []
    audit = await farmesh("ledger", "audit", *db)
    assert audit.exit_code == 0, audit.output


def test_a_week_counts_as_ended_at_its_end_not_after_the_grace():
    """Only the week's end matters to the CLI: FARMESH_PAYMENTS_CLOSE_GRACE delays the service's own close only."""
    end = week_start(W11)  # W10 ends when W11 starts
    assert "--force" in unfinished(W10, end - timedelta(microseconds=1))
    assert "has not ended yet (it ends 2025-03-10 00:00 UTC)" in unfinished(W10, end - timedelta(days=3))
    assert unfinished(W10, end) is None and unfinished(W10, end + timedelta(seconds=1)) is None


# Last in this module: closing the running week with --force makes it the latest closed week.
async def test_closing_a_week_that_has_not_ended_needs_force(env, client):
    db = ["--database-url", env.database_url, "--kafka-bootstrap", env.bootstrap]
    now = datetime.now(timezone.utc)
    current = iso_week(now)
    work = outcome(f"{current}-{uuid.uuid4().hex[:8]}", client.account_id, 6, now - timedelta(seconds=1),
                   peers=[(ALPHA, 0, 4)])
    await publish(env, client, work)

    async def batches_published() -> list[str]:  # the weeks of the batch-closed events (partitions: any order)
        return sorted(PaymentBatchClosed.model_validate_json(v).week
                      for v in await read_all(env.bootstrap, topics.PAYMENTS.name))

    published = await batches_published()

    refused = await farmesh("payments", "close", "--week", current, *db)
    assert refused.exit_code != 0
    assert refused.output.strip().splitlines() == [refused.output.strip()]  # one line
    assert refused.output.startswith(f"Error: {current} has not ended yet") and "--force" in refused.output
    # Nothing closed, nothing published.
    assert await env.pool.fetchval("SELECT count(*) FROM far_payment_weeks WHERE week = $1", current) == 0
    assert await env.pool.fetchval("SELECT count(*) FROM far_payment_batches WHERE week = $1", current) == 0
    assert await batches_published() == published and current not in published

    forced = await farmesh("payments", "close", "--week", current, "--force", *db)
    assert forced.exit_code == 0, forced.output
    assert f"{current} closed: 1 line(s)" in forced.output
    lines = await env.pool.fetch("SELECT wallet, amount FROM far_payment_batches WHERE week = $1", current)
    assert [(r["wallet"], r["amount"]) for r in lines] == [(WALLET_A, work.contributions[0].earnings_far)]
    assert await batches_published() == sorted([*published, current])
    assert await audit_breaks(env.pool) == []
