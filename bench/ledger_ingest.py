"""Ledger ingest of contributions vs a raw asyncpg COPY of the same rows.

The ledger side is the consumer's own code path (consumers/ledger/consumer.py `record`): per consumer
batch of 500 Kafka records, parse them (farmesh.kafka.batches.outcomes_of), then in one transaction check
money, accounts and reservations (acceptance.judge, on facts read with the reservations locked) and write sessions, contributions, settlement postings and closed
reservations (consumers.ledger.repository.settle, the adapter of the handler's LedgerStore). The records are
the bytes the worker publishes (one inference.completed + one node.contribution per node). Then the same
records again: idempotent, the ledger must not change.

Baseline: exactly the rows the ledger ended up writing (read back from its database: the node accounts,
far_mesh_sessions, far_session_contributions, far_ledger_transactions, far_ledger_entries) loaded with
`copy_records_to_table`, plus the reservations closed by one `UPDATE ... FROM unnest`, in one transaction,
into a SECOND scratch database migrated the same way (db/migrate.py: same indexes, foreign keys, checks)
and prepared the same way (client account and its deposit, nodes, open reservations). For transparency the
old figure is printed too: COPY of the contribution rows alone into an index-less table.

    python -m bench.ledger_ingest [--sessions 10000]

ratio = ledger contributions/s / baseline contributions/s (same contributions)   (target >= 0.5)
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg

from bench._common import Target, finish, ratio, say, scratch_database, stopwatch
from bench._sessions import PEERS, PRICE, Record, reserve_all, session_events, wire
from consumers.ledger.repository import settle
from farmesh.kafka.batches import outcomes_of
from farmesh.billing import accounts
from schemas import money
from schemas import topics
from schemas.events import InferenceCompleted

TARGET = Target(0.5)
BATCH = 500  # the ledger subscriber's max_records

_COPY_TABLE = """CREATE TABLE bench_copy_contributions (event_id UUID, request_id TEXT, model TEXT, peer_id TEXT,
    wallet TEXT, start_block INT, end_block INT, tokens_processed INT, earnings NUMERIC(38,18), occurred_at TIMESTAMPTZ)"""

# What the ledger writes, table by table, in the order a COPY must load it (foreign keys): (table, columns, which rows).
# Columns the ledger leaves to their defaults (serial ids, recorded_at) are left to them here too.
WRITTEN: list[tuple[str, tuple[str, ...], str]] = [
    ("far_accounts", ("account_id", "kind", "name", "peer_id"), "kind = 'node'"),
    ("far_mesh_sessions", ("request_id", "event_id", "model", "status", "prompt_tokens", "completion_tokens",
                           "completion", "finish_reason", "error", "price_per_token", "cost", "started_at",
                           "finished_at", "worker", "account_id", "platform_fee"), "true"),
    ("far_session_contributions", ("event_id", "request_id", "model", "peer_id", "wallet", "start_block", "end_block",
                                   "tokens_processed", "earnings", "occurred_at"), "true"),
    ("far_ledger_transactions", ("txn_id", "kind", "request_id", "description", "occurred_at"), "kind = 'settlement'"),
    ("far_ledger_entries", ("txn_id", "account_id", "side", "amount", "contribution_id"),
     "txn_id IN (SELECT txn_id FROM far_ledger_transactions WHERE kind = 'settlement')"),
]
_CLOSED = ("SELECT request_id, status, charged, settlement_txn, reason FROM far_reservations "
           "WHERE status <> 'open' ORDER BY request_id")
_CLOSE_RESERVATIONS = """
UPDATE far_reservations r
SET status = u.status, charged = u.charged, settlement_txn = u.txn, closed_at = now(), reason = u.reason
FROM unnest($1::text[], $2::text[], $3::numeric[], $4::uuid[], $5::text[]) AS u(request_id, status, charged, txn, reason)
WHERE r.request_id = u.request_id
"""


async def ingest(conn: asyncpg.Connection, records: list[Record]) -> tuple[int, int]:
    """consumers/ledger/consumer.py `record`, batch by batch: (contributions written, duplicates)."""
    written = duplicates = 0
    for start in range(0, len(records), BATCH):
        message = SimpleNamespace(raw_message=records[start:start + BATCH])
        _, outcomes, _ = await outcomes_of(None, topics.GROUP_LEDGER, message)
        settled = await settle(conn, outcomes)
        if settled.rejected:
            raise RuntimeError(f"the ledger rejected bench outcomes: {list(settled.rejected.values())[:3]}")
        result = settled.recorded
        written += result.contributions
        duplicates += result.duplicates
    return written, duplicates


async def prepare(conn: asyncpg.Connection, account_id: uuid.UUID, request_ids: list[str], sessions: int) -> None:
    """The state before the first record: the client account with its credit, the nodes, the open reservations."""
    await conn.execute("INSERT INTO far_accounts (account_id, kind, name) VALUES ($1, 'client', 'bench')", account_id)
    await accounts.deposit(conn, account_id, money.to_base_units(PRICE) * 64 * sessions, description="opening credit")
    await conn.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                           [(p, f"0xWALLET{n}") for n, p in enumerate(PEERS)])
    # What the gateway held for each request before publishing it (the ledger judges the outcomes on these and
    # closes them).
    await reserve_all(conn, account_id, request_ids)


async def written_rows(conn: asyncpg.Connection) -> tuple[dict[str, list[Any]], list[Any]]:
    """What the ledger wrote (table -> rows in insertion order), and the reservations it closed."""
    tables = {table: await conn.fetch(f"SELECT {', '.join(columns)} FROM {table} WHERE {where} ORDER BY ctid")
              for table, columns, where in WRITTEN}
    return tables, await conn.fetch(_CLOSED)


async def copy_baseline(conn: asyncpg.Connection, tables: dict[str, list[Any]], closed: list[Any]) -> None:
    """The same rows, loaded raw: one copy_records_to_table per table and one UPDATE, one transaction."""
    async with conn.transaction():
        for table, columns, _ in WRITTEN:
            await conn.copy_records_to_table(table, records=tables[table], columns=columns)
        await conn.execute(_CLOSE_RESERVATIONS, *([list(c) for c in zip(*closed)] if closed else [[]] * 5))


async def main(sessions: int) -> int:
    account_id = uuid.uuid4()
    events = [e for i in range(sessions) for e in session_events(i, account_id)]
    outcomes = [e for e in events if isinstance(e, InferenceCompleted)]
    request_ids = [o.request_id for o in outcomes]
    records = [Record(topics.SESSIONS.name, 0, n, e.request_id.encode(), wire(e)) for n, e in enumerate(events)]
    contributions = [(c.contribution_id, o.request_id, o.model, c.peer_id, None, c.start_block, c.end_block,
                      c.tokens_processed, c.earnings_far, o.finished_at) for o in outcomes for c in o.contributions]
    del events, outcomes
    gc.collect()
    gc.freeze()  # the bench's own 30k setup events are not the consumer's: keep them out of the collector's scans
    async with scratch_database("farmesh_bench_ledger") as url, scratch_database("farmesh_bench_copy") as copy_url:
        conn, copy_conn = await asyncpg.connect(url), await asyncpg.connect(copy_url)
        try:
            await prepare(conn, account_id, request_ids, sessions)
            await prepare(copy_conn, account_id, request_ids, sessions)
            await copy_conn.execute(_COPY_TABLE)

            with stopwatch() as ledger_t:
                written, _ = await ingest(conn, records)
            before = await conn.fetchval("SELECT count(*) FROM far_ledger_entries")
            with stopwatch() as again_t:
                rewritten, duplicates = await ingest(conn, records)
            after = await conn.fetchval("SELECT count(*) FROM far_ledger_entries")

            tables, closed = await written_rows(conn)
            with stopwatch() as copy_t:
                await copy_baseline(copy_conn, tables, closed)
            with stopwatch() as bare_t:
                await copy_conn.copy_records_to_table("bench_copy_contributions", records=contributions)
            for table, _, where in [*WRITTEN, ("far_reservations", (), "status <> 'open'")]:
                counts = [await c.fetchval(f"SELECT count(*) FROM {table} WHERE {where}") for c in (conn, copy_conn)]
                if counts[0] != counts[1]:
                    raise SystemExit(f"{table}: the baseline has {counts[1]} rows, the ledger wrote {counts[0]}")
        finally:
            await conn.close()
            await copy_conn.close()
    if written != len(contributions) or rewritten != 0 or duplicates != len(request_ids) or before != after:
        raise SystemExit(f"ledger wrote {written}/{len(contributions)} contributions, then {rewritten} again "
                         f"({duplicates} duplicates, entries {before} -> {after})")
    rows = sum(len(v) for v in tables.values())
    copy_rate, ledger_rate = written / copy_t[0], written / ledger_t[0]
    say(f"sessions={sessions} records={len(records)} contributions={written} batch={BATCH}")
    say(f"ledger: {ledger_t[0]:.3f} s, {ledger_rate:,.0f} contributions/s "
        f"({len(request_ids) / ledger_t[0]:,.0f} sessions/s, with settlement postings and reservations)")
    say(f"ledger again (same records, idempotent: nothing written): {again_t[0]:.3f} s, "
        f"{len(records) / again_t[0]:,.0f} records/s")
    say(f"baseline COPY of the rows the ledger wrote ({rows:,} rows: "
        + ", ".join(f"{t} {len(v):,}" for t, v in tables.items())
        + f"; UPDATE of {len(closed):,} reservations) into the same migrated schema: {copy_t[0]:.3f} s, "
          f"{copy_rate:,.0f} contributions/s")
    say(f"(old baseline, for reference: COPY of the {len(contributions):,} contribution rows alone into an index-less "
        f"table: {bare_t[0]:.3f} s, {len(contributions) / bare_t[0]:,.0f} rows/s, ratio "
        f"{ratio(ledger_rate, len(contributions) / bare_t[0]):.3f})")
    return finish(ratio(ledger_rate, copy_rate), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    raise SystemExit(asyncio.run(main(parser.parse_args().sessions)))
