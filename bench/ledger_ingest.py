"""Ledger ingest of contributions vs a raw asyncpg COPY of the same rows.

The ledger side is the consumer's own code path (consumers/ledger/consumer.py `record`): per consumer
batch of 500 Kafka records, parse them (consumers.ledger.rules.outcomes_of), check money and accounts
(reject_reasons), write sessions, contributions, settlement postings and closed reservations in one
transaction (consumers.ledger.repository.record_outcomes). The records are the bytes the worker publishes
(one inference.completed + one node.contribution per node). Then the same records again: idempotent, the
ledger must not change. Baseline: copy_records_to_table of the same contribution rows into a scratch table.

    python -m bench.ledger_ingest [--sessions 10000]

ratio = ledger contributions/s / COPY rows/s   (target >= 0.5)
"""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import asyncpg

from bench._common import Target, finish, ratio, say, scratch_database, stopwatch
from bench._sessions import PEERS, PRICE, Record, session_events, wire
from consumers.ledger.repository import record_outcomes
from consumers.ledger.rules import outcomes_of, reject_reasons
from farmesh import accounts, money
from schemas import topics
from schemas.events import InferenceCompleted

TARGET = Target(0.5)
BATCH = 500  # the ledger subscriber's max_records

_COPY_TABLE = """CREATE TABLE bench_copy_contributions (event_id UUID, request_id TEXT, model TEXT, peer_id TEXT,
    wallet TEXT, start_block INT, end_block INT, tokens_processed INT, earnings NUMERIC(38,18), occurred_at TIMESTAMPTZ)"""


async def ingest(conn: asyncpg.Connection, records: list[Record]) -> tuple[int, int]:
    """consumers/ledger/consumer.py `record`, batch by batch: (contributions written, duplicates)."""
    written = duplicates = 0
    for start in range(0, len(records), BATCH):
        message = SimpleNamespace(raw_message=records[start:start + BATCH])
        _, outcomes, _ = await outcomes_of(None, topics.GROUP_LEDGER, message)
        rejected = await reject_reasons(conn, outcomes, "far_session_contributions", "event_id")
        if rejected:
            raise RuntimeError(f"the ledger rejected bench outcomes: {list(rejected.values())[:3]}")
        result = await record_outcomes(conn, outcomes)
        written += result.contributions
        duplicates += result.duplicates
    return written, duplicates


async def main(sessions: int) -> int:
    async with scratch_database("farmesh_bench_ledger") as url:
        conn = await asyncpg.connect(url)
        try:
            client = await accounts.create_client(conn, "bench", money.to_base_units(PRICE) * 64 * sessions)
            await conn.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                                   [(p, f"0xWALLET{n}") for n, p in enumerate(PEERS)])
            events = [e for i in range(sessions) for e in session_events(i, client.account_id)]
            outcomes = [e for e in events if isinstance(e, InferenceCompleted)]
            # What the gateway held for each request before publishing it (the ledger closes these).
            await conn.execute(
                "INSERT INTO far_reservations (request_id, account_id, model, max_tokens, price_per_token, amount) "
                "SELECT r, $2, 'farmesh-tiny', 64, $3::numeric, $3::numeric * 64 FROM unnest($1::text[]) AS r",
                [o.request_id for o in outcomes], client.account_id, PRICE)
            records = [Record(topics.SESSIONS.name, 0, n, e.request_id.encode(), wire(e)) for n, e in enumerate(events)]
            rows = [(c.contribution_id, o.request_id, o.model, c.peer_id, None, c.start_block, c.end_block,
                     c.tokens_processed, c.earnings_far, o.finished_at) for o in outcomes for c in o.contributions]
            await conn.execute(_COPY_TABLE)
            await conn.execute("ANALYZE far_reservations")

            with stopwatch() as copy_t:
                await conn.copy_records_to_table("bench_copy_contributions", records=rows)
            with stopwatch() as ledger_t:
                written, _ = await ingest(conn, records)
            before = await conn.fetchval("SELECT count(*) FROM far_ledger_entries")
            with stopwatch() as again_t:
                rewritten, duplicates = await ingest(conn, records)
            after = await conn.fetchval("SELECT count(*) FROM far_ledger_entries")
        finally:
            await conn.close()
    if written != len(rows) or rewritten != 0 or duplicates != len(outcomes) or before != after:
        raise SystemExit(f"ledger wrote {written}/{len(rows)} contributions, then {rewritten} again "
                         f"({duplicates} duplicates, entries {before} -> {after})")
    copy_rate, ledger_rate = len(rows) / copy_t[0], written / ledger_t[0]
    say(f"sessions={sessions} records={len(records)} contributions={len(rows)} batch={BATCH}")
    say(f"copy: {copy_t[0]:.3f} s, {copy_rate:,.0f} rows/s (copy_records_to_table, one call)")
    say(f"ledger: {ledger_t[0]:.3f} s, {ledger_rate:,.0f} contributions/s "
        f"({len(outcomes) / ledger_t[0]:,.0f} sessions/s, with settlement postings and reservations)")
    say(f"ledger again (same records, idempotent: nothing written): {again_t[0]:.3f} s, "
        f"{len(records) / again_t[0]:,.0f} records/s")
    return finish(ratio(ledger_rate, copy_rate), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    raise SystemExit(asyncio.run(main(parser.parse_args().sessions)))
