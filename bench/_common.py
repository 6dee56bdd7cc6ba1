"""What every benchmark shares: timing, percentiles, the final `ratio=` lines, a scratch database.

A benchmark prints its raw figures, then a target line (`target: ... -> PASS|MISS`), then last
`ratio=X`: X is the benchmark's figure divided by the baseline measured in the same run.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

ADMIN_URL = os.environ.get("FARMESH_BENCH_DATABASE_URL", "postgresql://127.0.0.1:5432/postgres")


def ratio(value: float, baseline: float) -> float:
    """value / baseline (inf when the baseline is 0 and the value is not)."""
    if baseline == 0:
        return math.inf if value else 1.0
    return value / baseline


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; p50 is the median."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Target:
    """`ratio >= limit` (at_least) or `ratio <= limit`."""

    limit: float
    at_least: bool = True

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    def __str__(self) -> str:
        return f"ratio {'>=' if self.at_least else '<='} {self.limit:g}"


def final_lines(value: float, target: Target) -> list[str]:
    """The last two lines of a benchmark: the target with PASS/MISS, then `ratio=X`."""
    return [f"target: {target} -> {'PASS' if target.met(value) else 'MISS'}", f"ratio={value:.3f}"]


def say(line: str = "") -> None:
    print(line, flush=True)


def finish(value: float, target: Target) -> int:
    for line in final_lines(value, target):
        say(line)
    return 0


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU(s), Python {platform.python_version()}"


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then t[0] is the elapsed seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def scratch_database(prefix: str, admin_url: str = ADMIN_URL, migrated: bool = True) -> AsyncIterator[str]:
    """A new database with a unique name (migrated with db/migrate.py), dropped afterwards."""
    import asyncpg

    from db.migrate import migrate

    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(admin_url, name)
    try:
        if migrated:
            await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
