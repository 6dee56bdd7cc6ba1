"""Fault drill: the broker (Apache Kafka, or noida-db: tests/support/kafka.py) is stopped and restarted on the
same port while producers publish session outcomes and `farmesh ledger` consumes them.

The drill has a broker of its own (the session-wide one is shared with other tests). During the outage a
publish fails or times out; the test's producer then retries the SAME event (same event_id) until the broker
acknowledges it (tests/support/chaos.py RetryingProducer): that is the idempotency contract producers rely on,
since a retried event may already have been written once. On Apache Kafka (acks=all, idempotent producer)
nothing else is done, and the broker must still hold every event. On noida-db only, it also publishes again what
was acknowledged in the second before the failure: noida-db can acknowledge writes while it shuts down and not
keep them (without that the drill loses 0 to 8 events there in about half the runs). The ledger rides the
outage out on its own (aiokafka reconnects; uncommitted batches are delivered again). Afterwards every session
is recorded exactly once, nothing is lost or charged twice, and `farmesh ledger audit` passes.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from schemas import topics
from tests.support.chaos import Timer, ledger_drill
from tests.support.kafka import on_kafka, read_all, start_test_broker

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SESSIONS = 300
OUTAGE = 5.0  # longer than a publish attempt (2 s): publishes fail and are retried


async def test_broker_restart_under_load_loses_nothing_and_charges_once(tmp_path, postgres_admin_url):
    async with ledger_drill(tmp_path, postgres_admin_url, SESSIONS, attempt_timeout=2.0) as drill:
        drill.start_publishing(pause_every=20, pause=0.05)
        before = await drill.until_recorded(1 / 3)
        await asyncio.to_thread(drill.broker.stop)  # SIGTERM: Kafka's controlled shutdown; noida-db its snapshot
        down = Timer()
        print(f"\nstopped the broker with {before}/{SESSIONS} sessions recorded")
        await asyncio.sleep(OUTAGE)
        drill.broker = await asyncio.to_thread(start_test_broker, tmp_path / "kafka", drill.broker.port)
        print(f"broker back on the same port after {down():.1f} s")
        back = Timer()
        await drill.caught_up(timeout=90)
        print(f"published everything and the same ledger process caught up {back():.1f} s after the restart; "
              f"{drill.publisher.retries} publish attempt(s) retried (e.g. {drill.publisher.failures[:1]}), "
              f"{drill.publisher.republished} event(s) acknowledged just before the stop published again")
        assert drill.ledger.process.poll() is None, drill.ledger.log_tail()
        assert drill.publisher.retries > 0  # the outage really failed publishes
        if on_kafka():
            assert drill.publisher.republished == 0  # no acknowledged write was published again
        written = Counter(json.loads(v)["event_id"] for v in await read_all(drill.broker.bootstrap, topics.SESSIONS.name))
        assert written.keys() == {str(e.event_id) for _, e in drill.load.events}  # the broker lost nothing
        print(f"{sum(n > 1 for n in written.values())} event(s) written more than once by retries")
        await drill.verify()
