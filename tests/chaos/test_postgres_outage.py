"""Fault drill: PostgreSQL stops for 10 s while `farmesh ledger` consumes a stream of session outcomes.

An embedded PostgreSQL of the drill's own (never the shared server) is shut down (fast: open transactions are
rolled back, clients disconnected) and started again on the same port 10 s later. The ledger process must
survive: a batch whose write fails waits for the database (farmesh.runtime.serving.DatabaseWait) and is then rewound,
not committed, and delivered again; so once the database is back every session is recorded exactly once, every
balance is exact, and `farmesh ledger audit` passes.
"""
from __future__ import annotations

import asyncio

import pytest

from farmesh.dev.local_services import start_postgres
from tests.support.chaos import Timer, ledger_drill

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SESSIONS = 300
OUTAGE = 10.0


async def test_ledger_survives_a_10s_postgres_outage(tmp_path):
    server = start_postgres(tmp_path / "pg")
    try:
        async with ledger_drill(tmp_path, server.dsn, SESSIONS) as drill:
            drill.start_publishing(pause_every=20, pause=0.1)  # outcomes keep arriving during the whole outage
            before = await drill.until_recorded(0.25)
            await asyncio.to_thread(server.stop)  # in a thread: publishing goes on meanwhile
            print(f"\nstopped PostgreSQL with {before}/{SESSIONS} sessions recorded")
            await asyncio.sleep(OUTAGE)
            assert drill.ledger.process.poll() is None, f"the ledger died with the database:\n{drill.ledger.log_tail()}"
            server = await asyncio.to_thread(start_postgres, tmp_path / "pg", port=server.port)
            back = Timer()
            await drill.pool.expire_connections()
            await drill.caught_up()
            print(f"PostgreSQL back after {OUTAGE:.0f} s; the same ledger process caught up {back():.1f} s later")
            assert drill.ledger.process.poll() is None
            held = drill.ledger.log_path.read_text(errors="replace").count("holding the batch until it answers")
            assert held <= 10, f"{held} batches failed during the outage: a retry storm"
            await drill.verify()
    finally:
        server.stop()
