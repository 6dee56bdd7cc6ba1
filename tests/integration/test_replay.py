"""`farmesh replay [--since] [--verify]` and `farmesh report usage` on the real broker and PostgreSQL."""
from __future__ import annotations

import socket
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from aiokafka.errors import KafkaError

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from consumers.payments import consumer as payments
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from consumers.ledger import replay as replay_module
from schemas import topics
from schemas.events import InferenceRequested
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import ScriptedGenerator, audit_breaks, farmesh, money_env, outcome, producer

pytestmark = pytest.mark.integration
MODEL = "tiny"


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("replay"), postgres_admin_url) as e:
        groups = {
            topics.GROUP_INFERENCE: lambda b, r: worker.register(b, ScriptedGenerator(), MODEL, r,
                                                          reservations=PostgresReservations(e.pool)),
            topics.GROUP_LEDGER: lambda b, r: ledger.register(b, e.pool, r),
            topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, e.pool, r),
        }
        async with running(e.bootstrap, groups):
            yield e


async def requests(env, key: str, run: str, numbers: range) -> None:
    """What the gateway does for each request: reserve, then publish (here without HTTP)."""
    p = await producer(env.bootstrap)
    try:
        for i in numbers:
            request_id = f"{run}-{i}"
            client, _ = await accounts.reserve(env.pool, f"Bearer {key}", accounts.Reservation(
                request_id, MODEL, 8, Decimal("0.0001"), Decimal("0.1")))
            event = InferenceRequested(request_id=request_id, model=MODEL, prompt=f"session {i}", max_tokens=8,
                                       price_per_token=Decimal("0.0001"), reply_topic=topics.REPLIES.name,
                                       account_id=client.account_id, platform_fee_rate=Decimal("0.1"))
            await messaging.publish(p, topics.REQUESTS.name, event, request_id)
    finally:
        await p.stop()
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=120)
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name, timeout=120)


async def test_replay_rebuilds_the_ledger_and_verify_finds_every_difference(env, monkeypatch):
    monkeypatch.setattr(replay_module, "_CHUNK", 4)  # many chunks: the writer runs while the log is read
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "replayed", money.to_base_units(Decimal(1)))
    run = uuid.uuid4().hex[:6]
    await requests(env, issued.key, run, range(0, 12))
    # Duplicates and reruns, and outcomes the ledger refuses: the replay must decide exactly like it.
    p = await producer(env.bootstrap)
    try:
        for value in await read_all(env.bootstrap, topics.SESSIONS.name):
            await p.publish(value, topics.SESSIONS.name)
        # at the reserved price and fee rate: acceptable, and it loses to the first outcome
        rerun = outcome(f"{run}-0", issued.account_id, 1, datetime.now(timezone.utc), fee=Decimal("0.1"))
        stranger = outcome(f"{run}-stranger", uuid.uuid4(), 2, datetime.now(timezone.utc))
        for o in (rerun, stranger):
            await p.publish(o, topics.SESSIONS.name, key=o.request_id.encode())
    finally:
        await p.stop()
    since = datetime.now(timezone.utc)
    await requests(env, issued.key, run, range(12, 20))
    assert await audit_breaks(env.pool) == []

    db = ["--database-url", env.database_url, "--kafka-bootstrap", env.bootstrap]
    result = await farmesh("replay", "--verify", *db)
    assert result.exit_code == 0, result.output
    assert "verify: 0 difference(s)" in result.output
    assert await env.pool.fetchval("SELECT count(*) FROM far_replay.sessions") == 20
    assert await env.pool.fetchval("SELECT sum(earnings) FROM far_replay.earnings") == \
        await env.pool.fetchval("SELECT sum(earnings) FROM far_session_contributions")
    assert await env.pool.fetchval("SELECT sum(cost) FROM far_replay.charges") == \
        await env.pool.fetchval("SELECT sum(cost) FROM far_mesh_sessions")

    windowed = await farmesh("replay", "--since", since.isoformat(), "--verify", *db)
    assert windowed.exit_code == 0, windowed.output
    assert await env.pool.fetchval("SELECT count(*) FROM far_replay.sessions") == 8

    # The live ledger drifts from the log: every difference is printed, and the exit status says so.
    victim = await env.pool.fetchrow("SELECT * FROM far_session_contributions WHERE earnings > 0 ORDER BY event_id LIMIT 1")
    item = await env.pool.fetchrow("SELECT * FROM far_payment_items WHERE request_id = $1 LIMIT 1", f"{run}-5")
    await env.pool.execute("UPDATE far_session_contributions SET earnings = earnings + 0.000000000000000001 "
                           "WHERE event_id = $1", victim["event_id"])
    await env.pool.execute("DELETE FROM far_payment_items WHERE contribution_id = $1", item["contribution_id"])
    try:
        drifted = await farmesh("replay", "--verify", *db)
        assert drifted.exit_code == 1
        diffs = [line for line in drifted.output.splitlines() if line.startswith("DIFF")]
        assert len(diffs) == 2, drifted.output
        assert any(str(victim["event_id"]) in d and "earnings live=" in d for d in diffs)
        assert any(str(item["contribution_id"]) in d and "only in the replay" in d for d in diffs)
    finally:
        await env.pool.execute("UPDATE far_session_contributions SET earnings = $2 WHERE event_id = $1",
                               victim["event_id"], victim["earnings"])
        await env.pool.execute(
            "INSERT INTO far_payment_items (contribution_id, request_id, peer_id, wallet, amount, occurred_at, week) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)", *(item[k] for k in (
                "contribution_id", "request_id", "peer_id", "wallet", "amount", "occurred_at", "week")))
    assert (await farmesh("replay", "--verify", *db)).exit_code == 0


