"""A client-side long-poll floor for aiokafka, installed explicitly (`install()`), like petals_compat.

Kafka long-polls: a fetch with no new data is answered only after fetch_max_wait_ms, so an idle consumer
costs nothing. The dev broker (noida-db) answers at once, and aiokafka then fetches again immediately: each
idle consumer spun a CPU core. With the floor an empty answer waits out the rest of fetch_max_wait_ms on the
client. Against Apache Kafka the answer already took fetch_max_wait_ms, so it never sleeps there.
`farmesh.kafka.messaging.create_broker` installs it; so does any code that builds its own consumer and cares.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any


def install() -> None:
    """An empty fetch answer waits out the rest of fetch_max_wait_ms on the client.

    Kafka long-polls: a fetch with no new data is answered only after fetch_max_wait_ms, so an idle
    consumer costs nothing. The dev broker (noida-db) answers at once, and aiokafka then fetches again
    immediately: each idle consumer spun a CPU core. Against a real Kafka the answer already took
    fetch_max_wait_ms, so this never sleeps there.
    """
    from aiokafka.consumer.fetcher import Fetcher

    original = Fetcher._proc_fetch_request
    if getattr(original, "__farmesh_long_poll__", False):
        return

    async def proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> bool:
        started = time.monotonic()
        got_records = await original(self, assignment, node_id, request)
        if not got_records:
            rest = self._fetch_max_wait_ms / 1000 - (time.monotonic() - started)
            if rest > 0:
                try:
                    await asyncio.sleep(rest)
                except asyncio.CancelledError:  # close() or unassignment; aiokafka's own fetch returns quietly too
                    return got_records
        return got_records

    proc_fetch_request.__farmesh_long_poll__ = True  # type: ignore[attr-defined]
    Fetcher._proc_fetch_request = proc_fetch_request
