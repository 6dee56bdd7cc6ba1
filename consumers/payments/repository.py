"""The payments group's projection and the weekly batches (asyncpg).

- `record_payable`: per consumer batch, in one transaction, the winning outcome of each request (the
  same rule as the ledger: first accepted outcome of a request_id) and one payment item per contribution
  embedded in it, with the ISO week (UTC) of its event time and the payout wallet the registry knows.
- `close_week`: writes the week's batch, one far_payment_batches line per wallet. A line pays every item
  not yet paid whose week is the closed week or earlier (so work that arrived after its own week had
  closed is paid by the next close: never lost, and an item is put in a batch at most once). Wallets owed
  less than the minimum payout are carried over (their items stay open); work of nodes with no known
  wallet is reported and stays open until the node registers one. Closing a closed week returns the
  same batch. Membership is a rule, not a pointer (migration 008, view far_payment_item_lines): each item
  has a seq (the order it became payable), each line the seq high-water mark of its close (through_seq),
  and an item belongs to the first line of its wallet, in week order, with item.seq <= through_seq and
  item.week <= line.week. So a close reads the open items in one aggregate and writes only its lines.
- `mark_paid`: records the payout transfer (status paid, tx reference) and posts it to the ledger
  (debit the nodes' accounts, credit the external payouts account).

`PostgresPayments` is the adapter of the group's ports (consumers/payments/ports.py): `PayableStore` for the
handler (the acceptance rule judged on this database's facts, and the payable work recorded, in one transaction)
and `WeeklyBatches` for the scheduled close.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Sequence

import asyncpg

from consumers.payments.ports import Closed, Payable, Recorded
from db.views.acceptance import acceptance_facts
from db.views.payments import ITEMS_HIGH_WATER
from farmesh.billing import accounts
from farmesh.billing.acceptance import judge
from farmesh.runtime.errors import Refused
from schemas import money
from schemas.events import PaymentBatchClosed, PaymentLine, SessionOutcome

_PAYOUT_NAMESPACE = uuid.UUID("0b7f6a0e-93d4-4c0e-8d55-6c1c3d5e2a90")
CLOSE_LOCK = "farmesh.payments.close"


class PaymentsError(Refused):
    """A payments operation that cannot be done as asked."""


# ------------------------------------------------------------------------------------------------ weeks

def iso_week(moment: datetime) -> str:
    """The ISO week (UTC) of a moment, e.g. '2026-W48'."""
    year, week, _ = moment.astimezone(timezone.utc).isocalendar()
    return f"{year}-W{week:02d}"


def week_start(week: str) -> datetime:
    """Monday 00:00 UTC of an ISO week; raises PaymentsError for anything that is not one."""
    try:
        year, _, number = week.partition("-W")
        if len(year) != 4 or len(number) != 2:
            raise ValueError
        day = date.fromisocalendar(int(year), int(number), 1)
    except ValueError:
        raise PaymentsError(f"{week!r} is not an ISO week like 2026-W48") from None
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def next_week(week: str) -> str:
    return iso_week(week_start(week) + timedelta(days=7))


# ------------------------------------------------------------------------------------------------ consumer side

_INSERT_SESSIONS = """
INSERT INTO far_payment_sessions (request_id, event_id)
SELECT * FROM unnest($1::text[], $2::uuid[])
ON CONFLICT DO NOTHING
RETURNING event_id
"""

# The wallet is the one the registry knows for the peer when the work is recorded (as in the ledger).
_INSERT_ITEMS = """
INSERT INTO far_payment_items (contribution_id, request_id, peer_id, wallet, amount, occurred_at, week)
SELECT i.contribution_id, i.request_id, i.peer_id, n.wallet, i.amount, i.occurred_at, i.week
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::timestamptz[], $6::text[])
     AS i(contribution_id, request_id, peer_id, amount, occurred_at, week)
LEFT JOIN far_nodes n ON n.peer_id = i.peer_id
ON CONFLICT (contribution_id) DO NOTHING
"""


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows)] if rows else []


class PostgresPayments:
    """The payments group's `PayableStore` and `WeeklyBatches` on a connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record_payable(self, outcomes: Sequence[SessionOutcome]) -> Payable:
        async with self.pool.acquire() as conn:
            return await judge_and_record(conn, outcomes)

    async def last_closed(self) -> str | None:
        return await self.pool.fetchval("SELECT max(week) FROM far_payment_weeks")

    async def close(self, week: str, min_payout: int, *, now: datetime | None = None) -> Closed:
        async with self.pool.acquire() as conn:
            return await close_week(conn, week, min_payout, now=now)


