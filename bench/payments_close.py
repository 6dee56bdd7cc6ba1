"""Weekly batch close over 1,000,000 contributions vs a bare SQL aggregate over the same rows.

A scratch database (migrated with db/migrate.py, dropped afterwards) gets, by generate_series, N payable
contributions of one past ISO week (far_payment_items, as the payments group records them, with the
ledger's matching far_session_contributions rows), 200 nodes paid to 100 wallets. Baseline: the bare
aggregate `SELECT wallet, sum(amount), count(*) ... GROUP BY wallet` over the same open items (median of
3 runs). Measured: consumers.payments.repository.close_week, what `farmesh payments close` runs.

    python -m bench.payments_close [--contributions 1000000]

ratio = close seconds / aggregate seconds   (target <= 2)
"""
from __future__ import annotations

import argparse
import asyncio
import statistics

import asyncpg

from bench._common import Target, finish, ratio, say, scratch_database, stopwatch
from consumers.payments.repository import close_week

TARGET = Target(2.0, at_least=False)
WEEK = "2025-W10"  # Monday 2025-03-03
PEERS, WALLETS, PER_SESSION = 200, 100, 2

# Two contributions per session (2 nodes, as `farmesh up`), amounts like 1..64 tokens x 0.0001 FAR / 2.
_GENERATE = f"""
INSERT INTO far_nodes (peer_id, wallet, state)
SELECT 'QmBenchPeer' || p, '0xBenchWallet' || (p % {WALLETS}), 'online' FROM generate_series(0, {PEERS - 1}) p;

CREATE TEMP TABLE gen AS
SELECT g, 'bench-' || (g / {PER_SESSION}) AS request_id, gen_random_uuid() AS contribution_id,
       'QmBenchPeer' || ((g::bigint * 7919) % {PEERS}) AS peer_id,
       ((1 + g % 64) * 0.00005)::numeric(38,18) AS amount,
       timestamptz '2025-03-03 00:00:00+00' + (g % 600000) * interval '1 second' AS occurred_at
FROM generate_series(0, $1::int - 1) g;

INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens, completion,
    finish_reason, price_per_token, cost, started_at, finished_at, worker)
SELECT request_id, gen_random_uuid(), 'farmesh-tiny', 'completed', 6, 1, 'x', 'length', 0.0001, 0.0001,
       min(occurred_at), min(occurred_at), 'bench'
FROM gen GROUP BY request_id;

INSERT INTO far_session_contributions (event_id, request_id, model, peer_id, wallet, start_block, end_block,
    tokens_processed, earnings, occurred_at)
SELECT contribution_id, request_id, 'farmesh-tiny', peer_id, '0xBenchWallet' || (substr(peer_id, 12)::int % {WALLETS}),
       2 * (g % {PER_SESSION}), 2 * (g % {PER_SESSION}) + 2, 10, amount, occurred_at
FROM gen;

INSERT INTO far_payment_sessions (request_id, event_id) SELECT request_id, gen_random_uuid() FROM gen GROUP BY request_id;

INSERT INTO far_payment_items (contribution_id, request_id, peer_id, wallet, amount, occurred_at, week)
SELECT contribution_id, request_id, peer_id, '0xBenchWallet' || (substr(peer_id, 12)::int % {WALLETS}), amount,
       occurred_at, '{WEEK}'
FROM gen;
DROP TABLE gen;
"""

AGGREGATE = """
SELECT wallet, sum(amount) AS amount, count(*) AS contributions FROM far_payment_items
WHERE week <= $1 AND amount > 0 AND wallet IS NOT NULL
GROUP BY wallet
"""


async def main(contributions: int) -> int:
    async with scratch_database("farmesh_bench_payments") as url:
        conn = await asyncpg.connect(url)
        try:
            with stopwatch() as gen_t:
                async with conn.transaction():
                    for statement in _GENERATE.split(";\n"):
                        if statement.strip():
                            await conn.execute(statement, contributions) if "$1" in statement else await conn.execute(statement)
                await conn.execute("VACUUM ANALYZE")
            say(f"contributions={contributions} peers={PEERS} wallets={WALLETS} week={WEEK} "
                f"(generated in {gen_t[0]:.1f} s)")
            aggregate_times, expected = [], None
            for _ in range(3):
                with stopwatch() as t:
                    expected = {r["wallet"]: (r["amount"], r["contributions"]) for r in await conn.fetch(AGGREGATE, WEEK)}
                aggregate_times.append(t[0])
            with stopwatch() as close_t:
                closed = await close_week(conn, WEEK, 0)
        finally:
            await conn.close()
    got = {line.wallet: (line.amount_far, line.contributions) for line in closed.event.lines}
    if got != expected:
        raise SystemExit(f"the close's lines differ from the aggregate: {len(got)} vs {len(expected)} wallets")
    aggregate = statistics.median(aggregate_times)
    say(f"aggregate (GROUP BY wallet SUM): {', '.join(f'{t:.3f}' for t in aggregate_times)} s, median {aggregate:.3f} s")
    say(f"close_week: {close_t[0]:.3f} s, {len(closed.event.lines)} lines, total {closed.event.total_far} FAR, "
        f"{sum(line.contributions for line in closed.event.lines)} contributions batched")
    return finish(ratio(close_t[0], aggregate), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributions", type=int, default=1_000_000)
    raise SystemExit(asyncio.run(main(parser.parse_args().contributions)))
