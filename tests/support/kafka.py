"""Test helpers for a real Kafka-protocol broker, and the one switch that chooses it.

FARMESH_TEST_BROKER=kafka|noida chooses the broker every fixture and drill starts:

- `kafka`: Apache Kafka 4.4.0 (farmesh/dev/kafka.py: jars resolved by Maven from deploy/kafka/pom.xml, once);
  the tests fail, saying why, where it cannot run. `.ci/run` sets it.
- `noida`: the embedded noida-db (nothing to install; `make demo`'s broker).
- unset: Apache Kafka where Java and the jars (or Maven to resolve them) are here, else noida-db, saying so
  in a warning and in the session's closing summary.

A few tests run on noida-db whatever the switch says, so that `make demo`'s path stays green: the embedded
broker's own tests (tests/integration/test_local_services.py) and `farmesh demo` (tests/e2e/test_local_mesh.py).
"""
from __future__ import annotations

import asyncio
import functools
import os
import time
import warnings
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from farmesh.dev.local_services import start_local_broker
from farmesh.kafka.lag import group_lag

SWITCH = "FARMESH_TEST_BROKER"


class BrokerUnavailable(RuntimeError):
    """The broker the switch asks for cannot run here."""


@functools.cache
def test_broker() -> str:
    """"kafka" or "noida": the broker the tests start (see the module's docstring)."""
    from farmesh.dev.kafka import kafka_unavailable_reason

    asked = os.environ.get(SWITCH, "").strip().lower()
    if asked not in ("", "kafka", "noida"):
        raise BrokerUnavailable(f"{SWITCH}={asked!r}: choose kafka or noida")
    if asked == "noida":
        return "noida"
    reason = kafka_unavailable_reason()
    if reason is None:
        return "kafka"
    if asked == "kafka":
        raise BrokerUnavailable(f"{SWITCH}=kafka but Apache Kafka cannot run here: {reason}")
    warnings.warn(f"{SWITCH} unset and Apache Kafka cannot run here ({reason}): the tests use noida-db", stacklevel=2)
    return "noida"


test_broker.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name


def on_kafka() -> bool:
    return test_broker() == "kafka"


def start_test_broker(data_dir: Path, port: int | None = None):  # noqa: ANN201 - LocalBroker | KafkaNode
    """The switch's broker on 127.0.0.1 with its data in `data_dir` (the caller stops it)."""
    return start_local_broker(test_broker(), data_dir, port)


start_test_broker.__test__ = False  # type: ignore[attr-defined]


async def wait_caught_up(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (lag := (await group_lag(bootstrap, group, [topic]))[topic]) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} still {lag} behind on {topic}")
        await asyncio.sleep(0.2)


async def read_to_end(bootstrap: str, topic: str) -> list[bytes]:
    """Every record of `topic` up to its end offsets when called (farmesh/kafka/log_reader.py, as a replay reads):
    bounded even while something keeps producing to it (read_all waits for a quiet moment, which a topic that live
    nodes heartbeat to never has)."""
    from farmesh.kafka.log_reader import read_log_batches

    return [r.value async for records in read_log_batches(bootstrap, topic, None, {}) for r in records]


async def read_all(bootstrap: str, topic: str, timeout: float = 2.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        out: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=int(timeout * 1000)):
            out += [r.value for records in batch.values() for r in records]
        return out
    finally:
        await consumer.stop()
