"""Fault drills' helpers: services as real, killable processes; a stream of session outcomes whose
exact money is known; the exactly-once checks every drill ends with.

Every process here binds 127.0.0.1 and is stopped by its process id (its process group).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.group import LeaveGroupRequest

from db import scratch
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from farmesh.dev.local_services import free_port
from farmesh.dev.processes import ManagedProcess
from schemas import topics
from schemas.events import Event, SessionOutcome
from tests.support.kafka import on_kafka, start_test_broker, wait_caught_up
from tests.support.money import outcome, producer, reserve_for

FEE = Decimal("0.05")
CREDIT = Decimal(10)


# ------------------------------------------------------------------------------------------------ processes

def start_service(command: str, env: dict[str, str], workdir: Path, *, timeout: float = 120.0) -> ManagedProcess:
    """`farmesh <command>` (ledger, worker, ...) as its own process group; returns once it printed
    `<command> ready` (its metrics port is a free one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "farmesh.cli", command, "--metrics-port", str(free_port())]
    process = ManagedProcess(command, argv, workdir / f"{command}-{time.time_ns()}.log",
                             {"FARMESH_DATA_DIR": str(workdir), "FARMESH_LOG_LEVEL": "INFO", **env})
    process.wait_ready(f"{command} ready", timeout)
    return process


def kill9(process: ManagedProcess) -> None:
    """SIGKILL the whole process group at once (a crashed container), then reap it and clean up after it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.process.wait(10)
    process.stop()


def member_ids(process: ManagedProcess, group: str) -> set[str]:
    """The consumer-group member ids a service process had (aiokafka logs each join at INFO)."""
    text = process.log_path.read_text(errors="replace")
    return set(re.findall(rf"Joined group '{re.escape(group)}' \(generation \d+\) with member_id (\S+)", text))


async def group_members(bootstrap: str, group: str) -> tuple[str, set[str]]:
    """(state, member ids) of a consumer group, from the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-chaos")
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        [described] = response.groups
        return described[2], {m[0] for m in described[5]}
    finally:
        await admin.close()


async def expire_members(bootstrap: str, group: str, members: set[str]) -> None:
    """Drop a killed process's members from its consumer group, as the broker's session timeout would.

    Apache Kafka does this by itself once a member sent no heartbeat for session.timeout.ms (10 s for aiokafka):
    the group rebalances and the dead member's partitions go to the live members, from their committed offsets.
    The dev broker (noida-db 0.2.3) never expires a member: a SIGKILLed consumer's partitions stay assigned to
    it for good, and a consumer joining later is told the dead member leads the group, so the group never syncs
    again. A LeaveGroup on the dead member's behalf is the standard request that removes it at once.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-chaos")
    await admin.start()
    try:
        coordinator = await admin._client.coordinator_lookup(CoordinationType.GROUP, group)
        for member in members:
            response = await admin._client.send(coordinator, LeaveGroupRequest(group, member))
            if response.error_code not in (0, 25):  # 25: UNKNOWN_MEMBER_ID, already gone
                raise for_code(response.error_code)(f"leaving {group} for {member}")
    finally:
        await admin.close()


async def dead_member_leaves(bootstrap: str, group: str, process: ManagedProcess) -> None:
    """What happens to a SIGKILLed consumer's group membership: on Apache Kafka nothing needs doing (its session
    times out: the group's session_timeout_ms, then a rebalance); on the dev broker, which never expires a member,
    the drill sends the LeaveGroup (expire_members)."""
    if not on_kafka():
        await expire_members(bootstrap, group, member_ids(process, group))


def audit_cli(database_url: str) -> subprocess.CompletedProcess:
    """`farmesh ledger audit` as an operator runs it: a process of its own."""
    return subprocess.run([sys.executable, "-m", "farmesh.cli", "ledger", "audit", "--database-url", database_url],
                          capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "FARMESH_LOG_LEVEL": "WARNING"})


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, prefix: str = "farmesh_chaos") -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A fresh, migrated database with a unique name on `admin_url`'s server (dropped afterwards), and a pool."""
    async with scratch.scratch_database(admin_url, prefix) as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        try:
            yield url, pool
        finally:
            await pool.close()


