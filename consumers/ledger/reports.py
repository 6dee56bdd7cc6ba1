"""`farmesh report usage --by model|node|day`: usage and earnings tables from the live ledger."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from schemas import money

_WINDOW = "($1::timestamptz IS NULL OR s.finished_at >= $1) AND ($2::timestamptz IS NULL OR s.finished_at < $2)"

QUERIES = {
    "model": f"""
        SELECT s.model, count(*) AS sessions, count(*) FILTER (WHERE s.status = 'completed') AS completed,
               count(*) FILTER (WHERE s.status = 'failed') AS failed,
               count(*) FILTER (WHERE s.status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE s.status = 'expired') AS expired, count(DISTINCT s.account_id) AS clients,
               sum(s.prompt_tokens)::bigint AS prompt_tokens, sum(s.completion_tokens)::bigint AS completion_tokens,
               sum(s.cost) AS charged_far, sum(COALESCE(s.platform_fee, 0)) AS fees_far,
               sum(s.cost - COALESCE(s.platform_fee, 0)) AS node_earnings_far
        FROM far_mesh_sessions s WHERE {_WINDOW} GROUP BY s.model ORDER BY s.model""",
    "node": f"""
        SELECT c.peer_id, n.wallet, count(DISTINCT c.request_id) AS sessions,
               string_agg(DISTINCT c.start_block || ':' || c.end_block, ' ') AS blocks,
               sum(c.tokens_processed)::bigint AS tokens_processed,
               sum((c.end_block - c.start_block)::bigint * c.tokens_processed)::bigint AS block_tokens,
               sum(c.earnings) AS earnings_far,
               COALESCE(sum(c.earnings) FILTER (WHERE l.status = 'paid'), 0) AS paid_far,
               COALESCE(sum(c.earnings) FILTER (WHERE l.status = 'closed'), 0) AS batched_far,
               COALESCE(sum(c.earnings) FILTER (WHERE l.id IS NULL), 0) AS open_far
        FROM far_session_contributions c
        JOIN far_mesh_sessions s ON s.request_id = c.request_id
        LEFT JOIN far_nodes n ON n.peer_id = c.peer_id
        LEFT JOIN far_payment_item_lines i ON i.contribution_id = c.event_id
        LEFT JOIN far_payment_batches l ON l.id = i.line_id
        WHERE {_WINDOW} GROUP BY c.peer_id, n.wallet ORDER BY earnings_far DESC, c.peer_id""",
    "day": f"""
        SELECT to_char(s.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, count(*) AS sessions,
               count(*) FILTER (WHERE s.status = 'failed') AS failed,
               count(*) FILTER (WHERE s.status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE s.status = 'expired') AS expired, count(DISTINCT s.account_id) AS clients,
               sum(s.completion_tokens)::bigint AS completion_tokens, sum(s.cost) AS charged_far,
               sum(COALESCE(s.platform_fee, 0)) AS fees_far,
               sum(s.cost - COALESCE(s.platform_fee, 0)) AS node_earnings_far
        FROM far_mesh_sessions s WHERE {_WINDOW} GROUP BY 1 ORDER BY 1""",
}


async def usage(conn: asyncpg.Connection | asyncpg.Pool, by: str, since: datetime | None = None,
                until: datetime | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(QUERIES[by], since, until)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return money.text(value)
    return str(value)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{k: (_cell(v) if isinstance(v, Decimal) else v) for k, v in r.items()} for r in rows],
                          indent=2, default=str)
    if not rows:
        return "(no sessions)" if fmt == "table" else ""
    columns = list(rows[0])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(r[c]) if r[c] is not None else "" for c in columns] for r in rows])
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    totals = ["total"] + [
        _cell(sum((r[c] for r in rows if r[c] is not None), type(rows[0][c])()))
        if isinstance(rows[0][c], (int, Decimal)) and not c.endswith("clients") else ""
        for c in columns[1:]]
    widths = [max(len(c), *(len(row[i]) for row in cells + [totals])) for i, c in enumerate(columns)]
    numeric = [isinstance(rows[0][c], (int, Decimal)) for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells]
    if len(rows) > 1:
        out += [line(["-" * w for w in widths]), line(totals)]
    return "\n".join(out)


