"""`farmesh replay [--since TIME] [--verify]`: rebuild the money projections from the event log.

Reads farmesh.sessions from the earliest offset (or, with --since, from the offsets the broker finds for
that time: offsets_for_times) up to the end offsets seen at start, with NO consumer group (partitions
are assigned, nothing is committed), so the live groups are never disturbed. It applies the ledger's
rule (consumers/ledger/rules.py: the first accepted outcome of a request_id wins) and rebuilds, in the
separate PostgreSQL schema `far_replay` (dropped and recreated by each run):

    far_replay.sessions        one row per request: the winning outcome
    far_replay.contributions   the winners' contributions
    far_replay.earnings        per node: sessions, tokens processed, earnings
    far_replay.charges         per client account: sessions, cost, platform fees

--verify compares them with the live ledger: sessions and contributions row by row, the nodes' earnings
with the ledger's node credits, the clients' charges with its client debits, and the contributions with
the payments group's payable items; every difference is printed and the exit status is 1 if any.
With --since, only the requests whose live session comes from an outcome inside the window are compared.
"""
from __future__ import annotations

import asyncio
import gc
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, AsyncIterator
from uuid import UUID

import asyncpg
import click
from pydantic import ValidationError

from consumers.ledger.rules import contribution_conflict, money_problem
from farmesh import money
from farmesh.cli import with_settings
from farmesh.settings import Settings
from schemas import topics
from schemas.events import NodeContribution, SessionOutcome, session_event_adapter

SCHEMA = "far_replay"
_LOCK = "farmesh.replay"

_DDL = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.sessions (
    request_id TEXT PRIMARY KEY, event_id UUID NOT NULL, model TEXT NOT NULL, account_id UUID NOT NULL,
    status TEXT NOT NULL, prompt_tokens INT NOT NULL, completion_tokens INT NOT NULL,
    price_per_token NUMERIC(38,18) NOT NULL, cost NUMERIC(38,18) NOT NULL, platform_fee NUMERIC(38,18) NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL, log_partition INT NOT NULL, log_offset BIGINT NOT NULL);
CREATE TABLE {SCHEMA}.contributions (
    event_id UUID PRIMARY KEY, request_id TEXT NOT NULL, model TEXT NOT NULL, peer_id TEXT NOT NULL,
    start_block INT NOT NULL, end_block INT NOT NULL, tokens_processed INT NOT NULL,
    earnings NUMERIC(38,18) NOT NULL, occurred_at TIMESTAMPTZ NOT NULL);
CREATE TABLE {SCHEMA}.seen_outcomes (event_id UUID PRIMARY KEY, request_id TEXT NOT NULL);
CREATE TABLE {SCHEMA}.rejected (log_partition INT, log_offset BIGINT, reason TEXT NOT NULL);
CREATE TABLE {SCHEMA}.runs (started_at TIMESTAMPTZ NOT NULL, since TIMESTAMPTZ NULL, records BIGINT NOT NULL,
    outcomes BIGINT NOT NULL, sessions BIGINT NOT NULL, rejected BIGINT NOT NULL, positions JSONB NOT NULL);
"""

_PROJECTIONS = f"""
CREATE TABLE {SCHEMA}.earnings AS
    SELECT peer_id, count(DISTINCT request_id) AS sessions, sum(tokens_processed)::bigint AS tokens_processed,
           sum(earnings) AS earnings
    FROM {SCHEMA}.contributions GROUP BY peer_id;
CREATE TABLE {SCHEMA}.charges AS
    SELECT account_id, count(*) AS sessions, sum(completion_tokens)::bigint AS completion_tokens,
           sum(cost) AS cost, sum(platform_fee) AS platform_fees
    FROM {SCHEMA}.sessions GROUP BY account_id;
"""


@dataclass
class Replayed:
    records: int = 0
    outcomes: int = 0
    rejected: list[tuple[int, int, str]] = field(default_factory=list)
    winners: dict[str, tuple[SessionOutcome, int, int]] = field(default_factory=dict)
    seen: dict[UUID, str] = field(default_factory=dict)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (start, end)


async def read_log(bootstrap: str, topic: str, since: datetime | None, positions: dict[int, tuple[int, int]],
                   timeout: float = 30.0) -> AsyncIterator[Any]:
    """Every record of `topic` from the earliest offset (or the first at/after `since`) to the end offsets
    seen at start, each partition in log order; group-less (nothing committed). `positions` receives
    partition -> (first offset, end offset)."""
    async for records in read_log_batches(bootstrap, topic, since, positions, timeout):
        for record in records:
            yield record


async def read_log_batches(bootstrap: str, topic: str, since: datetime | None, positions: dict[int, tuple[int, int]],
                           timeout: float = 30.0) -> AsyncIterator[list[Any]]:
    """read_log() a fetched batch at a time (records of one partition, in log order)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
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


# The header every producer (farmesh.messaging.publish) puts on a node.contribution record.
_CONTRIBUTION_HEADER = (topics.EVENT_TYPE_HEADER, b"node.contribution")