async def judge_and_record(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Payable:
    """Judge a batch with the ledger's rule (money, client account, the request's reservation, the pricing rule's
    split, contribution ids already owned) and record the payable work of the accepted outcomes, in one transaction:
    the facts judged on are those written next to. The reservations are share-locked until the commit
    (db/views/acceptance.py): the ledger, or a release, judging the same requests waits and then sees this batch's
    choice. An acceptable outcome that loses to the winner a group already recorded counts as a duplicate."""
    if not outcomes:
        return Payable(Recorded(0, 0, 0))
    async with conn.transaction():
        facts = await acceptance_facts(conn, outcomes, "far_payment_items", "contribution_id", "FOR SHARE",
                                       read_payments_winners=False)
        verdict = judge(outcomes, facts)
        recorded = await _record(conn, verdict.accepted(outcomes))
    if verdict.losers:
        recorded = dataclasses.replace(recorded, duplicates=recorded.duplicates + len(verdict.losers))
    return Payable(recorded, verdict.rejected)


async def record_payable(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """Record the payable work of each request's first outcome (a later one records nothing)."""
    if not outcomes:
        return Recorded(0, 0, 0)
    async with conn.transaction():
        return await _record(conn, outcomes)


async def _record(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """record_payable's writes, inside the caller's transaction."""
    if not outcomes:
        return Recorded(0, 0, 0)
    inserted = {r["event_id"] for r in await conn.fetch(
        _INSERT_SESSIONS, *_columns([(o.request_id, o.event_id) for o in outcomes]))}
    # The work is dated like the ledger dates it (far_session_contributions.occurred_at = finished_at).
    winners = {o.event_id: o for o in outcomes if o.event_id in inserted}.values()  # one per event id
    items = [(c.contribution_id, o.request_id, c.peer_id, c.earnings_far, o.finished_at, iso_week(o.finished_at))
             for o in winners for c in o.contributions]
    status = await conn.execute(_INSERT_ITEMS, *_columns(items)) if items else "INSERT 0 0"
    return Recorded(len(inserted), int(status.split()[-1]), len(outcomes) - len(inserted))


# ------------------------------------------------------------------------------------------------ closing

async def _closed_event(conn: asyncpg.Connection, week: str) -> PaymentBatchClosed | None:
    head = await conn.fetchrow("SELECT * FROM far_payment_weeks WHERE week = $1", week)
    if head is None:
        return None
    lines = await conn.fetch("SELECT id, wallet, amount, contributions FROM far_payment_batches "
                             "WHERE week = $1 AND status <> 'open' ORDER BY id", week)
    return PaymentBatchClosed(
        event_id=head["event_id"], occurred_at=head["closed_at"], week=week, min_payout_far=head["min_payout"],
        lines=[PaymentLine(line_id=r["id"], wallet=r["wallet"], amount_far=r["amount"], contributions=r["contributions"])
               for r in lines],
        total_far=head["total"], carried_over_far=head["carried_over"], unpaid_no_wallet_far=head["unpaid_no_wallet"],
        closed_at=head["closed_at"],
    )


# Batch membership is a rule (migration 008, view far_payment_item_lines): an item belongs to the first line
# (week order) of its wallet with item.seq <= line.through_seq and item.week <= line.week. A wallet's lines nest
# (closes are serialised, in week order, and through_seq is the seq high-water mark of the close), so an item is
# still open iff its wallet's LAST line does not hold it. Closing therefore reads the open items in one aggregate
# and writes only the lines: no item is updated (except work given a wallet at this close).
_LAST_LINES = """SELECT DISTINCT ON (wallet) wallet, week, through_seq FROM far_payment_batches
                 WHERE through_seq IS NOT NULL ORDER BY wallet, week DESC"""

# Open work of `week` or earlier (seq <= $2) per wallet: one pass over the items, probing each wallet's last line.
_OPEN = f"""
SELECT i.wallet, sum(i.amount) AS amount, count(*) AS n
FROM far_payment_items i LEFT JOIN ({_LAST_LINES}) last ON last.wallet = i.wallet
WHERE i.week <= $1 AND i.amount > 0 AND i.seq <= $2 AND i.wallet IS NOT NULL
  AND NOT COALESCE(i.seq <= last.through_seq AND i.week <= last.week, false)
GROUP BY i.wallet
"""
# Work of nodes with no known wallet (never in a line; far_payment_items_no_wallet_idx), per peer.
_NO_WALLET = """
SELECT peer_id, sum(amount) AS amount, count(*) AS n FROM far_payment_items
WHERE wallet IS NULL AND week <= $1 AND amount > 0 GROUP BY peer_id ORDER BY peer_id
"""


async def _open_work(conn: asyncpg.Connection, week: str, through_seq: int | None = None
                     ) -> tuple[dict[str, tuple[Decimal, int]], list[tuple[str, Decimal, int]]]:
    """What is open up to `week`: {wallet: (amount, items)}, and [(peer_id, amount, items)] without a wallet."""
    rows = await conn.fetch(_OPEN, week, through_seq if through_seq is not None else 2 ** 63 - 1)
    no_wallet = [(r["peer_id"], r["amount"], r["n"]) for r in await conn.fetch(_NO_WALLET, week)]
    return {r["wallet"]: (r["amount"], r["n"]) for r in rows}, no_wallet


async def _open_summary(conn: asyncpg.Connection, week: str) -> tuple[list, list]:
    """What is still open up to `week`: wallets below the minimum, and peers without a wallet."""
    by_wallet, no_wallet = await _open_work(conn, week)
    return [(w, a, n) for w, (a, n) in sorted(by_wallet.items())], no_wallet


async def close_week(conn: asyncpg.Connection, week: str, min_payout: int, *, now: datetime | None = None) -> Closed:
    """Close `week`'s batch (idempotent: a closed week returns its batch unchanged)."""
    t0 = time.monotonic()
    start = week_start(week)
    now = now or datetime.now(timezone.utc)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", CLOSE_LOCK)
        if (event := await _closed_event(conn, week)) is not None:
            carried, no_wallet = await _open_summary(conn, week)
            return Closed(event, False, carried, no_wallet, time.monotonic() - t0)
        latest = await conn.fetchval("SELECT max(week) FROM far_payment_weeks")
        if latest is not None and latest > week:
            raise PaymentsError(f"weeks close in order: {week} is before {latest}, which is closed already "
                                f"(work of {week} that is still open is paid by the next close)")
        if start > now:
            raise PaymentsError(f"{week} has not started yet")
        # No item is being recorded while the week closes: an insert that took a seq and has not committed yet
        # would otherwise become visible later with a seq below this close's high-water mark, inside a line
        # whose total did not count it. SHARE waits for those inserts and holds new ones until the commit.
        await conn.execute("LOCK TABLE far_payment_items IN SHARE MODE")
        # Work of nodes that registered a wallet since it was recorded becomes payable now; it takes a new seq
        # (above every line's through_seq), so no line closed before holds it: the next lines of its wallet do.
        await conn.execute(
            "UPDATE far_payment_items i SET wallet = n.wallet, seq = DEFAULT FROM far_nodes n "
            "WHERE i.wallet IS NULL AND n.peer_id = i.peer_id AND n.wallet IS NOT NULL")
        # The high-water mark: every seq handed out so far belongs to a committed item (or to none).
        through_seq = await conn.fetchval(ITEMS_HIGH_WATER)
        # One aggregate of the open work; the lines are exactly its wallets owed at least the minimum.
        owed, no_wallet = await _open_work(conn, week, through_seq)
        payable: list[str] = []
        carried: list[tuple[str, Decimal, int]] = []
        total = 0
        for w, (a, n) in sorted(owed.items()):
            units = money.to_base_units(a)
            if units >= min_payout:
                payable.append(w)
                total += units
            else:
                carried.append((w, a, n))
        if payable:
            created = await conn.fetch(
                """INSERT INTO far_payment_batches (week, wallet, amount, contributions, status, closed_at, through_seq)
                   SELECT $1, w, a, n, 'closed', $5, $6
                   FROM unnest($2::text[], $3::numeric[], $4::int[]) WITH ORDINALITY AS u(w, a, n, o) ORDER BY o
                   ON CONFLICT (week, wallet) DO UPDATE SET status = 'closed', closed_at = EXCLUDED.closed_at,
                       amount = EXCLUDED.amount, contributions = EXCLUDED.contributions,
                       through_seq = EXCLUDED.through_seq
                       WHERE far_payment_batches.status = 'open'
                   RETURNING id, wallet""",
                week, payable, [owed[w][0] for w in payable], [owed[w][1] for w in payable], now, through_seq)
            if len(created) != len(payable):
                taken = sorted(set(payable) - {r["wallet"] for r in created})
                raise PaymentsError(f"far_payment_batches already holds a closed line for {week} / {taken[0]}")
        seconds = time.monotonic() - t0
        await conn.execute(
            """INSERT INTO far_payment_weeks (week, event_id, min_payout, lines, total, carried_over,
                   unpaid_no_wallet, close_seconds, closed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            week, uuid.uuid4(), money.to_far(min_payout), len(payable), money.to_far(total),
            sum((a for _, a, _ in carried), Decimal(0)), sum((a for _, a, _ in no_wallet), Decimal(0)), seconds, now)
        event = await _closed_event(conn, week)
    assert event is not None
    return Closed(event, True, carried, no_wallet, seconds)


# ------------------------------------------------------------------------------------------------ finance side

async def export_week(conn: asyncpg.Connection | asyncpg.Pool, week: str) -> dict[str, Any]:
    """A closed week's batch: its lines (with status and transfer reference) and totals."""
    week_start(week)
    head = await conn.fetchrow("SELECT * FROM far_payment_weeks WHERE week = $1", week)
    if head is None:
        raise PaymentsError(f"{week} is not closed (farmesh payments close --week {week})")
    lines = await conn.fetch("SELECT * FROM far_payment_batches WHERE week = $1 AND status <> 'open' ORDER BY id", week)
    return {
        "week": week,
        "closed_at": head["closed_at"],
        "min_payout_far": head["min_payout"],
        "total_far": head["total"],
        "carried_over_far": head["carried_over"],
        "unpaid_no_wallet_far": head["unpaid_no_wallet"],
        "batch_event_id": head["event_id"],
        "lines": [{"line_id": r["id"], "wallet": r["wallet"], "amount_far": r["amount"],
                   "contributions": r["contributions"], "status": r["status"], "tx_ref": r["tx_ref"],
                   "paid_at": r["paid_at"]} for r in lines],
    }


def payout_txn_id(line_id: int) -> uuid.UUID:
    return uuid.uuid5(_PAYOUT_NAMESPACE, f"payout:{line_id}")


async def mark_paid(conn: asyncpg.Connection, batch: str, tx_ref: str) -> list[int]:
    """Mark a batch line (its id) or every line of a closed week paid with transfer `tx_ref`.

    Posts each newly paid line to the ledger: its items' nodes are debited, the payouts account credited.
    Marking a paid line again with the same reference changes nothing; another reference is refused.
    """
    if not tx_ref.strip():
        raise PaymentsError("a transfer reference is required")
    async with conn.transaction():
        if batch.isdigit():
            lines = await conn.fetch("SELECT * FROM far_payment_batches WHERE id = $1 FOR UPDATE", int(batch))
        else:
            week_start(batch)
            if await conn.fetchval("SELECT 1 FROM far_payment_weeks WHERE week = $1", batch) is None:
                raise PaymentsError(f"{batch} is not closed")
            lines = await conn.fetch("SELECT * FROM far_payment_batches WHERE week = $1 AND status <> 'open' "
                                     "ORDER BY id FOR UPDATE", batch)
        if not lines:
            raise PaymentsError(f"no payment batch line {batch}")
        paid = []
        for line in lines:
            if line["status"] == "open":
                raise PaymentsError(f"line {line['id']} ({line['week']}) is not closed")
            if line["status"] == "paid":
                if line["tx_ref"] != tx_ref:
                    raise PaymentsError(f"line {line['id']} was paid already with {line['tx_ref']}")
                continue
            per_peer = await conn.fetch("SELECT peer_id, sum(amount) AS amount FROM far_payment_item_lines "
                                        "WHERE line_id = $1 GROUP BY peer_id ORDER BY peer_id", line["id"])
            peers = [r["peer_id"] for r in per_peer]
            await conn.execute(
                "INSERT INTO far_accounts (account_id, kind, name, peer_id) "
                "SELECT a, 'node', 'node ' || p, p FROM unnest($1::uuid[], $2::text[]) AS u(a, p) ON CONFLICT DO NOTHING",
                [accounts.node_account_id(p) for p in peers], peers)
            amount = money.to_base_units(line["amount"])
            entries = [(accounts.node_account_id(r["peer_id"]), "debit", money.to_base_units(r["amount"])) for r in per_peer]
            entries.append((accounts.PAYOUTS_ACCOUNT, "credit", amount))
            await accounts.post(conn, payout_txn_id(line["id"]), "payout", entries,
                                description=f"payout {line['week']} line {line['id']} to {line['wallet']}: {tx_ref}")
            await conn.execute("UPDATE far_payment_batches SET status = 'paid', paid_at = now(), tx_ref = $2 WHERE id = $1",
                               line["id"], tx_ref)
            paid.append(line["id"])
    return paid
