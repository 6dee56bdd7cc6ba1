"""What a client account has, holds and spent, read from the ledger (the gateway's /api/account, /api/usage and the
admin API's views of any account). Nothing here writes; amounts are NUMERIC (exact Decimal FAR).

- balance:  the sum of the account's entries (credits - debits), open reservations beside it;
- credits:  the deposits posted to it (with the caller's credit id when the admin API gave one);
- usage:    its settled sessions, from the settlement transactions and their debit entries, grouped by day (UTC),
            model or key; spent is exactly what the ledger debited the account;
- keys:     its keys with their limits and what each used this minute and this month (migration 009).
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import asyncpg

GroupBy = Literal["day", "model", "key"]

_GROUPS = {
    "day": "to_char(t.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "s.model",
    "key": "COALESCE(k.prefix, '-')",
}

_BALANCE = """
SELECT a.account_id, a.name, a.created_at,
       (SELECT COALESCE(sum(CASE WHEN e.side = 'credit' THEN e.amount ELSE -e.amount END), 0)
          FROM far_ledger_entries e WHERE e.account_id = a.account_id) AS balance,
       (SELECT COALESCE(sum(r.amount), 0) FROM far_reservations r
         WHERE r.account_id = a.account_id AND r.status = 'open') AS reserved
FROM far_accounts a WHERE a.account_id = $1 AND a.kind = 'client'
"""


async def balance(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID) -> dict[str, Any] | None:
    """{account_id, name, created_at, balance, reserved, available} in one snapshot; None: no such client."""
    row = await conn.fetchrow(_BALANCE, account_id)
    if row is None:
        return None
    return {**dict(row), "available": row["balance"] - row["reserved"]}


async def credits(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, limit: int = 50) -> list[dict[str, Any]]:
    """The deposits credited to the account, newest first."""
    rows = await conn.fetch(
        """SELECT t.txn_id, c.credit_id, e.amount, t.occurred_at, t.description
           FROM far_ledger_entries e JOIN far_ledger_transactions t USING (txn_id)
           LEFT JOIN far_credits c ON c.txn_id = t.txn_id
           WHERE e.account_id = $1 AND e.side = 'credit' AND t.kind = 'deposit'
           ORDER BY t.occurred_at DESC, t.txn_id LIMIT $2""", account_id, limit)
    return [dict(r) for r in rows]


_KEYS = """
SELECT k.account_id, k.key_id, k.prefix, k.created_at, k.revoked_at, k.requests_per_minute, k.tokens_per_minute, k.monthly_budget,
       COALESCE(c.requests, 0) AS requests_this_minute, COALESCE(c.tokens, 0) AS tokens_this_minute,
       (SELECT COALESCE(sum(CASE WHEN r.status = 'open' THEN r.amount ELSE COALESCE(r.charged, 0) END), 0)
          FROM far_reservations r
         WHERE r.key_id = k.key_id AND r.created_at >= date_trunc('month', now(), 'UTC')) AS spent_this_month
FROM far_api_keys k
LEFT JOIN far_rate_counters c ON c.key_id = k.key_id AND c.window_start = date_trunc('minute', now(), 'UTC')
WHERE k.account_id = ANY($1::uuid[])
ORDER BY k.created_at, k.prefix
"""


async def keys(conn: asyncpg.Connection | asyncpg.Pool, account_ids: list[UUID]) -> dict[UUID, list[dict[str, Any]]]:
    """account id -> its keys: prefix, dates, limits, what each used this minute and this month."""
    out: dict[UUID, list[dict[str, Any]]] = {a: [] for a in account_ids}
    if not account_ids:
        return out
    rows = await conn.fetch(_KEYS, account_ids)
    for r in rows:
        out[r["account_id"]].append(dict(r))
    return out


async def key_of(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, prefix: str) -> dict[str, Any] | None:
    """One key of the account by its prefix (None: not this account's)."""
    for k in (await keys(conn, [account_id]))[account_id]:
        if k["prefix"] == prefix:
            return k
    return None


async def usage(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, since: datetime, until: datetime,
                group_by: GroupBy, key_id: UUID | None = None) -> list[dict[str, Any]]:
    """The account's settled sessions in [since, until) (by settlement time) grouped by day (UTC), model or key:
    sessions, prompt and completion tokens, and spent: the ledger's debits of the account for them."""
    group = _GROUPS[group_by]
    rows = await conn.fetch(
        f"""SELECT {group} AS grp, count(*) AS sessions, COALESCE(sum(s.prompt_tokens), 0) AS prompt_tokens,
                   COALESCE(sum(s.completion_tokens), 0) AS completion_tokens, COALESCE(sum(e.amount), 0) AS spent
            FROM far_mesh_sessions s
            JOIN far_ledger_transactions t ON t.request_id = s.request_id AND t.kind = 'settlement'
            LEFT JOIN far_ledger_entries e ON e.txn_id = t.txn_id AND e.account_id = $1 AND e.side = 'debit'
            LEFT JOIN far_reservations r ON r.request_id = s.request_id
            LEFT JOIN far_api_keys k ON k.key_id = r.key_id
            WHERE s.account_id = $1 AND t.occurred_at >= $2 AND t.occurred_at < $3
              AND ($4::uuid IS NULL OR r.key_id = $4)
            GROUP BY grp ORDER BY grp""", account_id, since, until, key_id)
    return [dict(r) for r in rows]


async def sessions(conn: asyncpg.Connection | asyncpg.Pool, account_id: UUID, limit: int) -> list[dict[str, Any]]:
    """The account's most recent recorded sessions with what each cost it (the ledger's debit)."""
    rows = await conn.fetch(
        """SELECT s.request_id, s.model, s.status, s.prompt_tokens, s.completion_tokens, s.finished_at, k.prefix,
                  COALESCE((SELECT sum(e.amount) FROM far_ledger_transactions t
                            JOIN far_ledger_entries e ON e.txn_id = t.txn_id AND e.account_id = $1 AND e.side = 'debit'
                            WHERE t.request_id = s.request_id AND t.kind = 'settlement'), 0) AS cost
           FROM far_mesh_sessions s
           LEFT JOIN far_reservations r ON r.request_id = s.request_id
           LEFT JOIN far_api_keys k ON k.key_id = r.key_id
           WHERE s.account_id = $1
           ORDER BY s.finished_at DESC NULLS LAST, s.request_id LIMIT $2""", account_id, limit)
    return [dict(r) for r in rows]


async def clients(conn: asyncpg.Connection | asyncpg.Pool, limit: int, offset: int) -> list[dict[str, Any]]:
    """Client accounts by name, a page of them, each with its balance and open reservations."""
    rows = await conn.fetch(
        _BALANCE.replace("WHERE a.account_id = $1 AND a.kind = 'client'",
                         "WHERE a.kind = 'client' ORDER BY a.name LIMIT $1 OFFSET $2"), limit, offset)
    return [{**dict(r), "available": r["balance"] - r["reserved"]} for r in rows]


def total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"sessions": sum(r["sessions"] for r in rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "spent": sum((r["spent"] for r in rows), Decimal(0))}
