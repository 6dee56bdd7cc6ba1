"""`farmesh replay [--since TIME] [--verify]`: rebuild the money projections from the event log.

Reads farmesh.sessions from the earliest offset (or, with --since, from the offsets the broker finds for
that time: offsets_for_times) up to the end offsets seen at start, with NO consumer group (partitions
are assigned, nothing is committed), so the live groups are never disturbed. It applies the ledger's
rule (consumers/ledger/rules.py: the first accepted outcome of a request_id wins) and rebuilds, in the
separate PostgreSQL schema `far_replay`:

    far_replay.sessions        one row per request: the winning outcome
    far_replay.contributions   the winners' contributions
    far_replay.earnings        per node: sessions, tokens processed, earnings
    far_replay.charges         per client account: sessions, cost, platform fees

The rows are written while the log is read, in chunks, into `far_replay_build`; only when the whole
log is in does one transaction add the keys, compute the per-node and per-client projections and put
the new schema in place of the old one. So memory holds ids, not events, however long the log; the
database writes while the next records are checked; and readers of far_replay see the previous run
until the new one is complete (a failed run leaves it as it was).

--verify compares them with the live ledger: sessions and contributions row by row, the nodes' earnings
with the ledger's node credits, the clients' charges with its client debits, and the contributions with
the payments group's payable items; every difference is printed and the exit status is 1 if any.
With --since, only the requests whose live session comes from an outcome inside the window are compared.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, AsyncIterator
from uuid import UUID

import asyncpg
from pydantic import ValidationError

from farmesh.billing.acceptance import contribution_conflict, money_problem
from schemas import money
from schemas import topics
from schemas.events import NodeContribution, SessionOutcome, session_event_adapter

SCHEMA = "far_replay"
_BUILD = "far_replay_build"  # where a run writes; renamed to SCHEMA when it is complete
_LOCK = "farmesh.replay"  # one run at a time (a session advisory lock: released if the process dies)
_CHUNK = 2000  # outcomes read before their rows go to the writer

# No keys while loading: they are added once at the end (an index built from all rows is cheaper than one
# maintained row by row), and adding them checks what the rule guarantees (one session per request, each
# contribution once).
_DDL = f"""
DROP SCHEMA IF EXISTS {_BUILD} CASCADE;
CREATE SCHEMA {_BUILD};
CREATE TABLE {_BUILD}.sessions (
    request_id TEXT NOT NULL, event_id UUID NOT NULL, model TEXT NOT NULL, account_id UUID NOT NULL,
    status TEXT NOT NULL, prompt_tokens INT NOT NULL, completion_tokens INT NOT NULL,
    price_per_token NUMERIC(38,18) NOT NULL, cost NUMERIC(38,18) NOT NULL, platform_fee NUMERIC(38,18) NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL, log_partition INT NOT NULL, log_offset BIGINT NOT NULL);
CREATE TABLE {_BUILD}.contributions (
    event_id UUID NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, peer_id TEXT NOT NULL,
    start_block INT NOT NULL, end_block INT NOT NULL, tokens_processed INT NOT NULL,
    earnings NUMERIC(38,18) NOT NULL, occurred_at TIMESTAMPTZ NOT NULL);
CREATE TABLE {_BUILD}.seen_outcomes (event_id UUID NOT NULL, request_id TEXT NOT NULL);
CREATE TABLE {_BUILD}.rejected (log_partition INT, log_offset BIGINT, reason TEXT NOT NULL);
CREATE TABLE {_BUILD}.runs (started_at TIMESTAMPTZ NOT NULL, since TIMESTAMPTZ NULL, records BIGINT NOT NULL,
    outcomes BIGINT NOT NULL, sessions BIGINT NOT NULL, rejected BIGINT NOT NULL, positions JSONB NOT NULL);
"""

_FINISH = f"""
ALTER TABLE {_BUILD}.sessions ADD PRIMARY KEY (request_id);
ALTER TABLE {_BUILD}.contributions ADD PRIMARY KEY (event_id);
ALTER TABLE {_BUILD}.seen_outcomes ADD PRIMARY KEY (event_id);
CREATE TABLE {_BUILD}.earnings AS
    SELECT peer_id, count(DISTINCT request_id) AS sessions, sum(tokens_processed)::bigint AS tokens_processed,
           sum(earnings) AS earnings
    FROM {_BUILD}.contributions GROUP BY peer_id;
CREATE TABLE {_BUILD}.charges AS
    SELECT account_id, count(*) AS sessions, sum(completion_tokens)::bigint AS completion_tokens,
           sum(cost) AS cost, sum(platform_fee) AS platform_fees
    FROM {_BUILD}.sessions GROUP BY account_id;