async def replay(conn: asyncpg.Connection, bootstrap: str, since: datetime | None = None) -> Replayed:
    """Read the sessions topic and rebuild the far_replay schema on `conn`."""
    state = Replayed()
    clients: set[UUID] = set()
    strangers: set[UUID] = set()
    owners: dict[UUID, str] = {}
    started = datetime.now(timezone.utc)
    validate = session_event_adapter.validate_json
    # The loop allocates only acyclic objects (records, events) that it keeps: the cyclic collector would
    # rescan the growing state again and again for nothing, so it waits until the log is read.
    collecting = gc.isenabled()
    gc.disable()
    try:
        async for records in read_log_batches(bootstrap, topics.SESSIONS.name, since, state.positions):
            state.records += len(records)
            for record in records:
                if _CONTRIBUTION_HEADER in record.headers:
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
                state.seen[event.event_id] = event.request_id
                # The ledger's rule, in log order: money adds up, a known client, contribution ids not taken.
                problem = money_problem(event)
                if problem is None and event.account_id not in clients:
                    if event.account_id not in strangers and await conn.fetchval(
                            "SELECT 1 FROM far_accounts WHERE account_id = $1 AND kind = 'client'", event.account_id):
                        clients.add(event.account_id)
                    else:
                        strangers.add(event.account_id)
                        problem = f"unknown client account {event.account_id}"
                if problem is None and event.request_id not in state.winners:
                    problem = contribution_conflict(event, owners)
                if problem is not None:
                    state.rejected.append((record.partition, record.offset, problem))
                    continue
                state.winners.setdefault(event.request_id, (event, record.partition, record.offset))
    finally:
        if collecting:
            gc.enable()
    await _write(conn, state, since, started)
    return state


async def _write(conn: asyncpg.Connection, state: Replayed, since: datetime | None, started: datetime) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK)
        await conn.execute(_DDL)
        sessions, contributions = [], []
        for o, partition, offset in state.winners.values():
            sessions.append((o.request_id, o.event_id, o.model, o.account_id,
                             o.status, o.prompt_tokens,
                             o.completion_tokens, o.price_per_token, o.cost_far, o.platform_fee_far, o.finished_at,
                             partition, offset))
            contributions += [(c.contribution_id, o.request_id, o.model, c.peer_id, c.start_block, c.end_block,
                               c.tokens_processed, c.earnings_far, o.finished_at) for c in o.contributions]
        await conn.copy_records_to_table("sessions", schema_name=SCHEMA, records=sessions)
        await conn.copy_records_to_table("contributions", schema_name=SCHEMA, records=contributions)
        await conn.copy_records_to_table("seen_outcomes", schema_name=SCHEMA, records=list(state.seen.items()))
        await conn.copy_records_to_table("rejected", schema_name=SCHEMA, records=state.rejected)
        await conn.execute(_PROJECTIONS)
        await conn.execute(
            f"INSERT INTO {SCHEMA}.runs VALUES ($1, $2, $3, $4, $5, $6, $7)", started, since, state.records,
            state.outcomes, len(state.winners), len(state.rejected),
            json.dumps({str(p): list(v) for p, v in state.positions.items()}))


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


async def verify(conn: asyncpg.Connection, since: datetime | None = None) -> list[str]:
    """Every difference between the far_replay projections and the live ledger (empty: identical)."""
    differences: list[str] = []
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("CREATE TEMP TABLE replay_scope (request_id TEXT PRIMARY KEY) ON COMMIT DROP")
        await conn.execute(_SCOPE, since)
        for what, key, live_sql, replay_sql, columns in _COMPARE:
            live = {r[key]: dict(r) for r in await conn.fetch(live_sql)}
            rebuilt = {r[key]: dict(r) for r in await conn.fetch(replay_sql)}
            for k in sorted(set(live) | set(rebuilt), key=str):
                a, b = live.get(k), rebuilt.get(k)
                if a is None:
                    differences.append(f"{what} {k}: only in the replay ({_fields(b, columns)})")
                elif b is None:
                    differences.append(f"{what} {k}: only in the live ledger ({_fields(a, columns)})")
                else:
                    changed = [c for c in columns if a[c] != b[c]]
                    if changed:
                        differences.append(f"{what} {k}: " + ", ".join(
                            f"{c} live={_show(a[c])} replay={_show(b[c])}" for c in changed))
    return differences


def _fields(row: dict[str, Any] | None, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c}={_show(row[c])}" for c in columns) if row else ""


# ------------------------------------------------------------------------------------------------ CLI

def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO time like 2026-11-23T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


async def run(settings: Settings, since: datetime | None, check: bool) -> tuple[Replayed, list[str]]:
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        state = await replay(conn, settings.kafka_bootstrap, since)
        return state, (await verify(conn, since) if check else [])
    finally:
        await conn.close()


@click.command("replay")
@with_settings("kafka_bootstrap", "database_url")
@click.option("--since", default=None, metavar="TIME", help="Start at the log offsets of this time (ISO 8601, UTC if no zone)")
@click.option("--verify", "check", is_flag=True, help="Compare with the live ledger; exit 1 on any difference")
def replay_command(settings: Settings, since: str | None, check: bool) -> None:
    """Rebuild sessions, contributions and earnings from the event log into schema far_replay."""
    moment = _parse_time(since) if since else None
    try:
        state, differences = asyncio.run(run(settings, moment, check))
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    window = f"since {moment.isoformat()}" if moment else "from the earliest offset"
    click.echo(f"replay: {state.records} record(s) of {topics.SESSIONS.name} {window} in "
               f"{len(state.positions)} partition(s): {state.outcomes} outcome(s), {len(state.winners)} session(s), "
               f"{len(state.rejected)} rejected -> schema {SCHEMA}")
    if not check:
        return
    for line in differences:
        click.echo(f"DIFF {line}")
    click.echo(f"verify: {len(differences)} difference(s) from the live ledger")
    if differences:
        raise SystemExit(1)
