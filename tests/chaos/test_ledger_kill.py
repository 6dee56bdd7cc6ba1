"""Fault drill: `farmesh ledger` is killed with SIGKILL in the middle of a batch while session outcomes flow.

The batch's database transaction dies with the process (PostgreSQL rolls it back) and its offsets were
never committed. On Apache Kafka the dead member's session times out (nothing is sent on its behalf) and the
group rebalances to the restarted ledger, which receives the batch again and records it exactly once: every
session once, by its first outcome, every balance exact, and `farmesh ledger audit` passes.
"""
from __future__ import annotations

import asyncio

import pytest

from schemas import topics
from tests.support.chaos import (
    Timer,
    dead_member_leaves,
    kill9,
    ledger_drill,
    until,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SESSIONS = 300

# Another backend of the drill's database holding a transaction that has written rows: the ledger mid-batch.
IN_A_BATCH = """SELECT backend_xid::text::bigint FROM pg_stat_activity
                WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid() LIMIT 1"""
# What became of that transaction (xid of this epoch): 'aborted' once PostgreSQL saw its client die.
STATUS = "SELECT txid_status(((txid_current() >> 32) << 32) + $1)"


async def test_ledger_killed_mid_batch_records_every_session_once(tmp_path, postgres_admin_url):
    async with ledger_drill(tmp_path, postgres_admin_url, SESSIONS) as drill:
        drill.start_publishing(pause_every=40, pause=0.05)
        await drill.until_recorded(0.25)
        for attempt in range(3):  # the kill may land just after the batch's commit: then kill the next batch
            xid = await until(lambda: drill.pool.fetchval(IN_A_BATCH), 30, "the ledger writing a batch", interval=0.002)
            kill9(drill.ledger)
            since_kill = Timer()
            await dead_member_leaves(drill.broker.bootstrap, topics.GROUP_LEDGER, drill.ledger)
            await asyncio.sleep(1.0)  # outcomes keep flowing while no ledger runs
            batch = await drill.pool.fetchval(STATUS, xid)
            print(f"\nkilled the ledger (SIGKILL) while its batch transaction had written rows: that transaction {batch}")
            if batch == "aborted":  # killed mid-batch: its rows are gone, its offsets were never committed
                break
            drill.start_ledger()
        assert batch == "aborted", f"no kill landed inside a batch in {attempt + 1} tries"
        ready_in = drill.start_ledger()
        await drill.caught_up()
        print(f"restarted ledger ready in {ready_in:.1f} s; caught up {since_kill():.1f} s after the kill")
        await drill.verify()