async def test_usage_reports(env):
    db = ["--database-url", env.database_url]
    by_model = await farmesh("report", "usage", "--by", "model", *db)
    assert by_model.exit_code == 0, by_model.output
    header, _, row = by_model.output.splitlines()[:3]
    assert header.split()[:3] == ["model", "sessions", "completed"] and row.split()[0] == MODEL
    charged = await env.pool.fetchval("SELECT sum(cost) FROM far_mesh_sessions")
    assert money.text(charged) in row.split()
    by_node = await farmesh("report", "usage", "--by", "node", "--format", "csv", *db)
    assert by_node.exit_code == 0, by_node.output
    lines = by_node.output.splitlines()
    assert lines[0].startswith("peer_id,wallet,sessions")
    earnings = sum(Decimal(line.split(",")[6]) for line in lines[1:])
    assert earnings == await env.pool.fetchval("SELECT sum(earnings) FROM far_session_contributions")
    by_day = await farmesh("report", "usage", "--by", "day", "--format", "json", *db)
    assert by_day.exit_code == 0 and '"node_earnings_far"' in by_day.output


async def test_a_failed_replay_leaves_the_previous_projections(env):
    """A run that breaks off (here: the broker cannot be reached) changes nothing readers see, and the next
    run is not blocked by it."""
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "failed replay", money.to_base_units(Decimal(1)))
    await requests(env, issued.key, uuid.uuid4().hex[:6], range(3))
    first = await replay_module.replay(env.database_url, env.bootstrap)
    assert first.sessions > 0
    # Without the log positions: the first test republished records without a key, so a request's identical
    # copies sit in two partitions, and which one a run meets first is not fixed.
    sessions = "SELECT request_id, event_id, status, cost, platform_fee FROM far_replay.sessions ORDER BY request_id"
    rows = await env.pool.fetch(sessions)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(KafkaError):
        await replay_module.replay(env.database_url, closed)
    assert await env.pool.fetch(sessions) == rows
    assert await env.pool.fetchval("SELECT count(*) FROM far_replay.runs") == 1
    assert await env.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'far_replay_build'") == 0
    result = await farmesh("replay", "--database-url", env.database_url, "--kafka-bootstrap", closed)
    assert result.exit_code == 1 and "KafkaConnectionError" in result.output, result.output
    again = await replay_module.replay(env.database_url, env.bootstrap)
    assert (again.sessions, again.records) == (first.sessions, first.records)
    assert await env.pool.fetch(sessions) == rows
    assert await env.pool.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'far_replay_build'") == 0