"""
_SWAP = f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; ALTER SCHEMA {_BUILD} RENAME TO {SCHEMA};"


@dataclass
class Replayed:
    records: int = 0
    outcomes: int = 0
    sessions: int = 0
    rejected: list[tuple[int, int, str]] = field(default_factory=list)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (start, end)


async def read_log_batches(bootstrap: str, topic: str, since: datetime | None, positions: dict[int, tuple[int, int]],
                           timeout: float = 30.0) -> AsyncIterator[list[Any]]:
    """Every record of `topic` from the earliest offset (or the first at/after `since`) to the end offsets
    seen at start, a fetched batch at a time (records of one partition, in log order); group-less (nothing
    committed). `positions` receives partition -> (first offset, end offset)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        positions.update({tp.partition: (starts[tp], ends[tp]) for tp in tps})
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=2000)
            if batch:
                deadline = loop.time() + timeout
            for tp, records in batch.items():
                if records and records[-1].offset >= ends[tp]:
                    records = [r for r in records if r.offset < ends[tp]]
                if records:
                    yield records
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            # A finished partition is fetched no more: a fetch of finished partitions alone waits out
            # fetch_max_wait_ms, and meanwhile nothing else is fetched from that broker.
            consumer.pause(*(tp for tp in tps if tp not in pending))
            if pending and loop.time() > deadline:
                raise TimeoutError(f"replay: no progress on {sorted(tp.partition for tp in pending)} in {timeout:.0f} s")
    finally:
        await consumer.stop()


# The header every producer (farmesh.kafka.messaging.publish) puts on a node.contribution record.
CONTRIBUTION_HEADER = (topics.EVENT_TYPE_HEADER, NodeContribution.model_fields["type"].default.encode())


@dataclass
class _Chunk:
    """Rows for the far_replay_build tables, in log order."""

    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    contributions: list[tuple[Any, ...]] = field(default_factory=list)
    seen: list[tuple[UUID, str]] = field(default_factory=list)


def _win(chunk: _Chunk, o: SessionOutcome, partition: int, offset: int) -> None:
    chunk.sessions.append((o.request_id, o.event_id, o.model, o.account_id, o.status, o.prompt_tokens,
                           o.completion_tokens, o.price_per_token, o.cost_far, o.platform_fee_far, o.finished_at,
                           partition, offset))
    chunk.contributions += [(c.contribution_id, o.request_id, o.model, c.peer_id, c.start_block, c.end_block,
                             c.tokens_processed, c.earnings_far, o.finished_at) for c in o.contributions]


async def replay(database_url: str, bootstrap: str, since: datetime | None = None) -> Replayed:
    """Read the sessions topic and rebuild the far_replay schema of the database at `database_url`."""
    started = datetime.now(timezone.utc)
    writer = await asyncpg.connect(database_url)
    try:
        await writer.execute("SELECT pg_advisory_lock(hashtext($1))", _LOCK)
        await writer.execute(_DDL)
        lookups = await asyncpg.connect(database_url)
        chunks: asyncio.Queue[_Chunk | None] = asyncio.Queue(maxsize=2)
        writing = asyncio.create_task(_write_chunks(writer, chunks))
        try:
            state = await _read(lookups, bootstrap, since, chunks, writing)
            await _hand_over(chunks, writing, None)
            await writing
        finally:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
            await lookups.close()
        async with writer.transaction():
            await writer.copy_records_to_table("rejected", schema_name=_BUILD, records=state.rejected)
            await writer.execute(_FINISH)
            await writer.execute(
                f"INSERT INTO {_BUILD}.runs VALUES ($1, $2, $3, $4, $5, $6, $7)", started, since, state.records,
                state.outcomes, state.sessions, len(state.rejected),
                json.dumps({str(p): list(v) for p, v in state.positions.items()}))
            await writer.execute(_SWAP)
        return state
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the next run drops it anyway
            await writer.execute(f"DROP SCHEMA IF EXISTS {_BUILD} CASCADE")
        raise
    finally:
        await writer.close()  # also releases the advisory lock


