"""PostgreSQL adapter of the node registry (asyncpg): the consumer's writes and the discovery API's reads."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import asyncpg

from db.views.coverage import NodeSpan
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

_NODE_COLUMNS = """
n.peer_id, n.wallet, n.model, n.start_block, n.end_block, n.total_blocks, n.throughput, n.state, n.version,
n.device, n.first_seen, n.last_seen, n.last_heartbeat_at, n.heartbeat_interval, n.state_changed_at,
n.online_since, n.uptime_seconds
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


async def online_peers(conn: asyncpg.Connection | asyncpg.Pool, model: str) -> set[str]:
    """Peer ids the registry knows as online for `model` (the inference worker prefers them)."""
    rows = await conn.fetch("SELECT peer_id FROM far_nodes WHERE state = 'online' AND model = $1", model)
    return {r["peer_id"] for r in rows}


# --------------------------------------------------------------------------------------------- discovery


def _uptime(record: dict[str, Any], now: datetime) -> float:
    current = 0.0
    if record["state"] == "online" and record["online_since"] is not None:
        current = max((now - record["online_since"]).total_seconds(), 0.0)
    return float(record["uptime_seconds"] or 0.0) + current


def _public(record: asyncpg.Record, now: datetime) -> dict[str, Any]:
    node = dict(record)
    if isinstance(node.get("device"), str):
        node["device"] = json.loads(node["device"])
    node["uptime_seconds"] = round(_uptime(node, now), 3)
    node["current_uptime_seconds"] = round(_uptime({**node, "uptime_seconds": 0.0}, now), 3)
    node.pop("online_since", None)
    return node


async def list_nodes(conn: asyncpg.Connection | asyncpg.Pool, model: str | None = None,
                     state: str | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {_NODE_COLUMNS} FROM far_nodes n "
        "WHERE ($1::text IS NULL OR n.model = $1) AND ($2::text IS NULL OR n.state = $2) "
        "ORDER BY n.model, n.start_block, n.peer_id",
        model, state,
    )
    now = datetime.now(timezone.utc)
    return [_public(r, now) for r in rows]


async def get_node(conn: asyncpg.Connection | asyncpg.Pool, peer_id: str, history: int = 50) -> dict[str, Any] | None:
    """A node with its work so far (from the ledger's contributions) and its latest state changes."""
    record = await conn.fetchrow(
        f"""SELECT {_NODE_COLUMNS},
                   COALESCE(w.tokens_served, 0) AS tokens_served,
                   COALESCE(w.sessions, 0) AS sessions,
                   COALESCE(w.earnings, 0) AS earnings,
                   COALESCE(w.unregistered_earnings, 0) AS unregistered_earnings
            FROM far_nodes n
            LEFT JOIN (SELECT peer_id, sum(tokens_processed) AS tokens_served,
                              count(DISTINCT request_id) AS sessions, sum(earnings) AS earnings,
                              sum(earnings) FILTER (WHERE unregistered) AS unregistered_earnings
                       FROM far_session_contributions WHERE peer_id = $1 GROUP BY peer_id) w
              ON w.peer_id = n.peer_id
            WHERE n.peer_id = $1""",
        peer_id,
    )
    if record is None:
        return None
    node = _public(record, datetime.now(timezone.utc))
    node["tokens_served"] = int(node["tokens_served"])
    node["earnings"] = Decimal(node["earnings"])
    # work recorded before the node's first valid heartbeat: no wallet, not paid
    node["unregistered_earnings"] = Decimal(node["unregistered_earnings"])
    changes = await conn.fetch(
        "SELECT from_state, to_state, at, reason, event_id FROM far_node_state_changes "
        "WHERE peer_id = $1 ORDER BY id DESC LIMIT $2",
        peer_id, history,
    )
    node["state_history"] = [dict(c) for c in reversed(changes)]
    return node


async def unregistered_work(conn: asyncpg.Connection | asyncpg.Pool, peer_id: str) -> dict[str, Any]:
    """Work recorded for a peer without a wallet (no valid heartbeat when it was recorded)."""
    record = await conn.fetchrow(
        "SELECT count(*) AS contributions, COALESCE(sum(tokens_processed), 0) AS tokens_served, "
        "COALESCE(sum(earnings), 0) AS earnings FROM far_session_contributions WHERE peer_id = $1 AND unregistered",
        peer_id,
    )
    return {"contributions": int(record["contributions"]), "tokens_served": int(record["tokens_served"]),
            "earnings": Decimal(record["earnings"])}


async def node_spans(conn: asyncpg.Connection | asyncpg.Pool) -> list[NodeSpan]:
    rows = await conn.fetch(
        "SELECT peer_id, model, start_block, end_block, total_blocks, throughput, state FROM far_nodes "
        "WHERE model IS NOT NULL AND start_block IS NOT NULL"
    )
    return [NodeSpan(r["peer_id"], r["model"], r["start_block"], r["end_block"], r["total_blocks"],
                     float(r["throughput"] or 0.0), r["state"]) for r in rows]


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
