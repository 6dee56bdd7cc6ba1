"""PostgreSQL adapter of the session ledger (asyncpg, set-based writes per consumer batch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import asyncpg

from schemas.events import InferenceCompleted, SessionOutcome

_INSERT_SESSIONS = """
INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens,
    completion, finish_reason, error, price_per_token, cost, started_at, finished_at, worker)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[],
    $8::text[], $9::text[], $10::numeric[], $11::numeric[], $12::timestamptz[], $13::timestamptz[], $14::text[])
ON CONFLICT (request_id) DO NOTHING
RETURNING event_id
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
        (o.request_id, o.event_id, o.model, "completed" if isinstance(o, InferenceCompleted) else "failed",
         o.prompt_tokens, o.completion_tokens, o.completion,
         o.finish_reason if isinstance(o, InferenceCompleted) else None,
         None if isinstance(o, InferenceCompleted) else o.error,
         o.price_per_token, o.cost_far, o.started_at, o.finished_at, o.worker)
        for o in outcomes
    ]
    async with conn.transaction():
        inserted = {r["event_id"] for r in await conn.fetch(_INSERT_SESSIONS, *_columns(session_rows))}
        contribution_rows = [
            (c.contribution_id, o.request_id, o.model, c.peer_id, c.start_block, c.end_block,
             c.tokens_processed, c.earnings_far, o.finished_at)
            for o in outcomes if o.event_id in inserted for c in o.contributions
        ]
        status = await conn.execute(_INSERT_CONTRIBUTIONS, *_columns(contribution_rows)) if contribution_rows else "INSERT 0 0"
    return Recorded(len(inserted), int(status.split()[-1]), len(outcomes) - len(inserted))


async def fetch_session(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    if row is None:
        return None
    contributions = await conn.fetch(
        "SELECT * FROM far_session_contributions WHERE request_id = $1 ORDER BY start_block, peer_id", request_id,
    )
    return {**dict(row), "contributions": [dict(c) for c in contributions]}