async def _read(lookups: asyncpg.Connection, bootstrap: str, since: datetime | None,
                chunks: asyncio.Queue[_Chunk | None], writing: asyncio.Task[None]) -> Replayed:
    """Apply the ledger's rule to the log in order, handing the rows to the writer chunk by chunk."""
    state = Replayed()
    clients: set[UUID] = set()
    strangers: set[UUID] = set()
    owners: dict[UUID, str] = {}
    winners: set[str] = set()
    seen: set[UUID] = set()
    chunk = _Chunk()
    validate = session_event_adapter.validate_json
    # The loop allocates only acyclic objects: the cyclic collector would rescan the growing sets of ids
    # again and again for nothing, so it waits until the log is read.
    collecting = gc.isenabled()
    gc.disable()
    try:
        async for records in read_log_batches(bootstrap, topics.SESSIONS.name, since, state.positions):
            state.records += len(records)
            for record in records:
                if CONTRIBUTION_HEADER in record.headers:
                    # Every contribution also travels inside its outcome, which is what replay rebuilds from;
                    # the live consumers dead-letter a malformed one. Two records in three are these: not
                    # parsing them is most of replay's speed.
                    continue
                try:
                    event = validate(record.value)
                except (ValidationError, ValueError) as exc:
                    state.rejected.append((record.partition, record.offset, f"invalid session event: {str(exc)[:200]}"))
                    continue
                if isinstance(event, NodeContribution):
                    continue
                state.outcomes += 1
                if event.event_id not in seen:
                    seen.add(event.event_id)
                    chunk.seen.append((event.event_id, event.request_id))
                # The ledger's rule, in log order: money adds up, a known client, contribution ids not taken.
                problem = money_problem(event)
                if problem is None and event.account_id not in clients:
                    if event.account_id not in strangers and await lookups.fetchval(
                            "SELECT 1 FROM far_accounts WHERE account_id = $1 AND kind = 'client'", event.account_id):
                        clients.add(event.account_id)
                    else:
                        strangers.add(event.account_id)
                        problem = f"unknown client account {event.account_id}"
                if problem is None and event.request_id not in winners:
                    problem = contribution_conflict(event, owners)
                if problem is not None:
                    state.rejected.append((record.partition, record.offset, problem))
                    continue
                if event.request_id not in winners:
                    winners.add(event.request_id)
                    _win(chunk, event, record.partition, record.offset)
            if len(chunk.seen) >= _CHUNK:
                await _hand_over(chunks, writing, chunk)
                chunk = _Chunk()
    finally:
        if collecting:
            gc.enable()
    await _hand_over(chunks, writing, chunk)
    state.sessions = len(winners)
    return state


async def _hand_over(chunks: asyncio.Queue[_Chunk | None], writing: asyncio.Task[None], chunk: _Chunk | None) -> None:
    """Queue `chunk` for the writer (None: the log is read), or raise what stopped the writer."""
    put = asyncio.ensure_future(chunks.put(chunk))
    await asyncio.wait({put, writing}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
    if writing.done():
        writing.result()  # the writer's error
        if not put.done() or put.cancelled():
            raise RuntimeError("replay: the writer stopped before the log was read")


async def _write_chunks(conn: asyncpg.Connection, chunks: asyncio.Queue[_Chunk | None]) -> None:
    """COPY each chunk into far_replay_build as it comes (each COPY commits on its own; a failed run drops
    the build, and the next run would)."""
    while (chunk := await chunks.get()) is not None:
        for table, rows in (("sessions", chunk.sessions), ("contributions", chunk.contributions),
                            ("seen_outcomes", chunk.seen)):
            if rows:
                await conn.copy_records_to_table(table, schema_name=_BUILD, records=rows)


# ------------------------------------------------------------------------------------------------ verify

# The requests compared: every session either side has, except (with --since) those whose live session
# comes from an outcome before the window (the replay cannot know it).
_SCOPE = f"""
INSERT INTO replay_scope
SELECT request_id FROM far_mesh_sessions l
WHERE l.account_id IS NOT NULL
  AND ($1::timestamptz IS NULL OR l.finished_at >= $1
       OR EXISTS (SELECT 1 FROM {SCHEMA}.seen_outcomes s WHERE s.event_id = l.event_id))
UNION
SELECT r.request_id FROM {SCHEMA}.sessions r
WHERE $1::timestamptz IS NULL OR NOT EXISTS (
    SELECT 1 FROM far_mesh_sessions l WHERE l.request_id = r.request_id AND l.finished_at < $1
      AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.seen_outcomes s WHERE s.event_id = l.event_id))
"""

# (what, key, live query, replay query, compared columns) -- both queries restricted to the scope
_COMPARE: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    ("session", "request_id",
     "SELECT request_id, event_id, model, account_id, status, prompt_tokens, completion_tokens, price_per_token, "
     "cost, COALESCE(platform_fee, 0) AS platform_fee FROM far_mesh_sessions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT request_id, event_id, model, account_id, status, prompt_tokens, completion_tokens, price_per_token, "
     f"cost, platform_fee FROM {SCHEMA}.sessions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("event_id", "model", "account_id", "status", "prompt_tokens", "completion_tokens", "price_per_token", "cost",
      "platform_fee")),
    ("contribution", "event_id",
     "SELECT event_id, request_id, peer_id, start_block, end_block, tokens_processed, earnings "
     "FROM far_session_contributions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT event_id, request_id, peer_id, start_block, end_block, tokens_processed, earnings "
     f"FROM {SCHEMA}.contributions WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("request_id", "peer_id", "start_block", "end_block", "tokens_processed", "earnings")),
    ("node earnings (ledger credits)", "peer_id",
     "SELECT a.peer_id, sum(e.amount) AS earnings FROM far_ledger_entries e "
     "JOIN far_accounts a ON a.account_id = e.account_id AND a.kind = 'node' "
     "JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement' "
     "WHERE e.side = 'credit' AND t.request_id IN (SELECT request_id FROM replay_scope) GROUP BY a.peer_id",
     f"SELECT peer_id, sum(earnings) AS earnings FROM {SCHEMA}.contributions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope) AND earnings > 0 GROUP BY peer_id",
     ("earnings",)),
    ("client charges (ledger debits)", "account_id",
     "SELECT e.account_id, sum(e.amount) AS cost FROM far_ledger_entries e "
     "JOIN far_ledger_transactions t ON t.txn_id = e.txn_id AND t.kind = 'settlement' "
     "WHERE e.side = 'debit' AND t.request_id IN (SELECT request_id FROM replay_scope) GROUP BY e.account_id",
     f"SELECT account_id, sum(cost) AS cost FROM {SCHEMA}.sessions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope) AND cost > 0 GROUP BY account_id",
     ("cost",)),
    ("payable item (payments group)", "contribution_id",
     "SELECT contribution_id, request_id, peer_id, amount FROM far_payment_items "
     "WHERE request_id IN (SELECT request_id FROM replay_scope)",
     f"SELECT event_id AS contribution_id, request_id, peer_id, earnings AS amount FROM {SCHEMA}.contributions "
     f"WHERE request_id IN (SELECT request_id FROM replay_scope)",
     ("request_id", "peer_id", "amount")),
]


