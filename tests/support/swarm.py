"""A real loopback Petals swarm: one DHT and two nodes serving halves of the tiny model (the session-wide
`swarm` fixture of tests/conftest.py, for the end-to-end tests and the fault drills).

The nodes publish signed heartbeats (every HEARTBEAT_INTERVAL s, wallet `e2e-wallet-<blocks>`) to the session's
broker, as `farmesh up` nodes do; tests that need the registry run its consumer group themselves.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from farmesh.dev.processes import ManagedProcess
from farmesh.dev.swarm import start_dht, start_node

DHT_PREFIX = "farmesh-e2e"
NODE_BLOCKS = ("0:2", "2:4")
HEARTBEAT_INTERVAL = 1.0


def wallet_of(blocks: str) -> str:
    return f"e2e-wallet-{blocks.replace(':', '-')}"


@dataclass
class Swarm:
    model_dir: Path
    dht_prefix: str
    initial_peers: list[str]
    dht: ManagedProcess
    nodes: dict[str, ManagedProcess]  # by blocks, e.g. "0:2"

    workdir: Path
    kafka_bootstrap: str

    @property
    def node_peer_ids(self) -> list[str]:
        return [node.peer_id for node in self.nodes.values()]

    def restart_node(self, blocks: str) -> ManagedProcess:
        """Bring a stopped node's blocks back (a fresh peer), so later tests see the full swarm again."""
        self.nodes[blocks].stop()
        self.nodes[blocks] = self.start_node(blocks)
        return self.nodes[blocks]

    def start_node(self, blocks: str, *, wallet: str | None = None, heartbeats: bool = True) -> ManagedProcess:
        """A node of this swarm; with `heartbeats=False` one the registry never hears of (no wallet)."""
        return start_node(self.model_dir, blocks, self.initial_peers, self.dht_prefix, workdir=self.workdir,
                          **heartbeat_args(self.kafka_bootstrap, (wallet or wallet_of(blocks)) if heartbeats else None))


def heartbeat_args(kafka_bootstrap: str, wallet: str | None) -> dict:
    if wallet is None:
        return {}
    return {"wallet": wallet, "kafka_bootstrap": kafka_bootstrap, "heartbeat_interval": HEARTBEAT_INTERVAL}


@contextlib.contextmanager
def running_swarm(model_dir: Path, workdir: Path, kafka_bootstrap: str, *, dht_prefix: str = DHT_PREFIX,
                  node_blocks: tuple[str, ...] = NODE_BLOCKS) -> Iterator[Swarm]:
    """The DHT and the nodes (heartbeats to `kafka_bootstrap`), all stopped by process id afterwards."""
    started: list[ManagedProcess] = []
    swarm: Swarm | None = None
    try:
        dht = start_dht(workdir=workdir)
        started.append(dht)
        with ThreadPoolExecutor(len(node_blocks)) as pool:  # nodes load their blocks in parallel
            futures = {
                blocks: pool.submit(start_node, model_dir, blocks, [dht.maddr], dht_prefix, workdir=workdir,
                                    **heartbeat_args(kafka_bootstrap, wallet_of(blocks)))
                for blocks in node_blocks
            }
            errors = [future.exception() for future in futures.values()]
        nodes = {blocks: future.result() for blocks, future in futures.items() if future.exception() is None}
        started.extend(nodes.values())
        for error in errors:
            if error is not None:
                raise error
        swarm = Swarm(model_dir, dht_prefix, [dht.maddr], dht, nodes, workdir, kafka_bootstrap)
        yield swarm
    finally:
        if swarm is not None:  # nodes may have been restarted: stop the current ones too
            started.extend(node for node in swarm.nodes.values() if node not in started)
        for process in reversed(started):
            process.stop()
