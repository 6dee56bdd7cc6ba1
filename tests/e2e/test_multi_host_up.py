"""`farmesh up` on one namespaced test host, a provider's `farmesh node --host/--announce-host` on another: the
provider joins through the mesh's DHT at the core host's address, appears in /api/swarm, serves and is paid.

The core host here is a namespace of its own (tests/support/hosts.py), so `farmesh up` runs exactly as an operator
would run it: its embedded PostgreSQL and broker on that host's loopback, FARMESH_SWARM_HOST its address on the test
subnet and FARMESH_SWARM_NETWORKS the subnet. The provider reaches nothing but the swarm and the gateway's ingress.
"""
from __future__ import annotations

import json
import re
import sys
import time
import uuid

import httpx
import pytest

from farmesh.dev.processes import ManagedProcess
from farmesh.dev.swarm import start_node
from tests.support.hosts import test_network
from tests.support.reference import greedy_ids

pytestmark = pytest.mark.e2e

PREFIX = "farmesh-uphost"
PROMPT = "A provider elsewhere"


def _dht_maddr(logs) -> str:
    for log in logs.glob("dht-*.log"):
        if found := re.search(r"dht ready maddr=(\S+)", log.read_text(errors="replace")):
            return found.group(1)
    raise AssertionError(f"no DHT ready line in {logs}")


def _served_by(gateway: str, auth: dict, peer_id: str, model_dir) -> list[dict]:
    """One generation through the gateway (its tokens the greedy reference); the recorded contributions of
    `peer_id` in it."""
    request_id = f"up-{uuid.uuid4().hex[:8]}"
    body = {"prompt": PROMPT, "max_tokens": 20, "request_id": request_id}
    response = httpx.post(f"{gateway}/api/inference/generate", json=body, headers=auth, timeout=300)
    lines = response.text.splitlines()
    tokens = [json.loads(line[5:])["token_id"] for prev, line in zip(lines, lines[1:]) if prev == "event: token"]
    assert tokens == greedy_ids(model_dir, PROMPT, 20)
    deadline = time.monotonic() + 60
    while (session := httpx.get(f"{gateway}/api/sessions/{request_id}", headers=auth, timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, session.text
        time.sleep(0.3)
    return [c for c in session.json()["contributions"] if c["peer_id"] == peer_id]


def test_a_provider_on_another_host_joins_a_mesh_farmesh_up_started(tiny_model_dir, tmp_path) -> None:
    with test_network() as net:
        core, provider = net.add_host("core"), net.add_host("prov")
        data = tmp_path / "mesh"
        env = {"FARMESH_DATA_DIR": str(data), "FARMESH_MODEL": str(tiny_model_dir), "FARMESH_DHT_PREFIX": PREFIX,
               "FARMESH_SWARM_HOST": core.address, "FARMESH_SWARM_NETWORKS": net.cidr,
               "FARMESH_DATABASE_URL": "", "FARMESH_KAFKA_BOOTSTRAP": ""}  # its own, embedded, on its loopback
        data.mkdir()
        up = ManagedProcess("up", core.argv([sys.executable, "-m", "farmesh.cli", "up", "--gateway-port", "0",
                                             "--nodes", "2"]), tmp_path / "up.log", env)
        node = None
        try:
            ready = up.wait_ready("ready", 420)
            gateway, key = ready["gateway"], ready["api_key"]
            assert gateway.startswith(f"http://{core.address}:")
            # The provider: its own host and address, the mesh's bootstrap peer, heartbeats to the gateway only. It
            # serves every block, so a route through it alone is one hop shorter than through up's two nodes.
            node = start_node(tiny_model_dir, "0:4", [_dht_maddr(data / "logs")], PREFIX, workdir=tmp_path / "prov",
                              host=provider.address, announce_host=provider.address, wrap=provider.argv,
                              env={"FARMESH_SWARM_NETWORKS": net.cidr}, throughput=1e6, wallet="wallet-provider",
                              heartbeat_url=gateway, heartbeat_interval=1.0)
            deadline = time.monotonic() + 90
            while True:
                swarm = next(m for m in httpx.get(f"{gateway}/api/swarm", timeout=30).json()["models"]
                             if m["model"] == PREFIX)
                peers = {p for b in swarm["blocks"] for p in b["peers"]}
                if swarm["online_nodes"] == 3 and node.peer_id in peers:
                    break
                assert time.monotonic() < deadline, json.dumps(swarm)[:1000]
                time.sleep(0.5)
            listed = httpx.get(f"{gateway}/api/nodes/{node.peer_id}", timeout=30).json()
            assert (listed["state"], listed["wallet"]) == ("online", "wallet-provider")

            auth = {"Authorization": f"Bearer {key}"}
            # Routes are Petals' choice (by measured latency), among the nodes the worker prefers: those the registry
            # lists online, which the worker re-reads every FARMESH_ROUTE_REFRESH (5 s), so a node just listed may
            # not be preferred yet. Asked again for up to a minute (at most 12 generations).
            deadline = time.monotonic() + 60
            for _ in range(12):
                served = _served_by(gateway, auth, node.peer_id, tiny_model_dir)
                if served or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert served and served[0]["tokens_processed"] > 0 and float(served[0]["earnings"]) > 0, served
            earned = httpx.get(f"{gateway}/api/nodes/{node.peer_id}", timeout=30).json()
            assert earned["wallet"] == "wallet-provider" and float(earned["earnings"]) > 0, earned
        finally:
            if node is not None:
                node.stop()
            up.stop(timeout=90)
