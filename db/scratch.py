"""Throw-away databases, for tests and benchmarks: a new one with a unique name, and dropping it again
(its open connections first)."""
from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(url: str, database: str) -> str:
    """`url` pointing at `database` instead (query options such as host=/socket are kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def create_database(admin_url: str, prefix: str) -> str:
    """Create an empty database `<prefix>_<random>` on `admin_url`'s server; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, url: str) -> None:
    """Drop the database `url` names, ending the connections still open to it."""
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, prefix: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A new database (migrated with db/migrate.py unless `migrated` is false) for the block, dropped after it."""
    url = await create_database(admin_url, prefix)
    try:
        if migrated:
            from db.migrate import migrate

            await migrate(url)
        yield url
    finally:
        await drop_database(admin_url, url)
