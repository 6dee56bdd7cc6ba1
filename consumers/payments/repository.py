"""The payments group's projection and the weekly batches (asyncpg).

- `record_payable`: per consumer batch, in one transaction, the winning outcome of each request (the
  same rule as the ledger: first accepted outcome of a request_id) and one payment item per contribution
  embedded in it, with the ISO week (UTC) of its event time and the payout wallet the registry knows.
- `close_week`: writes the week's batch, one far_payment_batches line per wallet. A line pays every item
  not yet paid whose week is the closed week or earlier (so work that arrived after its own week had
  closed is paid by the next close: never lost, and an item is put in a batch at most once). Wallets owed
  less than the minimum payout are carried over (their items stay open); work of nodes with no known
  wallet is reported and stays open until the node registers one. Closing a closed week returns the
  same batch.
- `mark_paid`: records the payout transfer (status paid, tx reference) and posts it to the ledger
  (debit the nodes' accounts, credit the external payouts account).
"""
from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Sequence

import asyncpg

from farmesh import accounts, money
from schemas.events import PaymentBatchClosed, PaymentLine, SessionOutcome

_PAYOUT_NAMESPACE = uuid.UUID("0b7f6a0e-93d4-4c0e-8d55-6c1c3d5e2a90")
CLOSE_LOCK = "farmesh.payments.close"


class PaymentsError(Exception):
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


@dataclass(frozen=True)
class Recorded:
    sessions: int
    items: int
    duplicates: int


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows)] if rows else []


async def record_payable(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """Record the payable work of each request's first outcome (a later one records nothing)."""
    if not outcomes:
        return Recorded(0, 0, 0)
    async with conn.transaction():
        inserted = {r["event_id"] for r in await conn.fetch(
            _INSERT_SESSIONS, *_columns([(o.request_id, o.event_id) for o in outcomes]))}
        # The work is dated like the ledger dates it (far_session_contributions.occurred_at = finished_at).
        winners = {o.event_id: o for o in outcomes if o.event_id in inserted}.values()  # one per event id
        items = [(c.contribution_id, o.request_id, c.peer_id, c.earnings_far, o.finished_at, iso_week(o.finished_at))
                 for o in winners for c in o.contributions]
        status = await conn.execute(_INSERT_ITEMS, *_columns(items)) if items else "INSERT 0 0"
    return Recorded(len(inserted), int(status.split()[-1]), len(outcomes) - len(inserted))


# ------------------------------------------------------------------------------------------------ closing

@dataclass
class Closed:
    event: PaymentBatchClosed
    created: bool  # False: the week was already closed, this is the same batch
    carried: list[tuple[str, Decimal, int]] = field(default_factory=list)     # wallet, amount, items
    no_wallet: list[tuple[str, Decimal, int]] = field(default_factory=list)   # peer_id, amount, items
    seconds: float = 0.0


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


async def _open_summary(conn: asyncpg.Connection, week: str) -> tuple[list, list]:
    """What is still open up to `week`: wallets below the minimum, and peers without a wallet."""
    rows = await conn.fetch(
        "SELECT wallet, peer_id, sum(amount) AS amount, count(*) AS n FROM far_payment_items "
        "WHERE batch_id IS NULL AND week <= $1 AND amount > 0 GROUP BY wallet, peer_id", week)
    by_wallet: dict[str, list] = defaultdict(lambda: [Decimal(0), 0])
    no_wallet = []
    for r in rows:
        if r["wallet"] is None:
            no_wallet.append((r["peer_id"], r["amount"], r["n"]))
        else:
            by_wallet[r["wallet"]][0] += r["amount"]
            by_wallet[r["wallet"]][1] += r["n"]
    carried = [(w, a, n) for w, (a, n) in sorted(by_wallet.items())]
    return carried, sorted(no_wallet)


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
        # Work of nodes that registered a wallet since it was recorded becomes payable now.
        await conn.execute(
            "UPDATE far_payment_items i SET wallet = n.wallet FROM far_nodes n "
            "WHERE i.wallet IS NULL AND i.batch_id IS NULL AND n.peer_id = i.peer_id AND n.wallet IS NOT NULL")
        # Set-based: one aggregate picks the wallets owed at least the minimum, their lines are inserted, the
        # open items are assigned to them in one UPDATE, and each line's total is then summed from exactly the
        # items it got (an item recorded meanwhile is either in a line and its total, or stays open).
        owed = await conn.fetch(
            "SELECT wallet, sum(amount) AS amount FROM far_payment_items "
            "WHERE batch_id IS NULL AND week <= $1 AND amount > 0 AND wallet IS NOT NULL GROUP BY wallet", week)
        payable = sorted(r["wallet"] for r in owed if money.to_base_units(r["amount"]) >= min_payout)
        total = 0
        if payable:
            created = await conn.fetch(
                """INSERT INTO far_payment_batches (week, wallet, status, closed_at)
                   SELECT $1, w, 'closed', $3 FROM unnest($2::text[]) WITH ORDINALITY AS u(w, n) ORDER BY n
                   ON CONFLICT (week, wallet) DO UPDATE SET status = 'closed', closed_at = EXCLUDED.closed_at
                       WHERE far_payment_batches.status = 'open'
                   RETURNING id, wallet""", week, payable, now)
            if len(created) != len(payable):
                taken = sorted(set(payable) - {r["wallet"] for r in created})
                raise PaymentsError(f"far_payment_batches already holds a closed line for {week} / {taken[0]}")
            ids = [r["id"] for r in created]
            await conn.execute(
                "UPDATE far_payment_items i SET batch_id = b.id FROM far_payment_batches b "
                "WHERE b.id = ANY($2::bigint[]) AND i.wallet = b.wallet AND i.batch_id IS NULL AND i.week <= $1 "
                "AND i.amount > 0", week, ids)
            totals = await conn.fetch(
                """UPDATE far_payment_batches b SET amount = s.amount, contributions = s.n
                   FROM (SELECT batch_id, sum(amount) AS amount, count(*) AS n FROM far_payment_items
                         WHERE batch_id = ANY($1::bigint[]) GROUP BY batch_id) s
                   WHERE b.id = s.batch_id RETURNING b.amount""", ids)
            total = sum(money.to_base_units(r["amount"]) for r in totals)
            # The ledger's contribution rows point at the line that pays them (where recorded already).
            await conn.execute(
                "UPDATE far_session_contributions c SET payment_batch_id = i.batch_id FROM far_payment_items i "
                "WHERE i.batch_id = ANY($1::bigint[]) AND c.event_id = i.contribution_id", ids)
        carried, no_wallet = await _open_summary(conn, week)
        lines = await conn.fetchval("SELECT count(*) FROM far_payment_batches WHERE week = $1 AND status <> 'open'", week)
        seconds = time.monotonic() - t0
        await conn.execute(
            """INSERT INTO far_payment_weeks (week, event_id, min_payout, lines, total, carried_over,
                   unpaid_no_wallet, close_seconds, closed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            week, uuid.uuid4(), money.to_far(min_payout), lines, money.to_far(total),
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
            per_peer = await conn.fetch("SELECT peer_id, sum(amount) AS amount FROM far_payment_items "
                                        "WHERE batch_id = $1 GROUP BY peer_id ORDER BY peer_id", line["id"])
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