class Timer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


async def until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll the async `predicate` until it returns something truthy (returned); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not (result := await predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(interval)
    return result


# ------------------------------------------------------------------------------------------------ load

@dataclass
class Load:
    """The sessions a drill pushes through the ledger, one client account paying for all of them.

    `events` is what workers would publish, in order: per request its outcome and its contribution events;
    every 7th request ran twice (a redelivered request: a second outcome with other ids, which must be ignored).
    `winners` are the outcomes the ledger must record: the first of each request.
    """

    run: str
    account_id: uuid.UUID
    key: str  # the account's API key (reservations)
    winners: list[SessionOutcome]
    events: list[tuple[str, Event]] = field(default_factory=list)  # (key, event)


async def make_load(pool: asyncpg.Pool, sessions: int) -> Load:
    """`sessions` reserved requests and their outcomes (1..7 tokens, varied routes, every 10th failed)."""
    run = uuid.uuid4().hex[:8]
    async with pool.acquire() as conn:
        issued = await accounts.create_client(conn, f"chaos-{run}", money.to_base_units(CREDIT))
    now = datetime.now(UTC)
    load = Load(run, issued.account_id, issued.key, [])
    for i in range(sessions):
        first = outcome(f"{run}-{i}", issued.account_id, 1 + i % 7, now, i=i, fee=FEE, failed=i % 10 == 3)
        await reserve_for(pool, issued.key, first, max_tokens=10)
        load.winners.append(first)
        outcomes = [first]
        if i % 7 == 0:  # ran again after a redelivery: more tokens, other ids; never charged
            outcomes.append(outcome(first.request_id, issued.account_id, 8, now, i=i + 1, fee=FEE))
        for o in outcomes:
            load.events += [(o.request_id, e) for e in (o, *o.contribution_events())]
    return load


# ------------------------------------------------------------------------------------------------ producing

class RetryingProducer:
    """Publishes events in order; a publish that fails (broker down, connection lost) is retried with the
    SAME event (same event_id) until it is acknowledged, on a fresh producer connection.

    That is the idempotency contract: an event may be delivered more than once (it may have been written
    before the failure was reported), and every consumer ignores an event id, and a request's later outcome,
    it has already recorded; so a retry never charges twice, and giving up would lose a session.

    In doubt, publish again: when a publish fails, the events acknowledged during the `in_doubt` seconds before
    the last acknowledgement are published again (same ids, original order) before the failed one. The dev
    broker (noida-db 0.2.3) acknowledges writes that reach it while it shuts down and does not keep them (the
    broker-restart drill measured 0 to 8 such events, all within ~20 ms of the stop). Apache Kafka with
    acks=all never loses an acknowledged write: the drills run there with `in_doubt=0` (nothing published again).
    """

    def __init__(self, bootstrap: str, *, attempt_timeout: float = 5.0, give_up_after: float = 60.0,
                 in_doubt: float = 1.0) -> None:
        self.bootstrap = bootstrap
        self.attempt_timeout = attempt_timeout
        self.give_up_after = give_up_after
        self.in_doubt = in_doubt
        self.retries = 0
        self.republished = 0
        self.failures: list[str] = []
        self.acknowledged: set[uuid.UUID] = set()  # event ids the broker acknowledged (acks=all: idempotent producer)
        self.ack_times: list[float] = []  # time.monotonic() of each acknowledgement
        self._broker = None
        self._acked: deque[tuple[float, str, Event, str]] = deque()  # (when, key, event, topic), last in_doubt s

    async def publish(self, key: str, event: Event, topic: str = topics.SESSIONS.name) -> None:
        deadline = time.monotonic() + self.give_up_after
        pending, requeued = [(key, event, topic)], False
        while pending:
            try:
                if self._broker is None:
                    self._broker = await asyncio.wait_for(producer(self.bootstrap), self.attempt_timeout)
                k, e, t = pending[0]
                await asyncio.wait_for(messaging.publish(self._broker, t, e, k), self.attempt_timeout)
                pending.pop(0)
                self.acknowledged.add(e.event_id)
                self.ack_times.append(time.monotonic())
                self._remember(k, e, t)
            except (KafkaError, OSError, TimeoutError) as exc:
                self.retries += 1
                self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
                if not requeued:  # once per failed publish: what was acknowledged just before may be gone
                    requeued, doubtful = True, [(k, e, t) for _, k, e, t in self._acked]
                    self._acked.clear()
                    pending[:0] = doubtful
                    self.republished += len(doubtful)
                await self._drop()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def _remember(self, key: str, event: Event, topic: str) -> None:
        if self.in_doubt <= 0:  # Apache Kafka: an acknowledged write is kept
            return
        now = time.monotonic()
        self._acked.append((now, key, event, topic))
        while self._acked[0][0] < now - self.in_doubt:
            self._acked.popleft()

    async def publish_all(self, events: Sequence[tuple[str, Event]], pause_every: int = 0, pause: float = 0.0) -> None:
        for n, (key, event) in enumerate(events, 1):
            await self.publish(key, event)
            if pause_every and n % pause_every == 0:
                await asyncio.sleep(pause)

    async def _drop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broker.stop(), self.attempt_timeout)

    async def close(self) -> None:
        await self._drop()


