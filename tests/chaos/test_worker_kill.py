"""Fault drill: an inference worker is killed with SIGKILL in the middle of a generation.

Two `farmesh worker` processes share the consumer group `inference` on the session's loopback swarm; a request
is published straight to the requests topic (with its reservation, as the gateway would). When the worker
running it has streamed a few tokens it is killed (its whole process group). Its request's offset was never
committed. On Apache Kafka nothing is sent on the dead worker's behalf: the broker expires its members after the
group's session timeout (consumers/inference/consumer.py SESSION_TIMEOUT_MS, 6 s) and the group rebalances; the
drill prints the recovery time (kill to the first redelivered token, and to the end). The other worker receives
the request again and generates it from the start; it completes, and the
ledger records one session, charged once, for the tokens of the run that finished. The killed run published no
outcome, so nothing of it is charged. `farmesh ledger audit` passes.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.inference.consumer import SESSION_TIMEOUT_MS
from farmesh.billing import accounts

from farmesh.kafka import messaging
from schemas import topics
from schemas.events import (
    InferenceRequested,
    NodeContribution,
    StreamEnded,
    reply_event_adapter,
    session_event_adapter,
)
from tests.support.chaos import (
    FEE,
    dead_member_leaves,
    group_members,
    kill9,
    ledger_drill,
    member_ids,
    start_service,
    until,
)
from tests.support.kafka import on_kafka, read_all

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

PROMPT = "Fault drill: a worker dies while it generates"
MAX_TOKENS = 120
KILL_AFTER = 5  # tokens streamed by the first worker
PRICE = Decimal("0.0001")
RECEIVED = re.compile(rf"{re.escape(topics.REQUESTS.name)} \| {topics.GROUP_INFERENCE} \| \S+ - Received")  # FastStream's log


async def test_killed_worker_request_is_redelivered_and_charged_once(swarm, tmp_path, postgres_admin_url):
    async with ledger_drill(tmp_path, postgres_admin_url, 0) as drill:
        # The drill's database: the worker checks each request against its reservation there (and, with no node
        # registered, routes over any node of the swarm).
        env = {**drill.env,
               "FARMESH_INITIAL_PEERS": ",".join(swarm.initial_peers), "FARMESH_MODEL": str(swarm.model_dir),
               "FARMESH_DHT_PREFIX": swarm.dht_prefix}
        workers = []
        try:
            with ThreadPoolExecutor(2) as starting:  # each loads the model's local parts: in parallel
                futures = [starting.submit(start_service, "worker", env, tmp_path / "logs") for _ in range(2)]
            workers = [f.result() for f in futures if f.exception() is None]
            assert len(workers) == 2, [f.exception() for f in futures]

            async def both_in_the_group() -> bool:  # each worker has one member per concurrent generation
                state, members = await group_members(drill.broker.bootstrap, topics.GROUP_INFERENCE)
                each = [member_ids(w, topics.GROUP_INFERENCE) for w in workers]
                return state == "Stable" and members == set().union(*each) and all(each)
            await until(both_in_the_group, 30, "both workers in the group `inference`", interval=0.2)

            request_id, reply_topic = f"{drill.load.run}-w", f"{topics.REPLIES.name}.chaos-{drill.load.run}"
            await messaging.ensure_topics(drill.broker.bootstrap, [(reply_topic, 1)])
            await accounts.reserve(drill.pool, f"Bearer {drill.load.key}", accounts.Reservation(
                request_id=request_id, model=swarm.dht_prefix, max_tokens=MAX_TOKENS, price=PRICE, fee_rate=FEE))
            request = InferenceRequested(request_id=request_id, model=swarm.dht_prefix, prompt=PROMPT,
                                         max_tokens=MAX_TOKENS, price_per_token=PRICE, account_id=drill.load.account_id,
                                         platform_fee_rate=FEE, reply_topic=reply_topic)
            replies = AIOKafkaConsumer(reply_topic, bootstrap_servers=drill.broker.bootstrap,
                                       auto_offset_reset="earliest", fetch_max_wait_ms=10)
            await replies.start()
            try:
                await drill.publisher.publish(request_id, request, topics.REQUESTS.name)
                events, arrived = [], []

                async def read_until(done, timeout: float) -> None:
                    deadline = time.monotonic() + timeout
                    while not done():
                        assert time.monotonic() < deadline, f"replies so far: {[e.type for e in events]}"
                        batch = await replies.getmany(timeout_ms=50)
                        for records in batch.values():
                            for r in records:
                                events.append(reply_event_adapter.validate_json(r.value))
                                arrived.append(time.monotonic())

                await read_until(lambda: len(events) >= KILL_AFTER, 60)
                running = [w for w in workers if RECEIVED.search(w.log_path.read_text(errors="replace"))]
                assert len(running) == 1, "exactly one worker received the request"
                [victim] = running
                kill9(victim)
                killed_at = time.monotonic()
                first_run = list(events)
                assert not any(isinstance(e, StreamEnded) for e in first_run), "killed too late: it had finished"
                print(f"\nkilled the worker (SIGKILL) after {len(first_run)} streamed tokens")
                await dead_member_leaves(drill.broker.bootstrap, topics.GROUP_INFERENCE, victim)
                if on_kafka():
                    print("no LeaveGroup sent: Apache Kafka expires the dead worker's members after the group's "
                          f"session timeout ({SESSION_TIMEOUT_MS / 1000:g} s)")
                await read_until(lambda: isinstance(events[-1], StreamEnded), 90)
                second_run = events[len(first_run):-1]
                restarted = next(i for i, e in enumerate(second_run) if e.index == 0)
                first_again, done = arrived[len(first_run) + restarted] - killed_at, arrived[-1] - killed_at
                print(f"redelivered to the other worker: its first token {first_again:.1f} s after the kill, "
                      f"all {len(second_run) - restarted} tokens and the end {done:.1f} s after it")
            finally:
                await replies.stop()
            ended = events[-1]
            assert ended.status == "completed", ended
            tokens = second_run[restarted:]
            assert [e.index for e in tokens] == list(range(ended.usage.completion_tokens))
            # greedy: the killed run streamed a prefix of the same tokens
            assert [e.token_id for e in first_run] == [e.token_id for e in tokens[:len(first_run)]]


            # The ledger: one outcome on the topic (the killed run never published one), recorded and charged once.
            await drill.caught_up()
            outcomes = [e for e in map(session_event_adapter.validate_json,
                                       await read_all(drill.broker.bootstrap, topics.SESSIONS.name))
                        if not isinstance(e, NodeContribution)]
            assert [o.request_id for o in outcomes] == [request_id]
            assert outcomes[0].completion_tokens == ended.usage.completion_tokens
            assert outcomes[0].cost_far == ended.usage.completion_tokens * PRICE == ended.usage.cost_far
            drill.load.winners = outcomes
            await drill.verify()
        finally:
            for w in workers:
                w.stop()
