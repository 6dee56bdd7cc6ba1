"""What every benchmark shares: timing, percentiles, the final `ratio=` lines, a scratch database.

A benchmark prints its raw figures, then a target line (`target: ... -> PASS|MISS`), then last
`ratio=X`: X is the benchmark's figure divided by the baseline measured in the same run.
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractAsyncContextManager
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then t[0] is the elapsed seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def scratch_database(prefix: str, admin_url: str = ADMIN_URL, migrated: bool = True) -> AbstractAsyncContextManager[str]:
    """db.scratch.scratch_database on the benchmarks' server (FARMESH_BENCH_DATABASE_URL)."""
    from db.scratch import scratch_database

    return scratch_database(admin_url, prefix, migrated=migrated)
