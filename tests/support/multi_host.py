"""A mesh spread over test hosts (tests/support/hosts.py): the core host (the root namespace, bound to its address
on the test bridge) runs the DHT bootstrap peer, a broker (FARMESH_TEST_BROKER's kind), a fresh PostgreSQL database,
the registry, ledger, worker and gateway; each provider host (a namespace) runs only `farmesh node`, which joins
through the bootstrap peer's address and sends its signed heartbeats to the gateway's ingress — no broker, no
database, no credential of the mesh. FARMESH_SWARM_NETWORKS is the test subnet alone: loopback is not allowed to the
swarm, so every libp2p address in play is a test host's.

Every process is stopped by process id and the namespaces, links and database are removed when the block ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from farmesh.dev.processes import ManagedProcess
from farmesh.dev.swarm import start_dht, start_node
from farmesh.runtime.net import free_port
from tests.support.hosts import Host, TestNetwork, test_network

DHT_PREFIX = "farmesh-multihost"
NODE_TIMEOUT = 6.0  # s of silence before the registry declares a node offline
HEARTBEAT_INTERVAL = 1.0


def wallet_of(host: Host) -> str:
    return f"wallet-{host.name}"


@dataclass
class MultiHostMesh:
    net: TestNetwork
    model_dir: Path
    workdir: Path
    bootstrap: str
    database_url: str
    env: dict[str, str]  # the core services' environment (FARMESH_*)
    dht: ManagedProcess
    gateway_url: str
    api_key: str
    nodes: dict[str, ManagedProcess] = field(default_factory=dict)  # by host name
    services: dict[str, ManagedProcess] = field(default_factory=dict)

    def start_node(self, host: Host, blocks: str, throughput: float, **kwargs: Any) -> ManagedProcess:
        """`farmesh node` on `host`: listening and announcing its own address, heartbeats to the gateway."""
        node = start_node(self.model_dir, blocks, [self.dht.maddr], DHT_PREFIX, workdir=self.workdir,
                          host=host.address, wrap=host.argv, env={"FARMESH_SWARM_NETWORKS": self.net.cidr},
                          throughput=throughput, update_period=2.0, wallet=wallet_of(host),
                          heartbeat_url=self.gateway_url, heartbeat_interval=HEARTBEAT_INTERVAL, **kwargs)
        self.nodes[host.name] = node
        return node

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def fetch() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.database_url)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()
        return asyncio.run(fetch())

    def node_state(self, peer_id: str) -> str | None:
        rows = self.query("SELECT state FROM far_nodes WHERE peer_id = $1", peer_id)
        return rows[0]["state"] if rows else None

    def wait_for(self, check: Any, what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:.0f} s: {what} (last: {result!r})")
            time.sleep(0.3)

    def farmesh(self, *args: str) -> subprocess.CompletedProcess:
        """A `farmesh` operator command on the core host, with the mesh's broker and database."""
        return subprocess.run([sys.executable, "-m", "farmesh.cli", *args], capture_output=True, text=True,
                              env={**_environ(), **self.env}, timeout=120)

    def swarm(self) -> dict:
        models = httpx.get(f"{self.gateway_url}/api/swarm", timeout=30).json()["models"]
        return next((m for m in models if m["model"] == DHT_PREFIX), {})


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def _database(admin_url: str) -> tuple[str, Any]:
    from db.migrate import migrate
    from db.scratch import create_database, drop_database

    url = asyncio.run(create_database(admin_url, "farmesh_multihost"))
    asyncio.run(migrate(url))
    return url, lambda: asyncio.run(drop_database(admin_url, url))


def _client_key(database_url: str) -> str:
    from farmesh.billing import accounts
    from schemas import money

    async def issue() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            return (await accounts.create_client(conn, "multihost", money.to_base_units(Decimal(1)))).key
        finally:
            await conn.close()
    return asyncio.run(issue())


@contextlib.contextmanager
def multi_host_mesh(model_dir: Path, workdir: Path, admin_url: str) -> Iterator[MultiHostMesh]:
    """The core host's services on a fresh test network; provider hosts and their nodes are the test's to add."""
    from farmesh.kafka import messaging
    from tests.support.kafka import start_test_broker

    with test_network() as net, contextlib.ExitStack() as stack:
        workdir.mkdir(parents=True, exist_ok=True)
        broker = start_test_broker(workdir / "kafka")
        stack.callback(broker.stop)
        database_url, drop = _database(admin_url)
        stack.callback(drop)
        asyncio.run(messaging.ensure_topics(broker.bootstrap, messaging.mesh_topics(3)))
        core = net.core.address
        gateway_port = free_port(core)
        env = {
            "FARMESH_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FARMESH_DATABASE_URL": database_url,
            "FARMESH_MODEL": str(model_dir),
            "FARMESH_DHT_PREFIX": DHT_PREFIX,
            "FARMESH_SWARM_NETWORKS": net.cidr,
            "FARMESH_SWARM_HOST": core,
            "FARMESH_GATEWAY_HOST": core,
            "FARMESH_GATEWAY_PORT": str(gateway_port),
            "FARMESH_NODE_TIMEOUT": str(NODE_TIMEOUT),
            "FARMESH_REGISTRY_KEY": str(workdir / "registry.key"),
            # A cut link drops packets silently: the client notices at its request timeout, then moves to a spare.
            "FARMESH_REQUEST_TIMEOUT": "5",
            "FARMESH_MAX_RETRIES": "10",
            "FARMESH_ROUTE_REFRESH": "1",
        }
        dht = start_dht(workdir=workdir, host=core, env=env)
        stack.callback(dht.stop)
        env["FARMESH_INITIAL_PEERS"] = dht.maddr
        mesh = MultiHostMesh(net, model_dir, workdir, broker.bootstrap, database_url, env, dht,
                             f"http://{core}:{gateway_port}", _client_key(database_url))
        cli = [sys.executable, "-m", "farmesh.cli"]
        for name, argv, ready, timeout in (
            ("ledger", ["ledger", "--metrics-port", str(free_port())], "ledger ready", 60),
            ("registry", ["registry", "--metrics-port", str(free_port())], "registry ready", 60),
            ("worker", ["worker", "--metrics-port", str(free_port())], "worker ready", 180),
            ("gateway", ["gateway"], "gateway ready", 120),
        ):
            process = ManagedProcess(name, cli + argv, workdir / f"{name}.log", env)
            stack.callback(process.stop)
            process.wait_ready(ready, timeout)
            mesh.services[name] = process

        def stop_nodes() -> None:
            for node in mesh.nodes.values():
                node.stop()
        stack.callback(stop_nodes)
        yield mesh


def start_nodes(mesh: MultiHostMesh, plan: list[tuple[Host, str, float]]) -> None:
    """Start several nodes at once (they load their blocks in parallel); raises the first failure."""
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = [pool.submit(mesh.start_node, host, blocks, throughput) for host, blocks, throughput in plan]
    for future in futures:
        future.result()
