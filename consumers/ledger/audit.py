"""`farmesh ledger audit`: every money invariant, checked against PostgreSQL; each break is printed.

Checks (each a query that returns the rows that break it):

- transactions balanced: every posting's debits equal its credits; all debits equal all credits.
- sessions settled: each session (recorded with an account) has exactly one settlement, keyed by its
  event id, that debits its client exactly cost = delivered tokens x price, credits the platform exactly
  its fee and the nodes exactly the rest; no settlement without a session.
- contributions = node credits: each contribution that earned something is credited once, to its peer's
  node account, with exactly its earnings; no node credit without a contribution; per session the
  contributions' earnings plus the fee equal the cost.
- balances = sum of entries, recomputed from the source records: a client's balance is its credits minus
  its sessions' costs, a node's its contributions' earnings minus what paid batches paid it, the
  platform's the sessions' fees; no client and no node below zero.
- reservations consistent: a request's reservation is held on its session's account at its price (and
  the session's fee is the reservation's fee rate applied to its cost), the session cost no more than it held, it is closed once the session is recorded (settled when completed,
  released when failed) with exactly the cost charged; every settled session had a reservation.
- payment batches: each line equals the sum of its items (membership: the rule of the view
  far_payment_item_lines, migration 008); each paid item is a recorded contribution with the same node
  and amount, is not newer than its batch's week and is in one line only; a wallet's lines nest (through_seq
  grows with the week, as the rule assumes); each week's total equals its lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from db.views.payments import ITEMS_HIGH_WATER
from schemas import money
@dataclass(frozen=True)
class Break:
    check: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"BREAK [{self.check}] {self.subject}: {self.detail}"


def _d(value: Any) -> str:
    return money.text(value) if isinstance(value, Decimal) else str(value)


_SUMS = """
    COALESCE(sum(e.amount) FILTER (WHERE e.side = 'debit'), 0) AS debits,
    COALESCE(sum(e.amount) FILTER (WHERE e.side = 'credit'), 0) AS credits"""

CHECKS: list[tuple[str, str, str, str]] = [
    # (check, query, subject template, detail template) -- templates use the row's columns
    ("transactions balanced", f"""
        SELECT t.txn_id, t.kind, {_SUMS} FROM far_ledger_transactions t
        LEFT JOIN far_ledger_entries e USING (txn_id) GROUP BY t.txn_id, t.kind
        HAVING COALESCE(sum(e.amount) FILTER (WHERE e.side = 'debit'), 0)
            <> COALESCE(sum(e.amount) FILTER (WHERE e.side = 'credit'), 0)""",
     "{kind} {txn_id}", "debits {debits} != credits {credits}"),
    ("transactions balanced", f"""
        SELECT {_SUMS} FROM far_ledger_entries e
        HAVING COALESCE(sum(e.amount) FILTER (WHERE e.side = 'debit'), 0)
            <> COALESCE(sum(e.amount) FILTER (WHERE e.side = 'credit'), 0)""",
     "all entries", "sum of debits {debits} != sum of credits {credits}"),
    ("transactions balanced", """
        SELECT e.id, e.txn_id FROM far_ledger_entries e LEFT JOIN far_ledger_transactions t USING (txn_id)
        WHERE t.txn_id IS NULL""",
     "entry {id}", "belongs to no transaction {txn_id}"),

    ("sessions settled", """
        SELECT s.request_id, s.cost, s.completion_tokens, s.price_per_token FROM far_mesh_sessions s
        WHERE s.cost <> s.completion_tokens * s.price_per_token""",
     "session {request_id}", "cost {cost} != {completion_tokens} tokens x {price_per_token}"),
    ("sessions settled", """
        SELECT s.request_id, s.event_id FROM far_mesh_sessions s
        LEFT JOIN far_ledger_transactions t ON t.txn_id = s.event_id AND t.kind = 'settlement' AND t.request_id = s.request_id
        WHERE s.account_id IS NOT NULL AND t.txn_id IS NULL""",
     "session {request_id}", "has no settlement posting (keyed by its event {event_id})"),
    ("sessions settled", """
        SELECT t.txn_id, t.request_id FROM far_ledger_transactions t
        LEFT JOIN far_mesh_sessions s ON s.event_id = t.txn_id AND s.request_id = t.request_id
        WHERE t.kind = 'settlement' AND s.request_id IS NULL""",
     "settlement {txn_id}", "request {request_id} has no recorded session with that event id"),
    ("sessions settled", """
        WITH moved AS (
            SELECT s.request_id, s.cost, s.platform_fee, s.account_id,
                   COALESCE(sum(e.amount) FILTER (WHERE e.side = 'debit' AND e.account_id = s.account_id), 0) AS client_debit,
                   COALESCE(sum(e.amount) FILTER (WHERE e.side = 'credit' AND a.kind = 'platform'), 0) AS fee_credit,
                   COALESCE(sum(e.amount) FILTER (WHERE e.side = 'credit' AND a.kind = 'node'), 0) AS node_credits,
                   count(e.id) FILTER (WHERE NOT ((e.side = 'debit' AND e.account_id = s.account_id)
                       OR (e.side = 'credit' AND a.kind IN ('platform', 'node')))) AS stray
            FROM far_mesh_sessions s
            JOIN far_ledger_transactions t ON t.txn_id = s.event_id
            LEFT JOIN far_ledger_entries e ON e.txn_id = t.txn_id
            LEFT JOIN far_accounts a ON a.account_id = e.account_id
            WHERE s.account_id IS NOT NULL
            GROUP BY s.request_id, s.cost, s.platform_fee, s.account_id)
        SELECT * FROM moved WHERE client_debit <> cost OR fee_credit <> COALESCE(platform_fee, 0)
            OR node_credits <> cost - COALESCE(platform_fee, 0) OR stray > 0""",
     "session {request_id}",
     "cost {cost}, fee {platform_fee}: client debited {client_debit}, platform credited {fee_credit}, "
     "nodes credited {node_credits}, {stray} entries on other accounts"),

    ("contributions = node credits", """
        SELECT c.event_id, c.request_id, c.peer_id, c.earnings, e.amount, a.peer_id AS credited_peer, e.side
        FROM far_session_contributions c
        JOIN far_mesh_sessions s ON s.request_id = c.request_id AND s.account_id IS NOT NULL
        LEFT JOIN far_ledger_entries e ON e.contribution_id = c.event_id
        LEFT JOIN far_accounts a ON a.account_id = e.account_id
        WHERE (c.earnings > 0 AND (e.id IS NULL OR e.amount <> c.earnings OR e.side <> 'credit'
                                   OR a.peer_id IS DISTINCT FROM c.peer_id))
           OR (c.earnings = 0 AND e.id IS NOT NULL)""",
     "contribution {event_id} of {request_id}",
     "{peer_id} earned {earnings}; credited {amount} ({side}) to node {credited_peer}"),
    ("contributions = node credits", """
        SELECT e.id, e.contribution_id, e.amount FROM far_ledger_entries e
        JOIN far_accounts a ON a.account_id = e.account_id AND a.kind = 'node'
        LEFT JOIN far_session_contributions c ON c.event_id = e.contribution_id
        JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement'
        WHERE c.event_id IS NULL""",
     "node credit entry {id}", "{amount} for contribution {contribution_id}, which is not recorded"),
    ("contributions = node credits", """
        SELECT s.request_id, s.cost, COALESCE(s.platform_fee, 0) AS fee, COALESCE(sum(c.earnings), 0) AS earnings
        FROM far_mesh_sessions s LEFT JOIN far_session_contributions c ON c.request_id = s.request_id
        GROUP BY s.request_id, s.cost, s.platform_fee
        HAVING COALESCE(sum(c.earnings), 0) + COALESCE(s.platform_fee, 0) <> s.cost""",
     "session {request_id}", "contributions earned {earnings} + fee {fee} != cost {cost}"),
    ("contributions = node credits", """
        WITH earned AS (SELECT c.peer_id, sum(c.earnings) AS earnings FROM far_session_contributions c
                        JOIN far_mesh_sessions s ON s.request_id = c.request_id AND s.account_id IS NOT NULL
                        GROUP BY c.peer_id),
             credited AS (SELECT a.peer_id, sum(e.amount) AS credits FROM far_ledger_entries e
                          JOIN far_accounts a ON a.account_id = e.account_id AND a.kind = 'node'
                          JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement'
                          WHERE e.side = 'credit' GROUP BY a.peer_id)
        SELECT COALESCE(earned.peer_id, credited.peer_id) AS peer_id, COALESCE(earnings, 0) AS earnings,
               COALESCE(credits, 0) AS credits
        FROM earned FULL JOIN credited ON credited.peer_id = earned.peer_id
        WHERE COALESCE(earnings, 0) <> COALESCE(credits, 0)""",
     "node {peer_id}", "contributions earned {earnings}, node account credited {credits}"),

    ("balances = sum of entries", """
        WITH deposits AS (SELECT e.account_id, sum(e.amount) AS amount FROM far_ledger_entries e
                          JOIN far_ledger_transactions t USING (txn_id)
                          WHERE t.kind = 'deposit' AND e.side = 'credit' GROUP BY e.account_id),
             spent AS (SELECT account_id, sum(cost) AS amount FROM far_mesh_sessions
                       WHERE account_id IS NOT NULL GROUP BY account_id)
        SELECT b.name, b.account_id, b.balance, COALESCE(d.amount, 0) AS deposited, COALESCE(s.amount, 0) AS spent
        FROM far_account_balances b LEFT JOIN deposits d USING (account_id) LEFT JOIN spent s USING (account_id)
        WHERE b.kind = 'client' AND b.balance <> COALESCE(d.amount, 0) - COALESCE(s.amount, 0)""",
     "client {name} ({account_id})", "balance {balance} != credited {deposited} - sessions' cost {spent}"),
    ("balances = sum of entries", """
        WITH earned AS (SELECT c.peer_id, sum(c.earnings) AS amount FROM far_session_contributions c
                        JOIN far_mesh_sessions s ON s.request_id = c.request_id AND s.account_id IS NOT NULL
                        GROUP BY c.peer_id),
             paid AS (SELECT i.peer_id, sum(i.amount) AS amount FROM far_payment_item_lines i
                      JOIN far_payment_batches l ON l.id = i.line_id AND l.status = 'paid' GROUP BY i.peer_id)
        SELECT b.peer_id, b.balance, COALESCE(earned.amount, 0) AS earned, COALESCE(paid.amount, 0) AS paid
        FROM far_account_balances b LEFT JOIN earned USING (peer_id) LEFT JOIN paid USING (peer_id)
        WHERE b.kind = 'node' AND b.balance <> COALESCE(earned.amount, 0) - COALESCE(paid.amount, 0)""",
     "node {peer_id}", "balance {balance} != earned {earned} - paid out {paid}"),
    ("balances = sum of entries", """
        SELECT b.name, b.balance, (SELECT COALESCE(sum(platform_fee), 0) FROM far_mesh_sessions) AS fees
        FROM far_account_balances b
        WHERE b.kind = 'platform' AND b.balance <> (SELECT COALESCE(sum(platform_fee), 0) FROM far_mesh_sessions)""",
     "platform account {name}", "balance {balance} != sessions' fees {fees}"),
    ("balances = sum of entries", """
        SELECT b.name, b.balance,
               (SELECT COALESCE(sum(amount), 0) FROM far_payment_batches WHERE status = 'paid') AS paid
        FROM far_account_balances b
        WHERE b.kind = 'external' AND b.name = 'payouts'
          AND b.balance <> (SELECT COALESCE(sum(amount), 0) FROM far_payment_batches WHERE status = 'paid')""",
     "external account {name}", "balance {balance} != paid batch lines {paid}"),
    ("balances = sum of entries", """
        SELECT kind, name, account_id, balance FROM far_account_balances
        WHERE kind IN ('client', 'node', 'platform') AND balance < 0""",
     "{kind} {name} ({account_id})", "balance {balance} is below zero"),

    ("reservations consistent", """
        SELECT r.request_id, r.amount, r.max_tokens, r.price_per_token FROM far_reservations r
        WHERE r.amount <> r.max_tokens * r.price_per_token""",
     "reservation {request_id}", "holds {amount} != {max_tokens} tokens x {price_per_token}"),
    ("reservations consistent", """
        SELECT r.request_id, r.status, s.status AS session_status, r.charged, s.cost, r.amount,
               r.account_id, s.account_id AS session_account, r.price_per_token, s.price_per_token AS session_price,
               r.max_tokens, s.completion_tokens, r.settlement_txn, s.event_id, r.platform_fee_rate, s.platform_fee
        FROM far_reservations r JOIN far_mesh_sessions s USING (request_id)
        WHERE r.status = 'open' OR r.charged IS DISTINCT FROM s.cost OR s.cost > r.amount
           OR r.account_id IS DISTINCT FROM s.account_id OR r.price_per_token <> s.price_per_token
           OR s.completion_tokens > r.max_tokens OR r.settlement_txn IS DISTINCT FROM s.event_id
           OR (r.status = 'settled') <> (s.status = 'completed')
           OR (COALESCE(s.platform_fee, 0) <> trunc(s.cost * r.platform_fee_rate, 18)
               AND NOT (s.platform_fee = s.cost AND NOT EXISTS (
                   SELECT 1 FROM far_session_contributions c WHERE c.request_id = s.request_id
                   AND c.tokens_processed > 0)))""",
     "reservation {request_id}",
     "{status} (session {session_status}), held {amount} on {account_id} at {price_per_token} for {max_tokens} "
     "tokens with fee rate {platform_fee_rate}; session cost {cost} (fee {platform_fee}) on {session_account} at "
     "{session_price} for {completion_tokens} tokens, charged {charged} by {settlement_txn} (session event {event_id})"),
    ("reservations consistent", """
        SELECT r.request_id, r.status, r.settlement_txn FROM far_reservations r
        LEFT JOIN far_mesh_sessions s USING (request_id)
        WHERE s.request_id IS NULL AND (r.status = 'settled' OR r.settlement_txn IS NOT NULL)""",
     "reservation {request_id}", "{status} by {settlement_txn} but no session is recorded"),
    ("reservations consistent", """
        SELECT s.request_id, s.account_id FROM far_mesh_sessions s LEFT JOIN far_reservations r USING (request_id)
        WHERE s.account_id IS NOT NULL AND r.request_id IS NULL""",
     "session {request_id}", "was settled on {account_id} without a reservation"),

    ("payment batches", """
        SELECT l.id, l.week, l.wallet, l.amount, l.contributions, COALESCE(sum(i.amount), 0) AS items,
               count(i.contribution_id) AS n
        FROM far_payment_batches l LEFT JOIN far_payment_item_lines i ON i.line_id = l.id
        WHERE l.status <> 'open'
        GROUP BY l.id HAVING l.amount <> COALESCE(sum(i.amount), 0) OR l.contributions <> count(i.contribution_id)""",
     "line {id} ({week}, {wallet})", "amount {amount} / {contributions} contributions != items {items} / {n}"),
    ("payment batches", """
        SELECT i.contribution_id, i.peer_id, i.amount, c.peer_id AS ledger_peer, c.earnings, l.id AS line
        FROM far_payment_item_lines i JOIN far_payment_batches l ON l.id = i.line_id
        LEFT JOIN far_session_contributions c ON c.event_id = i.contribution_id
        WHERE c.event_id IS NULL OR c.peer_id <> i.peer_id OR c.earnings <> i.amount""",
     "paid item {contribution_id} (line {line})",
     "pays {peer_id} {amount}; the ledger recorded {ledger_peer} earning {earnings}"),
    ("payment batches", """
        SELECT i.contribution_id, i.week, l.week AS line_week, l.id FROM far_payment_item_lines i
        JOIN far_payment_batches l ON l.id = i.line_id WHERE i.week > l.week""",
     "item {contribution_id}", "work of {week} paid by line {id} of the earlier week {line_week}"),
    ("payment batches", """
        SELECT contribution_id, count(*) AS n, string_agg(line_id::text, ', ' ORDER BY line_id) AS lines
        FROM far_payment_item_lines GROUP BY contribution_id HAVING count(*) > 1""",
     "item {contribution_id}", "paid by {n} lines: {lines}"),
    ("payment batches", """
        SELECT id, wallet, week, through_seq, prev_id, prev_week, prev_through_seq FROM (
            SELECT id, wallet, week, through_seq, lag(id) OVER w AS prev_id, lag(week) OVER w AS prev_week,
                   lag(through_seq) OVER w AS prev_through_seq
            FROM far_payment_batches WHERE through_seq IS NOT NULL WINDOW w AS (PARTITION BY wallet ORDER BY week)) l
        WHERE through_seq < prev_through_seq
           OR through_seq > (""" + ITEMS_HIGH_WATER + """)""",
     "line {id} ({week}, {wallet})",
     ("through_seq {through_seq} breaks the nesting of its wallet's lines (line {prev_id} of {prev_week} holds "
      "{prev_through_seq}) or exceeds the items' sequence")),
    ("payment batches", """
        SELECT w.week, w.total, w.lines, COALESCE(sum(l.amount), 0) AS amount, count(l.id) AS n
        FROM far_payment_weeks w LEFT JOIN far_payment_batches l ON l.week = w.week AND l.status <> 'open'
        GROUP BY w.week HAVING w.total <> COALESCE(sum(l.amount), 0) OR w.lines <> count(l.id)""",
     "week {week}", "total {total} in {lines} lines != lines' sum {amount} in {n} lines"),
]


async def audit(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[list[str], list[Break]]:
    """(the checks run, every break found). Runs in one repeatable-read snapshot when given a connection."""
    breaks: list[Break] = []
    names: list[str] = []
    for check, query, subject, detail in CHECKS:
        if check not in names:
            names.append(check)
        for row in await conn.fetch(query):
            values = {k: _d(v) for k, v in dict(row).items()}
            breaks.append(Break(check, subject.format(**values), detail.format(**values)))
    return names, breaks


async def run_audit(database_url: str) -> tuple[list[str], list[Break]]:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await audit(conn)
    finally:
        await conn.close()
