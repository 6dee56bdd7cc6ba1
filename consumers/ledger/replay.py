"""`farmesh replay [--since TIME] [--verify]`: rebuild the money projections from the event log.

Reads farmesh.sessions from the earliest offset (or, with --since, from the offsets the broker finds for
that time: offsets_for_times) up to the end offsets seen at start, with NO consumer group (partitions
are assigned, nothing is committed), so the live groups are never disturbed. It applies the ledger's
rule (farmesh/billing/acceptance.py: an outcome counts when its money adds up and it matches the reservation the
gateway made for its request; the first such outcome of a request_id wins, or the one the live groups recorded)
and rebuilds, in the separate PostgreSQL schema `far_replay`:

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
the payments group's payable items (consumers/ledger/replay_verify.py); every difference is printed and the exit status is 1 if any.
With --since, only the requests whose live session comes from an outcome inside the window are compared.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import ValidationError

from db.views.acceptance import Facts
from db.views.reservations import reservations_with_taken
from farmesh.billing.acceptance import contribution_conflict, outcome_problem
from farmesh.kafka.log_reader import read_log_batches
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
            # A fetched batch at a time: its records parsed first, so the facts its outcomes are judged on (their
            # reservations, the client accounts not seen yet) come in one round trip or two.
            parsed: list[tuple[Any, SessionOutcome | str]] = []
            for record in records:
                if CONTRIBUTION_HEADER in record.headers:
                    # Every contribution also travels inside its outcome, which is what replay rebuilds from;
                    # the live consumers dead-letter a malformed one. Two records in three are these: not
                    # parsing them is most of replay's speed.
                    continue
                try:
                    event = validate(record.value)
                except (ValidationError, ValueError) as exc:
                    parsed.append((record, f"invalid session event: {str(exc)[:200]}"))
                    continue
                if not isinstance(event, NodeContribution):
                    parsed.append((record, event))
            outcomes = [e for _, e in parsed if not isinstance(e, str)]
            if not outcomes:
                continue
            reservations, taken = await reservations_with_taken(lookups, {o.request_id for o in outcomes})
            unknown = {o.account_id for o in outcomes} - clients - strangers
            if unknown:
                found = {r["account_id"] for r in await lookups.fetch(
                    "SELECT account_id FROM far_accounts WHERE kind = 'client' AND account_id = ANY($1::uuid[])",
                    list(unknown))}
                clients |= found
                strangers |= unknown - found
            facts = Facts(reservations=reservations, taken=taken, clients=clients)
            for record, event in parsed:
                if isinstance(event, str):
                    state.rejected.append((record.partition, record.offset, event))
                    continue
                state.outcomes += 1
                if event.event_id not in seen:
                    seen.add(event.event_id)
                    chunk.seen.append((event.event_id, event.request_id))
                # The ledger's rule, in log order: money adds up, a known client, the request's reservation and
                # the pricing rule's split, contribution ids not taken.
                problem = outcome_problem(event, facts)
                won = taken.get(event.request_id, ())
                if problem is None and event.request_id not in winners:
                    problem = contribution_conflict(event, owners)
                if problem is not None:
                    state.rejected.append((record.partition, record.offset, problem))
                    continue
                # The first acceptable outcome wins, unless the live groups recorded another one (which then
                # wins where it comes in the log: every consumer follows the winner recorded first).
                if event.request_id not in winners and (not won or event.event_id in won):
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


# ------------------------------------------------------------------------------------------------ CLI


