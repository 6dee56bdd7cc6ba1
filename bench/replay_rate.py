"""`farmesh replay` rate vs raw aiokafka consumption of the same topic.

A broker of our own (noida-db, or Apache Kafka with `--broker kafka`: farmesh.dev.local_services.start_local_broker,
127.0.0.1) gets N sessions on
farmesh.sessions (the worker's records: one inference.completed + one node.contribution per node, keyed
by request_id, 6 partitions). Baseline: a group-less AIOKafkaConsumer reading every partition from the
earliest offset to the end. Measured: consumers.ledger.replay.replay(), what `farmesh replay` runs (read the
same records, validate, apply the ledger's rule, rebuild the far_replay schema in a scratch database).
Alternating rounds. The baseline is the FASTEST raw round (raw reads on the dev broker sometimes stall
~0.5 s on a fetch wait; a stalled baseline would flatter the ratio), the replay figure the median round.

Also printed, not the target: the validation floor, the raw read plus pydantic validation of each outcome
record (what any replay must do before applying a rule), at its fastest round.

    python -m bench.replay_rate [--sessions 10000] [--rounds 3] [--broker noida|kafka]

ratio = replay records/s / raw records/s   (target >= 0.5)
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import asyncpg

from bench._common import Target, finish, ratio, say, scratch_database, stopwatch
from bench._sessions import PRICE, reserve_all, session_events, wire
from farmesh.billing import accounts
from farmesh.kafka import messaging
from farmesh.kafka.log_reader import topic_partitions
from schemas import money
from farmesh.dev.local_services import start_local_broker
from consumers.ledger.replay import CONTRIBUTION_HEADER, replay
from schemas import topics
from schemas.events import session_event_adapter

TARGET = Target(0.5)
PARTITIONS = 6


async def produce(bootstrap: str, account_id, sessions: int) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        sent = []
        for i in range(sessions):
            for event in session_events(i, account_id):
                sent.append(await producer.send(topics.SESSIONS.name, wire(event), key=event.request_id.encode(),
                                                headers=[(topics.EVENT_TYPE_HEADER, event.type.encode())]))
        await producer.flush()
        await asyncio.gather(*sent)
        return len(sent)
    finally:
        await producer.stop()


async def raw_read(bootstrap: str, topic: str, each: Callable[[Any], object] | None = None) -> int:
    """Every record of `topic`, earliest to the end offsets seen at start; group-less. `each` is called
    on every record (the validation floor); the baseline passes none."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending, count = {tp for tp in tps if ends[tp] > 0}, 0
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=1000, max_records=2000)).items():
                count += len(records)
                if each is not None:
                    for record in records:
                        each(record)
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)  # as replay does: fetch only what is still to read
        return count
    finally:
        await consumer.stop()


def validate_outcome(record: Any) -> None:
    """What any replay must do with a record before applying a rule: validate an outcome (the replay's own
    skip of node.contribution records by their header included)."""
    if CONTRIBUTION_HEADER not in record.headers:
        session_event_adapter.validate_json(record.value)



async def main(sessions: int, rounds: int, broker_kind: str = "noida") -> int:
    with tempfile.TemporaryDirectory(prefix="farmesh-bench-replay-") as tmp:
        broker = await asyncio.to_thread(start_local_broker, broker_kind, Path(tmp) / "kafka")
        try:
            async with scratch_database("farmesh_bench_replay") as url:
                await messaging.ensure_topics(broker.bootstrap, [(topics.SESSIONS.name, PARTITIONS)])
                conn = await asyncpg.connect(url)
                try:
                    client = await accounts.create_client(conn, "bench", money.to_base_units(PRICE))
                    await reserve_all(conn, client.account_id, [f"bench-{i}" for i in range(sessions)])
                    with stopwatch() as produce_t:
                        records = await produce(broker.bootstrap, client.account_id, sessions)
                    say(f"broker={broker_kind} sessions={sessions} records={records} partitions={PARTITIONS} "
                        f"(produced in {produce_t[0]:.2f} s)")
                    raw_rates, floor_rates, replay_rates = [], [], []
                    for n in range(rounds):
                        with stopwatch() as raw_t:
                            got = await raw_read(broker.bootstrap, topics.SESSIONS.name)
                        with stopwatch() as floor_t:
                            await raw_read(broker.bootstrap, topics.SESSIONS.name, validate_outcome)
                        with stopwatch() as replay_t:
                            state = await replay(url, broker.bootstrap)
                        if got != records or state.records != records or state.sessions != sessions or state.rejected:
                            raise SystemExit(f"raw read {got}, replay {state.records} records / {state.sessions} "
                                             f"sessions / {len(state.rejected)} rejected; expected {records} / {sessions}")
                        raw_rates.append(records / raw_t[0])
                        floor_rates.append(records / floor_t[0])
                        replay_rates.append(records / replay_t[0])
                        say(f"round {n + 1}: raw aiokafka {raw_t[0]:.3f} s ({raw_rates[-1]:,.0f} records/s), "
                            f"raw + outcome validation {floor_t[0]:.3f} s ({floor_rates[-1]:,.0f} records/s), "
                            f"replay {replay_t[0]:.3f} s ({replay_rates[-1]:,.0f} records/s)")
                finally:
                    await conn.close()
        finally:
            broker.stop()
    # The raw reader sometimes stalls ~0.5 s on the dev broker's fetch wait: its fastest round is the baseline,
    # so a stall never flatters the ratio.
    raw, rebuilt = max(raw_rates), statistics.median(replay_rates)
    say(f"baseline: fastest raw {raw:,.0f} records/s; median replay {rebuilt:,.0f} records/s")
    # Not the target: how far any replay that validates what it rebuilds from could get, at its fastest.
    say(f"validation floor: fastest raw + outcome validation {max(floor_rates):,.0f} records/s, "
        f"ratio {ratio(max(floor_rates), raw):.3f}")
    return finish(ratio(rebuilt, raw), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", choices=("noida", "kafka"), default="noida", help="noida-db or Apache Kafka")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.sessions, args.rounds, args.broker)))
