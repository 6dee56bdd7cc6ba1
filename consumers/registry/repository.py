"""PostgreSQL adapter of the node registry (asyncpg): the consumer's writes and the discovery API's reads."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from consumers.registry.rules import NodeRow, StateChange

_SELECT_ROWS = f"""
SELECT {", ".join(NodeRow.COLUMNS)} FROM far_nodes WHERE peer_id = ANY($1::text[]) ORDER BY peer_id FOR UPDATE
"""

_UPSERT = f"""
INSERT INTO far_nodes ({", ".join(NodeRow.COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(NodeRow.COLUMNS) + 1))})
ON CONFLICT (peer_id) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in NodeRow.COLUMNS if c != "peer_id")}
"""

_INSERT_CHANGE = """
INSERT INTO far_node_state_changes (peer_id, from_state, to_state, at, event_id, reason)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (event_id) DO NOTHING
"""


def _row(record: asyncpg.Record) -> NodeRow:
    values = dict(record)
    if isinstance(values["device"], str):
        values["device"] = json.loads(values["device"])
    return NodeRow(**values)


async def lock_rows(conn: asyncpg.Connection, peer_ids: Iterable[str]) -> dict[str, NodeRow]:
    """The rows of these peers, locked until the transaction ends (in peer order: no deadlocks)."""
    rows = await conn.fetch(_SELECT_ROWS, sorted(set(peer_ids)))
    return {r["peer_id"]: _row(r) for r in rows}


async def save(conn: asyncpg.Connection, rows: Sequence[NodeRow], changes: Sequence[StateChange]) -> None:
    """Upsert the changed rows, then append their state changes (idempotent by event id)."""
    if rows:
        await conn.executemany(_UPSERT, [_db_values(r) for r in rows])
    if changes:
        await conn.executemany(_INSERT_CHANGE, [(c.peer_id, c.from_state, c.to_state, c.at, c.event_id, c.reason)
                                                for c in changes])


def _db_values(row: NodeRow) -> tuple[Any, ...]:
    return tuple(json.dumps(v) if c == "device" else v for c, v in zip(NodeRow.COLUMNS, row.values(), strict=True))


async def due_for_timeout(conn: asyncpg.Connection | asyncpg.Pool, seen_before: datetime) -> list[asyncpg.Record]:
    """Live nodes (joining/online/draining) whose last accepted heartbeat entered the log before `seen_before`."""
    return await conn.fetch(
        "SELECT peer_id, last_heartbeat_id, last_seen FROM far_nodes "
        "WHERE state IN ('joining', 'online', 'draining') AND last_seen < $1 ORDER BY peer_id",
        seen_before,
    )


# --------------------------------------------------------------------------------------------- discovery


async def snapshot(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The whole registry as plain values, for comparing a rebuilt registry with the live one.

    Rows in key order; a state change without its surrogate id and wall-clock recorded_at.
    """
    nodes = [dict(r) for r in await conn.fetch(f"SELECT {', '.join(NodeRow.COLUMNS)} FROM far_nodes ORDER BY peer_id")]
    for node in nodes:
        if isinstance(node["device"], str):
            node["device"] = json.loads(node["device"])
    changes = [dict(r) for r in await conn.fetch(
        "SELECT peer_id, from_state, to_state, at, event_id, reason FROM far_node_state_changes ORDER BY peer_id, id")]
    return nodes, changes


# ------------------------------------------------------------------------------------------------ the port


class PostgresNodes:
    """The registry group's `NodeStore` (consumers/registry/ports.py) on a PostgreSQL pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Rows]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield _Rows(conn)

    async def due_for_timeout(self, seen_before: datetime) -> list[asyncpg.Record]:
        return await due_for_timeout(self.pool, seen_before)

    async def count_by_state(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in await self.pool.fetch(
            "SELECT state, count(*) AS n FROM far_nodes GROUP BY state")}


class _Rows:
    """`NodeRows` on the connection of an open transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock(self, peer_ids: Iterable[str]) -> dict[str, NodeRow]:
        return await lock_rows(self.conn, peer_ids)

    async def save(self, rows: Sequence[NodeRow], changes: Sequence[StateChange]) -> None:
        await save(self.conn, rows, changes)