# ------------------------------------------------------------------------------------------------ checks

async def recorded_sessions(pool: asyncpg.Pool, run: str) -> int:
    return await pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id LIKE $1", f"{run}-%")


async def assert_exactly_once(pool: asyncpg.Pool, load: Load) -> None:
    """Every session of the load recorded once, by its first outcome, and charged exactly once: settlement
    postings, reservations and every balance equal what the winning outcomes say, to the base unit."""
    winners = {o.request_id: o for o in load.winners}
    sessions = {r["request_id"]: r for r in await pool.fetch(
        "SELECT request_id, event_id, status, cost, platform_fee FROM far_mesh_sessions WHERE request_id LIKE $1",
        f"{load.run}-%")}
    missing, extra = winners.keys() - sessions.keys(), sessions.keys() - winners.keys()
    assert not missing and not extra, f"lost sessions {sorted(missing)[:10]}, unexpected {sorted(extra)[:10]}"
    for rid, s in sessions.items():
        o = winners[rid]
        assert (s["event_id"], s["cost"], s["platform_fee"]) == (o.event_id, o.cost_far, o.platform_fee_far), rid
    settlements = await pool.fetch(
        "SELECT request_id, count(*) AS n, min(txn_id::text) AS txn FROM far_ledger_transactions "
        "WHERE kind = 'settlement' AND request_id LIKE $1 GROUP BY request_id", f"{load.run}-%")
    assert len(settlements) == len(winners)
    assert all(r["n"] == 1 and r["txn"] == str(winners[r["request_id"]].event_id) for r in settlements)
    credited = await pool.fetchval(
        "SELECT count(*) FROM far_ledger_entries e JOIN far_ledger_transactions t USING (txn_id) "
        "WHERE t.request_id LIKE $1 AND e.contribution_id IS NOT NULL", f"{load.run}-%")
    assert credited == sum(len(o.contributions) for o in load.winners)

    reservations = dict(await pool.fetch(
        "SELECT status, count(*) FROM far_reservations WHERE request_id LIKE $1 GROUP BY status", f"{load.run}-%"))
    failed = sum(o.type == "inference.failed" for o in load.winners)
    assert reservations == {k: v for k, v in (("settled", len(winners) - failed), ("released", failed)) if v}

    spent = sum(money.to_base_units(o.cost_far) for o in load.winners)
    have, reserved = await accounts.balance(pool, load.account_id)
    assert (have, reserved) == (money.to_base_units(CREDIT) - spent, 0)
    earned: dict[str, int] = defaultdict(int)
    for o in load.winners:
        for c in o.contributions:
            earned[c.peer_id] += money.to_base_units(c.earnings_far)
    nodes = {r["peer_id"]: money.to_base_units(r["balance"]) for r in await pool.fetch(
        "SELECT peer_id, balance FROM far_account_balances WHERE kind = 'node'")}
    assert nodes == dict(earned)
    fees = await pool.fetchval("SELECT balance FROM far_account_balances WHERE kind = 'platform'")
    assert money.to_base_units(fees) == sum(money.to_base_units(o.platform_fee_far) for o in load.winners)


