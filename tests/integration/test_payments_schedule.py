"""The weekly batch close that the payments service runs on its own schedule (real broker and PostgreSQL)."""
from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumers.payments import consumer as payments
from consumers.payments.repository import PostgresPayments, iso_week, week_start
from consumers.payments.schedule import WeeklyClose
from farmesh.billing import accounts
from schemas import money
from farmesh.dev.local_services import free_port
from farmesh.dev.processes import ManagedProcess
from schemas import topics
from schemas.events import PaymentBatchClosed
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import money_env, outcome, producer, reserve_for

pytestmark = pytest.mark.integration

W10, W11, W12 = "2025-W10", "2025-W11", "2025-W12"
GRACE = 600.0
ALPHA, BETA = "QmScheduleAlpha", "QmScheduleBeta"


@pytest.fixture
async def env(tmp_path, postgres_admin_url):
    async with money_env(tmp_path, postgres_admin_url) as e:
        await e.pool.executemany("INSERT INTO far_nodes (peer_id, wallet, state) VALUES ($1, $2, 'online')",
                                 [(ALPHA, "0xA1"), (BETA, "0xB2")])
        yield e


def closes(registry: CollectorRegistry) -> tuple[float | None, ...]:
    return tuple(registry.get_sample_value(name) for name in (
        "farmesh_payments_batch_close_seconds_count", "farmesh_payments_batch_lines_total",
        "farmesh_payments_last_closed_week_end_timestamp_seconds"))


async def test_due_weeks_close_in_order_once_and_are_timed(env):
    async with env.pool.acquire() as conn:
        client = await accounts.create_client(conn, "schedule", money.to_base_units(Decimal(1)))
    work = {W10: [outcome(f"{W10}-{i}", client.account_id, 3 + i, week_start(W10) + timedelta(hours=5 + i),
                          peers=[(ALPHA, 0, 2), (BETA, 2, 4)]) for i in range(3)],
            W11: [outcome(f"{W11}-0", client.account_id, 4, week_start(W11) + timedelta(days=2), peers=[(BETA, 0, 4)])]}
    for o in work[W10] + work[W11]:  # what the gateway reserved for each request
        await reserve_for(env.pool, client.key, o)
    broker = await producer(env.bootstrap)
    try:
        async with running(env.bootstrap, {topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, env.pool, r)}):
            for o in work[W10] + work[W11]:
                await broker.publish(o, topics.SESSIONS.name, key=o.request_id.encode())
            await wait_caught_up(env.bootstrap, topics.GROUP_PAYMENTS, topics.SESSIONS.name)

        registry = CollectorRegistry()
        batch_closed = broker.publisher(topics.PAYMENTS.name)  # declared, like the group router's in the service
        closer = WeeklyClose(PostgresPayments(env.pool), batch_closed, registry, grace=GRACE, min_payout=0)
        # Nothing closed yet: only the latest week that ended GRACE ago, W09 (W10's grace is still running).
        (first,) = await closer.close_due(week_start(W11) + timedelta(seconds=GRACE - 1))
        assert (first.event.week, first.created, first.event.lines) == ("2025-W09", True, [])
        assert closes(registry) == (1.0, 0.0, week_start(W10).timestamp())

        (closed,) = await closer.close_due(week_start(W11) + timedelta(seconds=GRACE))
        assert closed.created and closed.event.week == W10 and len(closed.event.lines) == 2
        assert closes(registry) == (2.0, 2.0, week_start(W11).timestamp())
        assert registry.get_sample_value("farmesh_payments_batch_close_seconds_sum") == pytest.approx(
            first.seconds + closed.seconds)
        # Checked again (the service checks every minute): nothing is due, nothing is observed.
        assert await closer.close_due(week_start(W11) + timedelta(days=3)) == []
        assert closes(registry) == (2.0, 2.0, week_start(W11).timestamp())

        # Down for two weeks: W11 and W12 (empty) close, in order.
        done = await closer.close_due(week_start("2025-W13") + timedelta(seconds=GRACE))
        assert [(c.event.week, c.created, len(c.event.lines)) for c in done] == [(W11, True, 1), (W12, True, 0)]
        assert closes(registry) == (4.0, 3.0, week_start("2025-W13").timestamp())
        assert registry.get_sample_value("farmesh_payments_batch_close_failures_total") == 0

        # A restarted service (fresh metrics) finds its last closed week in the database.
        restarted = CollectorRegistry()
        assert await WeeklyClose(PostgresPayments(env.pool), batch_closed, restarted, grace=GRACE, min_payout=0).close_due(
            week_start("2025-W13") + timedelta(days=1)) == []
        assert closes(restarted) == (0.0, 0.0, week_start("2025-W13").timestamp())
    finally:
        await broker.stop()

    batches = [PaymentBatchClosed.model_validate_json(v) for v in await read_all(env.bootstrap, topics.PAYMENTS.name)]
    assert sorted(b.week for b in batches) == ["2025-W09", W10, W11, W12]  # keyed by week: any partition
    for b in batches:
        owed = sum((c.earnings_far for o in work.get(b.week, []) for c in o.contributions), Decimal(0))
        assert b.total_far == owed


async def test_the_payments_service_closes_the_week_that_ended_and_exports_the_duration(env, tmp_path):
    port = free_port()
    service = ManagedProcess(
        "payments", [sys.executable, "-m", "farmesh.cli", "payments", "--metrics-port", str(port)], tmp_path / "payments.log",
        {"FARMESH_KAFKA_BOOTSTRAP": env.bootstrap, "FARMESH_DATABASE_URL": env.database_url,
         "FARMESH_TOPIC_PARTITIONS": "3", "FARMESH_PAYMENTS_CLOSE_GRACE": "0", "FARMESH_MIN_PAYOUT": "0"})
    try:
        await asyncio.to_thread(service.wait_ready, "payments ready", 90)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while "farmesh_payments_batch_close_seconds_count 1.0" not in (text := (await http.get("/metrics")).text):
                assert time.monotonic() < deadline and service.process.poll() is None, service.log_tail()
                await asyncio.sleep(0.5)
        week = await env.pool.fetchval("SELECT max(week) FROM far_payment_weeks")
        # Grace 0: the week that ended last, i.e. the one before this one (unless the clock just crossed Monday).
        assert week in {iso_week(datetime.now(timezone.utc) - timedelta(days=7)),
                        iso_week(datetime.now(timezone.utc) - timedelta(days=7, minutes=2))}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("farmesh_payments_last_closed_week_end_timestamp_seconds", ())] == (
            week_start(week) + timedelta(days=7)).timestamp()
        assert samples[("farmesh_payments_batch_close_seconds_bucket", (("le", "+Inf"),))] == 1
        assert samples[("farmesh_payments_batch_close_seconds_sum", ())] > 0
    finally:
        await asyncio.to_thread(service.stop)
    batches = [PaymentBatchClosed.model_validate_json(v) for v in await read_all(env.bootstrap, topics.PAYMENTS.name)]
    assert [b.week for b in batches] == [week]
