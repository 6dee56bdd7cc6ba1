"""`farmesh replay --verify`: the replayed projections (schema far_replay) against the live ledger, compared in
PostgreSQL (FULL JOIN ... IS DISTINCT FROM), so memory holds the differences only."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from schemas import money

from consumers.ledger.replay import SCHEMA


_SCOPE = f"""
INSERT INTO replay_scope
SELECT request_id FROM far_mesh_sessions l
WHERE l.account_id IS NOT NULL
  AND ($1::timestamptz IS NULL OR l.finished_at >= $1
       OR EXISTS (SELECT 1 FROM {SCHEMA}.seen_outcomes s WHERE s.event_id = l.event_id))
UNION
SELECT r.request_id FROM {SCHEMA}.sessions r
WHERE $1::timestamptz IS NULL OR NOT EXISTS (
    SELECT 1 FROM far_mesh_sessions l WHERE l.request_id = r.request_id AND l.finished_at < $1
      AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.seen_outcomes s WHERE s.event_id = l.event_id))
"""


# (what, key, live query, replay query, compared columns) -- both queries restricted to the scope
_COMPARE: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    ("session", "request_id",
     "SELECT request_id, event_id, model, account_id, status, prompt_tokens, completion_tokens, price_per_token, "
     "cost, COALESCE(platform_fee, 0) AS platform_fee FROM far_mesh_sessions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT request_id, event_id, model, account_id, status, prompt_tokens, completion_tokens, price_per_token, "
     f"cost, platform_fee FROM {SCHEMA}.sessions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("event_id", "model", "account_id", "status", "prompt_tokens", "completion_tokens", "price_per_token", "cost",
      "platform_fee")),
    ("contribution", "event_id",
     "SELECT event_id, request_id, peer_id, start_block, end_block, tokens_processed, earnings "
     "FROM far_session_contributions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT event_id, request_id, peer_id, start_block, end_block, tokens_processed, earnings "
     f"FROM {SCHEMA}.contributions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("request_id", "peer_id", "start_block", "end_block", "tokens_processed", "earnings")),
    ("node earnings (ledger credits)", "peer_id",
     "SELECT a.peer_id, sum(e.amount) AS earnings FROM far_ledger_entries e "
     "JOIN far_accounts a ON a.account_id = e.account_id AND a.kind = 'node' "
     "JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement' "
     "WHERE e.side = 'credit' AND t.request_id IN (SELECT request_id FROM replay_scope) GROUP BY a.peer_id",
     f"SELECT peer_id, sum(earnings) AS earnings FROM {SCHEMA}.contributions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope) AND earnings > 0 GROUP BY peer_id",
     ("earnings",)),
    ("client charges (ledger debits)", "account_id",
     "SELECT e.account_id, sum(e.amount) AS cost FROM far_ledger_entries e "
     "JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement' "
     "WHERE e.side = 'debit' AND t.request_id IN (SELECT request_id FROM replay_scope) GROUP BY e.account_id",
     f"SELECT account_id, sum(cost) AS cost FROM {SCHEMA}.sessions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope) AND cost > 0 GROUP BY account_id",
     ("cost",)),
    ("payable item (payments group)", "contribution_id",
     "SELECT contribution_id, request_id, peer_id, amount FROM far_payment_items "
     "WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT event_id AS contribution_id, request_id, peer_id, earnings AS amount FROM {SCHEMA}.contributions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("request_id", "peer_id", "amount")),
]


def _show(value: Any) -> str:
    return money.text(value) if isinstance(value, Decimal) else str(value)


def _differing(key: str, live_sql: str, replay_sql: str, columns: tuple[str, ...]) -> str:
    """The rows that differ between the two queries (only on one side, or a compared column not equal),
    found by the database: neither side is loaded into memory."""
    sides = ", ".join(f"l.{c} AS live_{c}, r.{c} AS replay_{c}" for c in columns)
    changed = " OR ".join(f"l.{c} IS DISTINCT FROM r.{c}" for c in columns)
    return (f"SELECT COALESCE(l.{key}, r.{key}) AS k, l.{key} IS NOT NULL AS in_live, r.{key} IS NOT NULL AS in_replay, "
            f"{sides} FROM ({live_sql}) l FULL JOIN ({replay_sql}) r ON l.{key} = r.{key} "
            f"WHERE l.{key} IS NULL OR r.{key} IS NULL OR {changed} "
            f"ORDER BY COALESCE(l.{key}, r.{key})::text COLLATE \"C\"")


async def verify(conn: asyncpg.Connection, since: datetime | None = None) -> list[str]:
    """Every difference between the far_replay projections and the live ledger (empty: identical)."""
    differences: list[str] = []
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("CREATE TEMP TABLE replay_scope (request_id TEXT PRIMARY KEY) ON COMMIT DROP")
        await conn.execute(_SCOPE, since)
        await conn.execute("ANALYZE replay_scope")  # a temporary table is never analyzed otherwise
        for what, key, live_sql, replay_sql, columns in _COMPARE:
            for row in await conn.fetch(_differing(key, live_sql, replay_sql, columns)):
                if not row["in_live"]:
                    differences.append(f"{what} {row['k']}: only in the replay ({_fields(row, 'replay', columns)})")
                elif not row["in_replay"]:
                    differences.append(f"{what} {row['k']}: only in the live ledger ({_fields(row, 'live', columns)})")
                else:
                    differences.append(f"{what} {row['k']}: " + ", ".join(
                        f"{c} live={_show(row['live_' + c])} replay={_show(row['replay_' + c])}"
                        for c in columns if row["live_" + c] != row["replay_" + c]))
    return differences


def _fields(row: asyncpg.Record, side: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c}={_show(row[side + '_' + c])}" for c in columns)
