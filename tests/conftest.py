"""Shared fixtures for the integration tests: a Kafka-protocol broker and PostgreSQL databases.

Where they come from, first match wins:

- Kafka: $FARMESH_TEST_KAFKA_BOOTSTRAP (a broker of your own); else the broker FARMESH_TEST_BROKER chooses
  (kafka: Apache Kafka 4.4.0, noida: the embedded noida-db; unset: Apache Kafka where it can run, else
  noida-db; tests/support/kafka.py) on free 127.0.0.1 ports. The drills start brokers of their own, the same kind.
- PostgreSQL server: $FARMESH_TEST_DATABASE_URL; postgresql://127.0.0.1:5432/postgres if it
  answers; a testcontainers PostgresContainer where Docker answers; else an embedded PostgreSQL.
  Each test database is a fresh `farmesh_test_<random>` on that server, dropped afterwards.

Everything this starts is stopped at the end of the session.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator

from pathlib import Path

import asyncpg
import pytest

from db import scratch
from db.scratch import drop_database
from farmesh.dev.local_services import start_postgres
from tests.support.kafka import SWITCH, test_broker, start_test_broker

LOCAL_POSTGRES_URL = "postgresql://127.0.0.1:5432/postgres"


@functools.cache
def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


async def _answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def create_database(admin_url: str, prefix: str = "farmesh_test") -> str:
    """Create an empty database with a random name on `admin_url`'s server; returns its URL."""
    return await scratch.create_database(admin_url, prefix)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Kafka-protocol broker for the whole session."""
    if env := os.environ.get("FARMESH_TEST_KAFKA_BOOTSTRAP"):
        yield env
    else:
        broker = start_test_broker(tmp_path_factory.mktemp("kafka"))
        try:
            yield broker.bootstrap
        finally:
            broker.stop()


@pytest.fixture(scope="session")
async def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """URL of a database on a server where the tests may create and drop databases."""
    if env := os.environ.get("FARMESH_TEST_DATABASE_URL"):
        yield env
    elif await _answers(LOCAL_POSTGRES_URL):
        yield LOCAL_POSTGRES_URL
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        server = start_postgres(tmp_path_factory.mktemp("postgres") / "data")
        try:
            yield server.dsn
        finally:
            server.stop()


@pytest.fixture(scope="session")
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for the session (dropped at the end)."""
    async with scratch.scratch_database(postgres_admin_url, "farmesh_test") as url:
        yield url


@pytest.fixture(scope="session")
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def empty_database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema, for one test (dropped afterwards)."""
    url = await create_database(postgres_admin_url)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama + tokenizer, written once per session (end-to-end and chaos tests)."""
    from farmesh.dev.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once per session from the installed package like `farmesh model smollm2`
    (~10 s, ~540 MB): the tests
    where meaning matters (tests/e2e/test_real_model.py, tests/unit/test_smollm2.py)."""
    from farmesh.models import smollm2

    return smollm2.write(tmp_path_factory.mktemp("models") / smollm2.MODEL_ID)


@pytest.fixture(scope="session")
def swarm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    """A loopback Petals swarm (DHT + two nodes) for the session (tests/support/swarm.py); end-to-end tests and
    fault drills share it. A test that stops a node must run after every test that needs the full swarm."""
    from tests.support.swarm import running_swarm

    with running_swarm(tiny_model_dir, tmp_path_factory.mktemp("swarm"), kafka_bootstrap) as swarm:
        yield swarm


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the broker the tests ran on (only if one was started: a unit-test run starts none)."""
    if os.environ.get("FARMESH_TEST_KAFKA_BOOTSTRAP"):
        terminalreporter.write_line(f"broker: FARMESH_TEST_KAFKA_BOOTSTRAP={os.environ['FARMESH_TEST_KAFKA_BOOTSTRAP']}")
    elif test_broker.cache_info().currsize:
        try:
            kind = test_broker()
        except RuntimeError as exc:
            kind = f"none ({exc})"
        name = {"kafka": "Apache Kafka 4.4.0", "noida": "noida-db (embedded)"}.get(kind, kind)
        terminalreporter.write_line(f"broker: {name} ({SWITCH}={os.environ.get(SWITCH, '<unset>')})")
