"""Launchers for a local swarm: `farmesh dht` and `farmesh node` as managed child processes.

Each is spawned as `python -m farmesh.cli dht|node ...` in its own process group (so p2pd and the forked hivemind
workers stop with it), and the launcher waits for its one-line ready message.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from farmesh.dev.processes import ManagedProcess
from farmesh.runtime.net import free_port
from farmesh.swarm.dht import DHT_READY, NODE_READY


def _python_entry(*args: str) -> list[str]:
    return [sys.executable, "-m", "farmesh.cli", *args]


# Wraps a command line to run it elsewhere: on another (test) host, e.g. `ip netns exec NS ...`.
Wrap = Callable[[list[str]], list[str]]


def _where(host: str | None, announce_host: str | None) -> list[str]:
    return (["--host", host] if host else []) + (["--announce-host", announce_host] if announce_host else [])


def start_dht(
    port: int | None = None,
    *,
    workdir: Path,
    identity_path: Path | None = None,
    timeout: float = 60.0,
    host: str | None = None,
    announce_host: str | None = None,
    wrap: Wrap | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """Start `farmesh dht` (on loopback, or `host`) and wait until it prints its multiaddr (`.maddr`)."""
    port = port or free_port()
    args = ["dht", "--port", str(port), *_where(host, announce_host)]
    if identity_path is not None:
        args += ["--identity-path", str(identity_path)]
    workdir.mkdir(parents=True, exist_ok=True)
    argv = _python_entry(*args)
    process = ManagedProcess(f"dht:{port}", wrap(argv) if wrap else argv, workdir / f"dht-{port}.log", env)
    process.wait_ready(DHT_READY, timeout)
    return process


def start_node(
    model_dir: Path,
    blocks: str,
    initial_peers: Sequence[str],
    dht_prefix: str,
    port: int | None = None,
    *,
    workdir: Path,
    device: str = "cpu",
    torch_dtype: str = "float32",
    throughput: float | str = 1.0,
    identity_path: Path | None = None,
    num_handlers: int = 2,
    update_period: float = 15.0,
    timeout: float = 120.0,
    wallet: str | None = None,
    kafka_bootstrap: str | None = None,
    heartbeat_interval: float | None = None,
    heartbeat_url: str | None = None,
    host: str | None = None,
    announce_host: str | None = None,
    wrap: Wrap | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """Start `farmesh node` serving `blocks` ("A:B") and wait until it is announced (`.peer_id`).

    With a `wallet` the node publishes signed heartbeats to `kafka_bootstrap`, or to a gateway's ingress with
    `heartbeat_url`. Without an `identity_path` it gets a fresh identity in `workdir` (a new peer id per start).
    `host`/`announce_host`: where it listens and what it announces (default loopback); `wrap`: run it elsewhere.
    """
    if not initial_peers:
        raise ValueError("a node needs our own DHT's multiaddrs as initial peers")
    port = port or free_port()
    args = [
        "node", "--model", str(model_dir), "--blocks", blocks, "--port", str(port), "--dht-prefix", dht_prefix,
        "--device", device, "--torch-dtype", torch_dtype, "--throughput", str(throughput),
        "--num-handlers", str(num_handlers), "--update-period", str(update_period), *_where(host, announce_host),
    ]
    for peer in initial_peers:
        args += ["--initial-peers", peer]
    args += ["--identity-path", str(identity_path or workdir / f"node-{port}-{time.time_ns()}.identity")]
    if wallet is not None:
        args += ["--wallet", wallet]
    if kafka_bootstrap is not None:
        args += ["--kafka-bootstrap", kafka_bootstrap]
    if heartbeat_interval is not None:
        args += ["--heartbeat-interval", str(heartbeat_interval)]
    if heartbeat_url is not None:
        args += ["--heartbeat-url", heartbeat_url]
    workdir.mkdir(parents=True, exist_ok=True)
    argv = _python_entry(*args)
    process = ManagedProcess(f"node:{blocks}:{port}", wrap(argv) if wrap else argv, workdir / f"node-{port}.log", env)
    process.wait_ready(NODE_READY, timeout)
    return process