def assert_audit_passes(database_url: str) -> str:
    result = audit_cli(database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit: 0 break(s)" in result.stdout
    return result.stdout


# ------------------------------------------------------------------------------------------------ the ledger drills

@dataclass
class LedgerDrill:
    """A broker and a database of the drill's own, `farmesh ledger` running as a process against them, a load of
    reserved sessions and a producer ready to publish its outcomes. The drill breaks something in between."""

    workdir: Path
    broker: Any  # LocalBroker (noida-db) or KafkaNode (Apache Kafka): tests/support/kafka.py's switch
    url: str
    pool: asyncpg.Pool
    load: Load
    publisher: RetryingProducer
    ledger: ManagedProcess | None = None
    publishing: asyncio.Task | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"FARMESH_KAFKA_BOOTSTRAP": self.broker.bootstrap, "FARMESH_DATABASE_URL": self.url}

    def start_ledger(self) -> float:
        """Start (or restart) the ledger process; returns how long it took to be ready."""
        took = Timer()
        self.ledger = start_service("ledger", self.env, self.workdir / "logs")
        return took()

    def start_publishing(self, pause_every: int, pause: float) -> None:
        """Publish the load's events in the background, pausing `pause` s every `pause_every` events."""
        self.publishing = asyncio.create_task(self.publisher.publish_all(self.load.events, pause_every, pause))

    async def until_recorded(self, share: float, timeout: float = 60.0) -> int:
        """Wait until the ledger recorded `share` of the sessions; returns how many it had."""
        async def enough() -> int:
            n = await recorded_sessions(self.pool, self.load.run)
            return n if n >= share * len(self.load.winners) else 0
        return await until(enough, timeout, f"{share:.0%} of the sessions recorded")

    async def caught_up(self, timeout: float = 60.0) -> None:
        """Every event published and the ledger group's offsets committed up to the end of the topic."""
        if self.publishing is not None:
            await asyncio.wait_for(self.publishing, timeout)
        await wait_caught_up(self.broker.bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=timeout)

    async def verify(self) -> None:
        """No session lost or charged twice, every balance exact, and `farmesh ledger audit` passes."""
        await assert_exactly_once(self.pool, self.load)
        assert_audit_passes(self.url)


@contextlib.asynccontextmanager
async def ledger_drill(workdir: Path, admin_url: str, sessions: int, *,
                       attempt_timeout: float = 5.0) -> AsyncIterator[LedgerDrill]:
    """A LedgerDrill with the ledger started; everything it started is stopped afterwards (the broker the drill
    holds at the end too, if it restarted it), and the database dropped."""
    broker = await asyncio.to_thread(start_test_broker, workdir / "kafka")
    drill: LedgerDrill | None = None
    try:
        await messaging.ensure_topics(broker.bootstrap, messaging.mesh_topics(3))
        async with scratch_database(admin_url) as (url, pool):
            # Apache Kafka with acks=all keeps every write it acknowledged: nothing is published again there.
            in_doubt = 0.0 if on_kafka() else 1.0
            drill = LedgerDrill(workdir, broker, url, pool, await make_load(pool, sessions),
                                RetryingProducer(broker.bootstrap, attempt_timeout=attempt_timeout, in_doubt=in_doubt))
            try:
                drill.start_ledger()
                yield drill
            finally:
                if drill.publishing is not None and not drill.publishing.done():
                    drill.publishing.cancel()
                    await asyncio.gather(drill.publishing, return_exceptions=True)
                await drill.publisher.close()
                if drill.ledger is not None:
                    drill.ledger.stop()
    finally:
        await asyncio.to_thread(broker.stop)
        if drill is not None and drill.broker is not broker:
            await asyncio.to_thread(drill.broker.stop)
