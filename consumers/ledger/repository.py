"""PostgreSQL adapter of the session ledger (asyncpg, set-based writes per consumer batch).

Per consumer batch, in ONE database transaction: the sessions (the first outcome of a request_id wins),
their contributions, and for each newly recorded session its settlement, a balanced posting keyed by the
outcome's event id:

    debit  client account    cost        (delivered tokens x price)
    credit node account      earnings    (one entry per contribution, keyed by its id)
    credit platform account  fee

and the request's reservation is closed (settled; released when the session failed: only delivered tokens
are charged). A redelivered or replayed event records and posts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import asyncpg

from farmesh import accounts
from schemas.events import Contribution, InferenceCompleted, SessionOutcome

_INSERT_SESSIONS = """
INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens,
    completion, finish_reason, error, price_per_token, cost, started_at, finished_at, worker, account_id,
    platform_fee)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[],
    $8::text[], $9::text[], $10::numeric[], $11::numeric[], $12::timestamptz[], $13::timestamptz[], $14::text[],
    $15::uuid[], $16::numeric[])
ON CONFLICT (request_id) DO NOTHING
RETURNING event_id
"""

_INSERT_NODE_ACCOUNTS = """
INSERT INTO far_accounts (account_id, kind, name, peer_id)
SELECT a, 'node', 'node ' || p, p FROM unnest($1::uuid[], $2::text[]) AS u(a, p)
ON CONFLICT DO NOTHING
"""

_INSERT_TRANSACTIONS = """
INSERT INTO far_ledger_transactions (txn_id, kind, request_id, description, occurred_at)
SELECT t, 'settlement', r, d, o FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS u(t, r, d, o)
ON CONFLICT DO NOTHING
RETURNING txn_id
"""

_INSERT_ENTRIES = """
INSERT INTO far_ledger_entries (txn_id, account_id, side, amount, contribution_id)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::numeric[], $5::uuid[])
"""

_CLOSE_RESERVATIONS = """
UPDATE far_reservations r
SET status = u.status, charged = u.charged, settlement_txn = u.txn, closed_at = now(), reason = u.reason
FROM unnest($1::text[], $2::text[], $3::numeric[], $4::uuid[], $5::text[]) AS u(request_id, status, charged, txn, reason)
WHERE r.request_id = u.request_id
"""

# The wallet is the one the registry knows for the peer when the work is recorded.
_INSERT_CONTRIBUTIONS = """
INSERT INTO far_session_contributions (event_id, request_id, model, peer_id, wallet, start_block, end_block,
    tokens_processed, earnings, occurred_at)
SELECT c.event_id, c.request_id, c.model, c.peer_id, n.wallet, c.start_block, c.end_block,
    c.tokens_processed, c.earnings, c.occurred_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::int[], $8::numeric[],
    $9::timestamptz[]) AS c(event_id, request_id, model, peer_id, start_block, end_block, tokens_processed,
    earnings, occurred_at)
LEFT JOIN far_nodes n ON n.peer_id = c.peer_id
ON CONFLICT (event_id) DO NOTHING
"""


@dataclass(frozen=True)
class Recorded:
    sessions: int
    contributions: int
    duplicates: int
    settled: int = 0
    released: int = 0
    # The contributions whose node credit this batch posted (not those of duplicates): for per-node metrics.
    credited: tuple[Contribution, ...] = ()


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows)] if rows else []


async def record_outcomes(conn: asyncpg.Connection, outcomes: Sequence[SessionOutcome]) -> Recorded:
    """Record sessions with their contributions in one transaction.

    The first outcome of a request wins; a later one (a redelivered request that ran again, or a
    replayed event) records nothing, so the ledger never changes on redelivery.
    """
    if not outcomes:
        return Recorded(0, 0, 0)
    session_rows = [
        (o.request_id, o.event_id, o.model, o.status,
         o.prompt_tokens, o.completion_tokens, o.completion,
         o.finish_reason if isinstance(o, InferenceCompleted) else None,
         None if isinstance(o, InferenceCompleted) else o.error,
         o.price_per_token, o.cost_far, o.started_at, o.finished_at, o.worker, o.account_id, o.platform_fee_far)
        for o in outcomes
    ]
    async with conn.transaction():
        inserted = {r["event_id"] for r in await conn.fetch(_INSERT_SESSIONS, *_columns(session_rows))}
        # One winner per recorded event id: the same outcome delivered twice in one batch counts once.
        winners = list({o.event_id: o for o in outcomes if o.event_id in inserted}.values())
        contribution_rows = [
            (c.contribution_id, o.request_id, o.model, c.peer_id, c.start_block, c.end_block,
             c.tokens_processed, c.earnings_far, o.finished_at)
            for o in winners for c in o.contributions
        ]
        status = await conn.execute(_INSERT_CONTRIBUTIONS, *_columns(contribution_rows)) if contribution_rows else "INSERT 0 0"
        settled, released, posted = await _settle(conn, winners)
    return Recorded(len(inserted), int(status.split()[-1]), len(outcomes) - len(inserted), settled, released,
                    _credited(winners, posted))


def _credited(winners: Sequence[SessionOutcome], posted: set[Any]) -> tuple[Contribution, ...]:
    """The contributions of the outcomes whose settlement this batch posted."""
    return tuple(c for o in winners if o.event_id in posted for c in o.contributions)


async def _settle(conn: asyncpg.Connection, winners: Sequence[SessionOutcome]) -> tuple[int, int, set[Any]]:
    """Post each new session's settlement and close its reservation (inside the caller's transaction).

    Returns (settled, released, the event ids whose settlement was posted now)."""
    if not winners:
        return 0, 0, set()
    peers = sorted({c.peer_id for o in winners for c in o.contributions})
    if peers:
        await conn.execute(_INSERT_NODE_ACCOUNTS, [accounts.node_account_id(p) for p in peers], peers)
    txns = [(o.event_id, o.request_id, f"{o.type} {o.completion_tokens} tokens", o.finished_at) for o in winners]
    posted = {r["txn_id"] for r in await conn.fetch(_INSERT_TRANSACTIONS, *_columns(txns))}
    entries: list[tuple[Any, ...]] = []
    for o in winners:
        if o.event_id not in posted:
            continue
        if o.cost_far > 0:
            entries.append((o.event_id, o.account_id, "debit", o.cost_far, None))
        entries += [(o.event_id, accounts.node_account_id(c.peer_id), "credit", c.earnings_far, c.contribution_id)
                    for c in o.contributions if c.earnings_far > 0]
        if o.platform_fee_far > 0:
            entries.append((o.event_id, accounts.PLATFORM_ACCOUNT, "credit", o.platform_fee_far, None))
    if entries:
        await conn.execute(_INSERT_ENTRIES, *_columns(entries))
    closing = [
        (o.request_id, "settled" if isinstance(o, InferenceCompleted) else "released", o.cost_far, o.event_id,
         None if isinstance(o, InferenceCompleted) else f"session {o.status}: charged {o.completion_tokens} delivered tokens")
        for o in winners if o.event_id in posted
    ]
    await conn.execute(_CLOSE_RESERVATIONS, *_columns(closing))
    settled = sum(1 for c in closing if c[1] == "settled")
    return settled, len(closing) - settled, posted


async def fetch_session(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    if row is None:
        return None
    contributions = await conn.fetch(
        "SELECT * FROM far_session_contributions WHERE request_id = $1 ORDER BY start_block, peer_id", request_id,
    )
    return {**dict(row), "contributions": [dict(c) for c in contributions]}
