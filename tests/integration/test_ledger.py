"""The ledger consumer group on the real broker and PostgreSQL."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from consumers.ledger import consumer as ledger
from farmesh.kafka import messaging
from schemas import topics
from schemas.events import Contribution, DeadLetter, InferenceCompleted, InferenceFailed
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import hold

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
ACCOUNT = uuid.UUID("7b0e1b1e-0000-4000-8000-00000000a11c")  # the paying client (created by the fixture)


def outcome(request_id: str, tokens: int = 10, failed: bool = False, peers: tuple[str, str] = ("peerA", "peerB")):
    cost = Decimal("0.0001") * tokens
    contributions = [
        Contribution(contribution_id=uuid.uuid4(), peer_id=peers[0], start_block=0, end_block=2,
                     tokens_processed=tokens + 4, earnings_far=cost / 2),
        Contribution(contribution_id=uuid.uuid4(), peer_id=peers[1], start_block=2, end_block=4,
                     tokens_processed=tokens + 4, earnings_far=cost / 2),
    ]
    common = dict(request_id=request_id, model="tiny", prompt_tokens=5, completion_tokens=tokens,
                  completion="x" * tokens, price_per_token=Decimal("0.0001"), cost_far=cost, started_at=T0,
                  finished_at=T0 + timedelta(seconds=1), worker="w", contributions=contributions, account_id=ACCOUNT)
    return InferenceFailed(error="boom", **common) if failed else InferenceCompleted(finish_reason="length", **common)


async def snapshot(pool):
    sessions = [dict(r) for r in await pool.fetch("SELECT * FROM far_mesh_sessions ORDER BY request_id")]
    contribs = [dict(r) for r in await pool.fetch("SELECT * FROM far_session_contributions ORDER BY event_id")]
    return sessions, contribs


@pytest.fixture
async def ledger_and_registry(kafka_bootstrap, db_pool):
    """A running ledger group: (a producer for the sessions topic, the ledger's metrics registry)."""
    await messaging.ensure_topics(kafka_bootstrap, messaging.mesh_topics(3))
    await db_pool.execute("INSERT INTO far_accounts (account_id, kind, name) VALUES ($1, 'client', 'test_ledger') "
                          "ON CONFLICT DO NOTHING", ACCOUNT)
    registry = CollectorRegistry()
    broker = messaging.create_broker(kafka_bootstrap, topics.GROUP_LEDGER, registry)
    ledger.register(broker, db_pool, registry)
    await broker.start()
    publisher = messaging.create_broker(kafka_bootstrap, "test-producer", CollectorRegistry())
    await publisher.connect()
    yield publisher, registry
    await publisher.stop()
    await broker.stop()


@pytest.fixture
def running_ledger(ledger_and_registry):
    return ledger_and_registry[0]


async def test_replayed_and_duplicated_events_leave_the_ledger_unchanged(kafka_bootstrap, db_pool, running_ledger):
    run = uuid.uuid4().hex[:8]
    events = [outcome(f"{run}-{i}", tokens=i + 1, failed=(i == 3)) for i in range(6)]
    # A redelivered request that ran again: a second outcome for the same session.
    rerun = outcome(f"{run}-0", tokens=1)
    await hold(db_pool, *events)  # what the gateway reserved for each request
    for e in events + [rerun]:
        await messaging.publish(running_ledger, topics.SESSIONS.name, e, e.request_id)
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    first = await snapshot(db_pool)
    mine = [s for s in first[0] if s["request_id"].startswith(run)]
    assert len(mine) == 6
    recorded = {s["request_id"]: s for s in mine}
    assert recorded[f"{run}-0"]["event_id"] == events[0].event_id  # the first outcome wins
    assert recorded[f"{run}-3"]["status"] == "failed" and recorded[f"{run}-3"]["error"] == "boom"
    assert recorded[f"{run}-5"]["cost"] == Decimal("0.0006")
    rows = [c for c in first[1] if c["request_id"].startswith(run)]
    assert len(rows) == 12
    assert {c["event_id"] for c in rows} == {c.contribution_id for e in events for c in e.contributions}
    for e in events:
        assert sum(c["earnings"] for c in rows if c["request_id"] == e.request_id) == e.cost_far

    for e in events + [rerun]:  # the same events, delivered again
        await messaging.publish(running_ledger, topics.SESSIONS.name, e, e.request_id)
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    assert await snapshot(db_pool) == first


async def test_malformed_event_is_dead_lettered_and_the_rest_recorded(kafka_bootstrap, db_pool, running_ledger):
    good = outcome(f"{uuid.uuid4().hex[:8]}-ok")
    await hold(db_pool, good)
    await running_ledger.publish(b'{"type": "inference.completed", "request_id": 7}', topics.SESSIONS.name, key=b"bad")
    await messaging.publish(running_ledger, topics.SESSIONS.name, good, good.request_id)
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    assert await db_pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id = $1", good.request_id) == 1
    letters = [DeadLetter.model_validate_json(v) for v in await read_all(kafka_bootstrap, topics.DEAD_LETTER.name)]
    assert any(d.key == "bad" and d.consumer_group == "ledger" and "request_id" in d.reason for d in letters)


async def test_per_node_earnings_count_only_newly_settled_work(kafka_bootstrap, db_pool, ledger_and_registry):
    publisher, registry = ledger_and_registry
    run = uuid.uuid4().hex[:8]
    peers = (f"{run}-peerA", f"{run}-peerB")

    def node_metrics() -> dict[str, tuple[float | None, float | None]]:
        return {p: (registry.get_sample_value("farmesh_node_earnings_far_total", {"peer_id": p}),
                    registry.get_sample_value("farmesh_node_settled_tokens_total", {"peer_id": p})) for p in peers}

    events = [outcome(f"{run}-{i}", tokens=i + 1, failed=(i == 2), peers=peers) for i in range(4)]
    await hold(db_pool, *events)
    for e in events:
        await messaging.publish(publisher, topics.SESSIONS.name, e, e.request_id)
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    first = node_metrics()
    for p in peers:
        credits = [c for e in events for c in e.contributions if c.peer_id == p]
        earned = await db_pool.fetchval("SELECT sum(earnings) FROM far_session_contributions WHERE peer_id = $1", p)
        assert first[p][0] == pytest.approx(float(earned)) and earned == sum(c.earnings_far for c in credits)
        assert first[p][1] == sum(c.tokens_processed for c in credits)

    # The same events again, and a second outcome of a session already recorded (a rerun): nothing is settled.
    rerun = outcome(f"{run}-0", tokens=7, peers=peers)
    for e in events + [rerun]:
        await messaging.publish(publisher, topics.SESSIONS.name, e, e.request_id)
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    assert registry.get_sample_value("farmesh_ledger_duplicate_outcomes_total") >= len(events) + 1
    assert node_metrics() == first