def _show(value: Any) -> str:
    return money.text(value) if isinstance(value, Decimal) else str(value)


def _differing(key: str, live_sql: str, replay_sql: str, columns: tuple[str, ...]) -> str:
    """The rows that differ between the two queries (only on one side, or a compared column not equal),
    found by the database: neither side is loaded into memory."""
    sides = ", ".join(f"l.{c} AS live_{c}, r.{c} AS replay_{c}" for c in columns)
    changed = " OR ".join(f"l.{c} IS DISTINCT FROM r.{c}" for c in columns)
    return (f"SELECT COALESCE(l.{key}, r.{key}) AS k, l.{key} IS NOT NULL AS in_live, r.{key} IS NOT NULL AS in_replay, "
            f"{sides} FROM ({live_sql}) l FULL JOIN ({replay_sql}) r ON l.{key} = r.{key} "
            f"WHERE l.{key} IS NULL OR r.{key} IS NULL OR {changed} "
            f"ORDER BY COALESCE(l.{key}, r.{key})::text COLLATE \"C\"")


async def verify(conn: asyncpg.Connection, since: datetime | None = None) -> list[str]:
    """Every difference between the far_replay projections and the live ledger (empty: identical)."""
    differences: list[str] = []
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("CREATE TEMP TABLE replay_scope (request_id TEXT PRIMARY KEY) ON COMMIT DROP")
        await conn.execute(_SCOPE, since)
        await conn.execute("ANALYZE replay_scope")  # a temporary table is never analyzed otherwise
        for what, key, live_sql, replay_sql, columns in _COMPARE:
            for row in await conn.fetch(_differing(key, live_sql, replay_sql, columns)):
                if not row["in_live"]:
                    differences.append(f"{what} {row['k']}: only in the replay ({_fields(row, 'replay', columns)})")
                elif not row["in_replay"]:
                    differences.append(f"{what} {row['k']}: only in the live ledger ({_fields(row, 'live', columns)})")
                else:
                    differences.append(f"{what} {row['k']}: " + ", ".join(
                        f"{c} live={_show(row['live_' + c])} replay={_show(row['replay_' + c])}"
                        for c in columns if row["live_" + c] != row["replay_" + c]))
    return differences


def _fields(row: asyncpg.Record, side: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c}={_show(row[side + '_' + c])}" for c in columns)


# ------------------------------------------------------------------------------------------------ CLI


