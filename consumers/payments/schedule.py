"""The weekly batch close, as the `farmesh payments` service runs it on its own schedule.

An ISO week is due once it has ended and `payments_close_grace` seconds more have passed (work of the week
still in flight gets that long to be recorded; anything later is paid by the next batch). The service checks
every minute, closes every due week after the last closed one, oldest first (weeks close in order), publishes
each batch's `payments.batch_closed` and records how long the close took. Closing is idempotent and serialised
by an advisory lock in the database, so several replicas (or the `farmesh payments close` CLI, or a CronJob)
may race for the same week: one closes it, the others find it closed.

Metrics (on the service's /metrics; `farmesh payments close --metrics-textfile` writes the same names):
`farmesh_payments_batch_close_seconds` (histogram of closes that created a batch),
`farmesh_payments_batch_lines_total`, `farmesh_payments_last_closed_week_end_timestamp_seconds` (when the
last closed week ended: `time() - it` above 7 days + grace means a close is overdue) and
`farmesh_payments_batch_close_failures_total`.

`WeeklyClose` works on a port, the batches (consumers/payments/ports.py `WeeklyBatches`, PostgreSQL in the
service), and publishes through the group's declared publisher (consumers/payments/consumer.py `batch_closed`),
so it is tested without a database, on FastStream's in-memory broker.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

import asyncpg
from faststream.kafka import KafkaBroker
from faststream.kafka.publisher import DefaultPublisher
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.payments import repository
from consumers.payments.ports import Closed, WeeklyBatches
from consumers.payments.repository import iso_week, next_week, week_start
from farmesh.kafka import messaging
from schemas import topics

log = logging.getLogger(__name__)

# A close over a few contributions takes milliseconds, over a million some seconds to minutes.
CLOSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def weeks_due(now: datetime, grace: float, last_closed: str | None) -> list[str]:
    """The ISO weeks to close at `now`, oldest first.

    A week is due once it ended `grace` seconds ago. Every due week after `last_closed` is returned (a
    service that was down for weeks closes each of them, in order); with nothing closed yet, only the
    latest due week (its batch pays all the open work up to it).
    """
    latest = iso_week(now - timedelta(seconds=grace) - timedelta(days=7))
    if last_closed is None:
        return [latest]
    due = []
    week = next_week(last_closed)
    while week <= latest:
        due.append(week)
        week = next_week(week)
    return due


def week_end(week: str) -> datetime:
    """Monday 00:00 UTC after the ISO week: the moment it ended."""
    return week_start(week) + timedelta(days=7)


class CloseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram("farmesh_payments_batch_close_seconds", "Time to close a weekly batch",
                                  buckets=CLOSE_BUCKETS, registry=registry)
        self.lines = Counter("farmesh_payments_batch_lines", "Lines written by weekly batch closes", registry=registry)
        self.last_week_end = Gauge("farmesh_payments_last_closed_week_end_timestamp_seconds",
                                   "End (Unix time) of the last closed ISO week", registry=registry)
        self.failures = Counter("farmesh_payments_batch_close_failures_total", "Scheduled closes that failed",
                                registry=registry)

    def closed(self, closed: Closed) -> None:
        if closed.created:  # a close that found the batch already there did no work
            self.duration.observe(closed.seconds)
            self.lines.inc(len(closed.event.lines))
        self.last_closed(closed.event.week)

    def last_closed(self, week: str | None) -> None:
        if week is not None:
            self.last_week_end.set(week_end(week).timestamp())


async def close_and_publish(conn: asyncpg.Connection, broker: KafkaBroker, week: str, min_payout: int, *,
                            now: datetime | None = None) -> Closed:
    """Close `week` (idempotent), then publish its `payments.batch_closed`: `farmesh payments close`, a process
    of its own with a broker that serves no group.

    After the database commit: at least once (closing again republishes the same event id).
    """
    closed = await repository.close_week(conn, week, min_payout, now=now)
    await messaging.publish(broker, topics.PAYMENTS.name, closed.event, week)
    return closed


class WeeklyClose:
    """Closes every due week through `batches`, and publishes each closed batch (keyed by its week) through
    `publisher`: in the service, PostgreSQL and the group's declared `batch_closed`, on the group's broker.

    After each close's commit: at least once (closing again republishes the same event id).
    """

    def __init__(self, batches: WeeklyBatches, publisher: DefaultPublisher, registry: CollectorRegistry, *,
                 grace: float, min_payout: int, period: float = 60.0) -> None:
        self.batches, self.publisher = batches, publisher
        self.grace, self.min_payout, self.period = grace, min_payout, period
        self.metrics = CloseMetrics(registry)

    async def close_due(self, now: datetime | None = None) -> list[Closed]:
        """Close the weeks due at `now` (default: the clock), oldest first; returns what each close did."""
        now = now or datetime.now(timezone.utc)
        last = await self.batches.last_closed()
        self.metrics.last_closed(last)
        done = []
        for week in weeks_due(now, self.grace, last):
            closed = await self.batches.close(week, self.min_payout, now=now)
            await messaging.publish_through(self.publisher, closed.event, week)
            self.metrics.closed(closed)
            done.append(closed)
            if closed.created:
                e = closed.event
                log.info("closed %s: %d line(s), total %s FAR in %.3f s", week, len(e.lines), e.total_far,
                         closed.seconds)
        return done

    async def run(self) -> None:
        while True:
            try:
                await self.close_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.failures.inc()
                log.warning("weekly batch close failed; retrying in %.0f s", self.period, exc_info=True)
            await asyncio.sleep(self.period)
