"""Fault drill on a three-broker Apache Kafka cluster: the leader of the sessions topic's partitions is SIGKILLed
while session outcomes are published and `farmesh ledger` consumes them.

Three KRaft nodes (each broker + controller) on loopback ports (farmesh/dev/kafka.py start_cluster); every topic
has replication factor 3 and `min.insync.replicas=2`, the internal ones too; unclean leader election is off. The
producers are the services' own (farmesh.kafka.messaging.create_broker: idempotent, hence acks=all), retrying an
unacknowledged event with the same event id. With acks=all a write is acknowledged only once both in-sync
followers have it, so killing the leader loses no acknowledged event: a follower in the ISR becomes leader.

The drill prints events sent, acknowledged and settled and the time to recover (a new leader for every partition
the victim led; the first acknowledgement after the kill; the ledger caught up), and checks: every acknowledged
event is in the log, every session settled once by its first outcome, every balance exact, audit clean.

Apache Kafka only (a noida-db cluster does not exist): skipped, saying so, when FARMESH_TEST_BROKER=noida.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from farmesh.dev.kafka import start_cluster
from farmesh.kafka import messaging
from schemas import topics
from tests.support.chaos import (
    RetryingProducer,
    Timer,
    make_load,
    recorded_sessions,
    scratch_database,
    start_service,
    until,
    assert_audit_passes,
    assert_exactly_once,
)
from tests.support.kafka import on_kafka, read_all, wait_caught_up

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SESSIONS = 300
NODES, MIN_ISR = 3, 2


async def leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """partition -> leader node id (-1 while it has none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-chaos")
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return {p["partition"]: p["leader"] for p in described["partitions"]}
    finally:
        await admin.close()


async def test_leader_killed_loses_no_acknowledged_event(tmp_path, postgres_admin_url):
    if not on_kafka():
        pytest.skip("a three-broker cluster is Apache Kafka's (FARMESH_TEST_BROKER=noida)")
    cluster = await asyncio.to_thread(start_cluster, tmp_path / "cluster", NODES, min_isr=MIN_ISR)
    ledger = publisher = None
    try:
        # Leaders spread over the nodes: one per partition, the victim leads at least one of the sessions topic's.
        await messaging.ensure_topics(cluster.bootstrap, messaging.mesh_topics(NODES), replication_factor=NODES)
        async with scratch_database(postgres_admin_url) as (url, pool):
            load = await make_load(pool, SESSIONS)
            env = {"FARMESH_KAFKA_BOOTSTRAP": cluster.bootstrap, "FARMESH_DATABASE_URL": url}
            ledger = start_service("ledger", env, tmp_path / "logs")
            publisher = RetryingProducer(cluster.bootstrap, attempt_timeout=5.0, in_doubt=0.0)
            publishing = asyncio.create_task(publisher.publish_all(load.events, pause_every=20, pause=0.05))

            async def a_third() -> int:
                n = await recorded_sessions(pool, load.run)
                return n if n >= SESSIONS / 3 else 0
            before = await until(a_third, 90, "a third of the sessions recorded")

            led = await leaders(cluster.bootstrap, topics.SESSIONS.name)
            victim_id = Counter(led.values()).most_common(1)[0][0]
            its = sorted(p for p, leader in led.items() if leader == victim_id)
            acked_before = len(publisher.acknowledged)
            cluster.node(victim_id).kill()
            kill_at = time.monotonic()
            killed = Timer()
            print(f"\nSIGKILLed broker {victim_id}, leader of {topics.SESSIONS.name} partitions {its}, with "
                  f"{acked_before} events acknowledged and {before}/{SESSIONS} sessions recorded")

            survivors = ",".join(n.bootstrap for n in cluster.nodes if n.node_id != victim_id)

            async def new_leaders() -> dict[int, int]:
                try:
                    now = await leaders(survivors, topics.SESSIONS.name)
                except Exception:  # noqa: BLE001 - the metadata may still name the dead broker: ask again
                    return {}
                return now if all(now[p] not in (-1, victim_id) for p in its) else {}
            moved = await until(new_leaders, 60, "new leaders for the victim's partitions", interval=0.05)
            elected = killed()

            async def acked_after_kill() -> float:
                return next((t - kill_at for t in publisher.ack_times[acked_before:] if t > kill_at), 0.0)
            producing_again = await until(acked_after_kill, 60, "an acknowledgement after the kill")

            await asyncio.wait_for(publishing, 180)
            await wait_caught_up(survivors, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=120)
            caught_up = killed()
            assert ledger.process.poll() is None, ledger.log_tail()

            sent = {e.event_id for _, e in load.events}
            written = Counter(json.loads(v)["event_id"] for v in await read_all(survivors, topics.SESSIONS.name))
            lost = {str(e) for e in publisher.acknowledged} - written.keys()
            settled = await recorded_sessions(pool, load.run)
            print(f"new leaders {[moved[p] for p in its]} for partitions {its} {elected:.1f} s after the kill; "
                  f"first acknowledgement after it at {producing_again:.1f} s; ledger caught up {caught_up:.1f} s after it")
            print(f"events sent {len(sent)}, acknowledged {len(publisher.acknowledged)}, in the log "
                  f"{len(written)} ({sum(n > 1 for n in written.values())} written twice by retries), "
                  f"acknowledged and lost {len(lost)}; sessions {SESSIONS}, settled {settled}; "
                  f"{publisher.retries} publish attempt(s) retried")
            assert not lost, f"acknowledged events lost: {sorted(lost)[:10]}"
            assert publisher.acknowledged == sent
            await assert_exactly_once(pool, load)
            print(assert_audit_passes(url).strip().splitlines()[-1])
    finally:
        if publisher is not None:
            await publisher.close()
        if ledger is not None:
            ledger.stop()
        await asyncio.to_thread(cluster.stop, 15.0)
