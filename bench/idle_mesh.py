"""CPU of an idle mesh (every service up, no traffic), in % of one core, on noida-db or Apache Kafka.

Starts the whole local mesh like `farmesh up --broker B --model tiny` (farmesh.dev.local_mesh.LocalMesh: the
broker, DHT, two Petals nodes on the tiny model, ledger, payments, registry, inference worker, gateway; all on 127.0.0.1; the
database a scratch one on FARMESH_BENCH_DATABASE_URL's server, not counted), lets it settle, then reads the CPU time
(/proc/<pid>/stat utime + stime) of every process this benchmark started, the broker and their helpers included,
over `--seconds`. Printed per service and in all. On noida-db each idle consumer on the first token's path polls
every FARMESH_LATENCY_FETCH_WAIT_MS (3 ms); on Apache Kafka fetches long-poll (100 ms waits the broker holds).

    python -m bench.idle_mesh [--broker noida|kafka] [--seconds 30] [--settle 10] [--model tiny]

ratio = the mesh's CPU seconds per second of wall time (1.0 = one core busy; baseline: one core);
target <= 0.5. The services' share alone (the mesh's own processes: broker, ledger, payments, registry, worker,
gateway; the Petals nodes and the DHT are Petals' own) is printed on its own line with `services_ratio=`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench._common import Target, finish, ratio, say, scratch_database

TARGET = Target(0.5, at_least=False)
TICKS = os.sysconf("SC_CLK_TCK")
SWARM = ("dht", "node")  # Petals' own processes: not the services'


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in ticks), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def descendants(root: int) -> dict[int, int]:
    """pid -> CPU ticks of every live descendant of `root`."""
    parents, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)], ticks[int(entry.name)] = stat
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = ticks[pid]
                frontier.append(pid)
    return found


def group_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def main(broker: str, seconds: float, settle: float, model: str = "tiny") -> int:
    import asyncio

    from farmesh.dev.local_mesh import LocalMesh
    from farmesh.runtime.settings import Settings

    loop = asyncio.new_event_loop()
    database = scratch_database("farmesh_bench_idle", migrated=False)
    url = loop.run_until_complete(database.__aenter__())
    try:
        with tempfile.TemporaryDirectory(prefix="farmesh-bench-idle-") as tmp:
            settings = Settings(database_url=url, data_dir=Path(tmp), broker=broker, model=model)
            with LocalMesh(settings, Path(tmp), gateway_port=0, nodes=2) as mesh:
                names = {c.pid: c.name for c in mesh.children}  # process group leaders
                time.sleep(settle)
                before, t0 = descendants(os.getpid()), time.monotonic()
                time.sleep(seconds)
                after, wall = descendants(os.getpid()), time.monotonic() - t0
                groups = {pid: group_of(pid) for pid in after}
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()
    per: dict[str, float] = defaultdict(float)
    for pid, ticks in after.items():
        used = (ticks - before.get(pid, 0)) / TICKS / wall
        name = names.get(groups[pid], "broker" if groups[pid] == pid and pid not in names else "other")
        per[name.split("-")[0] if name.startswith("node") else name] += used
    say(f"broker={broker} model={model} idle for {wall:.1f} s after {settle:g} s settling; CPU in % of one core:")
    for name, used in sorted(per.items(), key=lambda kv: -kv[1]):
        say(f"  {name:10} {used * 100:6.1f} %")
    total = sum(per.values())
    services = sum(v for k, v in per.items() if not k.startswith(SWARM))
    say(f"all: {total * 100:.1f} % of a core; the services (no Petals nodes, no DHT): {services * 100:.1f} %")
    say(f"services_ratio={ratio(services, 1.0):.3f}")
    return finish(ratio(total, 1.0), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("noida", "kafka"), default="noida", help="the mesh's broker")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long CPU time is counted")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the mesh is ready, not counted")
    parser.add_argument("--model", default="tiny", help="the model the nodes serve: tiny (default), smollm2 or a directory")
    args = parser.parse_args()
    from farmesh.dev.local_mesh import stop_on_signals

    with stop_on_signals():  # SIGTERM/SIGINT unwind through LocalMesh, which stops every child by pid
        code = main(args.broker, args.seconds, args.settle, args.model)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # Petals/hivemind leave non-daemon threads behind (as in bench.gateway_vs_direct)
