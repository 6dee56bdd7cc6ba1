"""Embedded dev services: the noida-db broker and the embedded PostgreSQL."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from farmesh.kafka.messaging import ensure_topics
from farmesh.dev.local_services import (
    free_port,
    pid_alive,
    start_broker,
    start_postgres,
)

pytestmark = pytest.mark.integration


def _processes_using(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions `path`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


async def test_broker_start_stop_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    port = free_port()
    broker = start_broker(data_dir, port)
    try:
        assert broker.bootstrap == f"127.0.0.1:{port}"
        assert await ensure_topics(broker.bootstrap, [("kept", 2)]) == ["kept"]
    finally:
        broker.stop()
    assert not pid_alive(broker.pid)
    assert not _processes_using(data_dir)
    assert (data_dir / "broker.log").exists()

    broker = start_broker(data_dir)  # same data dir, new port
    try:
        assert await ensure_topics(broker.bootstrap, [("kept", 2)]) == []  # topic survived the restart
    finally:
        broker.stop()
    assert not pid_alive(broker.pid)


async def test_topics_and_roundtrip(kafka_bootstrap: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    wanted = [(f"farmesh.test.a.{suffix}", 3), (f"farmesh.test.b.{suffix}", 1)]
    assert sorted(await ensure_topics(kafka_bootstrap, wanted)) == sorted(n for n, _ in wanted)
    assert await ensure_topics(kafka_bootstrap, wanted + [(wanted[0][0], 7)]) == []  # idempotent

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([n for n, _ in wanted])}
    finally:
        await admin.close()
    assert described == dict(wanted)  # existing topics were left alone (3, not 7)

    topic = wanted[0][0]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"req-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=f"g-{suffix}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), 15)
    finally:
        await consumer.stop()
    assert (msg.key, msg.value, msg.partition, msg.offset) == (b"req-1", b"hello", meta.partition, meta.offset)


async def test_embedded_postgres_tcp_persist_and_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    server = start_postgres(data_dir)
    try:
        assert server.dsn.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
            await conn.execute("CREATE TABLE kept (v TEXT); INSERT INTO kept VALUES ('yes')")
        finally:
            await conn.close()
    finally:
        server.stop()
    assert not pid_alive(server.pid)
    assert not _processes_using(data_dir)

    server = start_postgres(data_dir)  # reuses the cluster
    try:
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT v FROM kept") == "yes"
        finally:
            await conn.close()
    finally:
        server.stop()
    assert not pid_alive(server.pid)
    assert not _processes_using(data_dir)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(server.dsn, timeout=2)
