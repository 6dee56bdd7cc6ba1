"""A node and a DHT peer stopped the way `timeout`, `kill -- -PGID` and systemd's KillMode=control-group stop them:
SIGTERM to the whole process group, so the forked hivemind workers and p2pd die with the leader's signal.

The node used to wait for ever to announce OFFLINE through its dead DHT process (and never sent its offline
heartbeat); it must exit, cleanly, and still say offline to the registry's topic. Runs on its own small swarm (one
DHT, one node of two blocks) so the session swarm keeps its nodes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from farmesh.dev.swarm import start_dht, start_node
from schemas import topics
from tests.support.kafka import read_to_end

pytestmark = pytest.mark.e2e

EXIT_BOUND = 60.0  # a liveness bound, not a speed target (the node exits in about a second)


def _exit_code_after_group_sigterm(process: subprocess.Popen) -> int:
    os.killpg(process.pid, signal.SIGTERM)  # start_new_session: the leader's pid is its group's id
    try:
        return process.wait(EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {process.pid} still running {EXIT_BOUND:.0f} s after SIGTERM to its process group")


async def test_group_sigterm_stops_the_node_with_its_offline_heartbeat_then_the_dht(
        tiny_model_dir: Path, tmp_path: Path, kafka_bootstrap: str) -> None:
    dht = start_dht(workdir=tmp_path)
    node = None
    try:
        node = start_node(tiny_model_dir, "0:2", [dht.maddr], "farmesh-group-signal", workdir=tmp_path,
                          wallet="group-signal-wallet", kafka_bootstrap=kafka_bootstrap, heartbeat_interval=1.0)

        assert _exit_code_after_group_sigterm(node.process) == 0, node.log_tail()
        log = node.log_path.read_text(errors="replace")
        assert "the DHT process is gone" in log and "did not shut down" not in log, log[-3000:]
        states = [event["state"] for event in map(json.loads, await read_to_end(kafka_bootstrap, topics.HEARTBEATS.name))
                  if event.get("peer_id") == node.peer_id]
        assert states[-2:] == ["draining", "offline"], states

        assert _exit_code_after_group_sigterm(dht.process) == 0, dht.log_tail()
    finally:
        if node is not None:
            node.stop()  # what is left of its group, by process group id, and its hivemind sockets
        dht.stop()
