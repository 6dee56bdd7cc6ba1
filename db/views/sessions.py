"""A session as the gateway reads it back: the far_mesh_sessions row and its contributions (written by the
ledger group only)."""
from __future__ import annotations

from typing import Any

import asyncpg


async def fetch_session(conn: asyncpg.Connection | asyncpg.Pool, request_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    if row is None:
        return None
    contributions = await conn.fetch(
        "SELECT * FROM far_session_contributions WHERE request_id = $1 ORDER BY start_block, peer_id", request_id,
    )
    return {**dict(row), "contributions": [dict(c) for c in contributions]}
