"""The node registry as others read it (far_nodes, far_node_state_changes, and each node's work from the
ledger): the discovery API, the status page and the worker's route preference. Only the registry group writes
these tables (consumers/registry/repository.py)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import asyncpg

from db.views.coverage import NodeSpan


_NODE_COLUMNS = """
n.peer_id, n.wallet, n.model, n.start_block, n.end_block, n.total_blocks, n.throughput, n.state, n.version,
n.device, n.first_seen, n.last_seen, n.last_heartbeat_at, n.heartbeat_interval, n.state_changed_at,
n.online_since, n.uptime_seconds
"""


async def online_peers(conn: asyncpg.Connection | asyncpg.Pool, model: str) -> set[str]:
    """Peer ids the registry knows as online for `model` (the inference worker prefers them)."""
    rows = await conn.fetch("SELECT peer_id FROM far_nodes WHERE state = 'online' AND model = $1", model)
    return {r["peer_id"] for r in rows}


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
