"""The swarm across machines, on namespaced test hosts (tests/support/hosts.py, tests/support/multi_host.py).

The core host runs the DHT bootstrap peer, broker, PostgreSQL database, registry, ledger, worker and gateway; hosts
a, b and c (each its own network namespace and address in a private test subnet) run only `farmesh node`: a serves
blocks 0:2, b serves 2:4 and c is a spare for 2:4 (announcing less throughput, so routes go through b while it is
reachable). Providers reach the core only through the swarm and the gateway's heartbeat ingress.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import httpx
import pytest

from schemas import money
from tests.support.multi_host import NODE_TIMEOUT, multi_host_mesh, start_nodes, wallet_of
from tests.support.reference import greedy_ids
from tests.support.sse import iter_events

pytestmark = pytest.mark.e2e

PROMPT = "Hello from another host"
CUT_AT = 5  # the drill cuts host b's link once this many tokens have streamed


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory, postgres_admin_url):
    with multi_host_mesh(tiny_model_dir, tmp_path_factory.mktemp("multihost"), postgres_admin_url) as mesh:
        a, b, c = (mesh.net.add_host(name) for name in "abc")
        start_nodes(mesh, [(a, "0:2", 10.0), (b, "2:4", 50.0), (c, "2:4", 1.0)])
        mesh.wait_for(lambda: (s := mesh.swarm()).get("full_coverage") and s.get("online_nodes") == 3,
                      "the registry sees the three provider nodes online", 90)
        mesh.wait_for(lambda: httpx.get(f"{mesh.gateway_url}/health", timeout=30).status_code == 200,
                      "the gateway is healthy", 60)
        yield mesh


def generate(mesh, max_tokens: int, on_token=None) -> tuple[list[dict], dict, str]:
    request_id = f"mh-{uuid.uuid4().hex[:8]}"
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "request_id": request_id}
    tokens, done = [], {}
    with httpx.stream("POST", f"{mesh.gateway_url}/api/inference/generate", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {mesh.api_key}"}) as response:
        assert response.status_code == 200, response.read()
        for event, data in iter_events(response.iter_lines()):
            if event == "token":
                tokens.append(data)
                if on_token is not None:
                    on_token(data["index"])
            else:
                done = {"event": event, **data}
    return tokens, done, request_id


def recorded(mesh, request_id: str) -> tuple[dict, list[dict]]:
    """The ledger's session (by the mesh's id: the client's, scoped by its account) and its contributions, with
    the wallet the registry holds for each contributing peer."""
    rows = mesh.wait_for(lambda: mesh.query("SELECT * FROM far_mesh_sessions WHERE request_id LIKE $1",
                                            f"{request_id}.%"), f"session {request_id} recorded")
    contributions = mesh.query(
        "SELECT c.peer_id, c.start_block, c.end_block, c.tokens_processed, c.earnings, c.unregistered, n.wallet "
        "FROM far_session_contributions c LEFT JOIN far_nodes n USING (peer_id) WHERE c.request_id = $1 "
        "ORDER BY c.start_block, c.peer_id", rows[0]["request_id"])
    return dict(rows[0]), [dict(r) for r in contributions]


def audit_is_clean(mesh) -> None:
    result = mesh.farmesh("ledger", "audit")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generation_across_hosts_is_the_single_host_reference_and_pays_each_peer(mesh, tiny_model_dir) -> None:
    tokens, done, request_id = generate(mesh, 30)
    assert done["event"] == "done", done
    assert [t["token_id"] for t in tokens] == greedy_ids(tiny_model_dir, PROMPT, 30)
    session, contributions = recorded(mesh, request_id)
    assert session["status"] == "completed"
    peers = {name: node.peer_id for name, node in mesh.nodes.items()}
    by_peer = {p: n for n, p in peers.items()}
    assert {(c["start_block"], c["end_block"]) for c in contributions} == {(0, 2), (2, 4)}
    for c in contributions:  # each node's work and pay, against its own peer id and wallet
        assert c["peer_id"] in by_peer and not c["unregistered"]
        assert c["wallet"] == wallet_of(mesh.net.hosts[by_peer[c["peer_id"]]])
        assert c["tokens_processed"] > 0 and c["earnings"] > 0
    assert sum(c["earnings"] for c in contributions) == session["cost"] == Decimal("0.0001") * len(tokens)
    assert {c["peer_id"] for c in contributions} >= {peers["a"]}
    # the discovery API names each node with its own wallet
    for name, peer in peers.items():
        node = httpx.get(f"{mesh.gateway_url}/api/nodes/{peer}", timeout=30).json()
        assert (node["wallet"], node["state"]) == (wallet_of(mesh.net.hosts[name]), "online")
    audit_is_clean(mesh)


def test_a_node_announcing_an_address_outside_the_networks_is_refused_at_start(mesh, tiny_model_dir) -> None:
    a = mesh.net.hosts["a"]
    base = [sys.executable, "-m", "farmesh.cli", "node", "--model", str(tiny_model_dir), "--blocks", "0:2",
            "--initial-peers", mesh.dht.maddr, "--swarm-networks", mesh.net.cidr]
    for extra, outside in ((["--host", a.address, "--announce-host", "192.0.2.77"], "192.0.2.77"),
                           (["--host", "127.0.0.1"], "127.0.0.1"),
                           (["--host", a.address, "--initial-peers", "/ip4/198.51.100.1/tcp/31337"], "198.51.100.1")):
        result = a.run(base + extra, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and outside in errors[0] and "outside the mesh's networks" in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_a_provider_host_cannot_publish_a_money_event(mesh, tiny_model_dir) -> None:
    """From a provider host, the broker is not even reachable, and the only door, the heartbeat ingress, refuses an
    `inference.completed`: nothing is published or settled."""
    from tests.support.money import outcome

    a = mesh.net.hosts["a"]
    port = mesh.bootstrap.rsplit(":", 1)[1]
    # A Kafka client, not a bare connect: the broker listens on the core's loopback only, and another of the core's
    # services (a p2pd on the bridge address) may well have the same port number there.
    def probe(bootstrap: str) -> list[str]:
        return [sys.executable, "-c",
                "import asyncio\nfrom aiokafka.admin import AIOKafkaAdminClient\n"
                "async def main():\n"
                f"    admin = AIOKafkaAdminClient(bootstrap_servers='{bootstrap}', request_timeout_ms=3000)\n"
                "    await asyncio.wait_for(admin.start(), 10)\n"
                "    await admin.close()\n"
                "asyncio.run(main())\n"]

    assert mesh.net.core.run(probe(mesh.bootstrap), timeout=60).returncode == 0  # the probe does reach a broker
    reach = a.run(probe(f"{mesh.net.core.address}:{port}"), timeout=60)
    assert reach.returncode != 0, "a provider host reached the broker"
    before = mesh.query("SELECT (SELECT count(*) FROM far_mesh_sessions) s, (SELECT count(*) FROM far_ledger_entries) e")
    account = mesh.query("SELECT account_id FROM far_api_keys LIMIT 1")[0]["account_id"]
    forged = outcome(f"forged-{uuid.uuid4().hex[:8]}", account, 5, datetime.now(timezone.utc))
    script = ("import sys, urllib.request, urllib.error\n"
              f"r = urllib.request.Request('{mesh.gateway_url}/api/nodes/heartbeats', data=sys.stdin.buffer.read(), "
              "headers={'Content-Type': 'application/json'})\n"
              "try:\n    urllib.request.urlopen(r, timeout=30)\nexcept urllib.error.HTTPError as e:\n"
              "    print(e.code, e.read().decode())\n")
    refused = a.run([sys.executable, "-c", script], input=forged.model_dump_json(), timeout=60)
    status, body = refused.stdout.split(" ", 1)
    assert status == "403" and json.loads(body)["error"] == "not_a_heartbeat", refused.stdout + refused.stderr
    time.sleep(1.0)
    assert mesh.query("SELECT (SELECT count(*) FROM far_mesh_sessions) s, (SELECT count(*) FROM far_ledger_entries) e") \
        == before
    audit_is_clean(mesh)


def _opened_a_session(node, offset: int) -> bool:
    """Whether the node's Petals server logged an inference session opened for blocks 2:4 after `offset`."""
    with open(node.log_path, "rb") as log:
        log.seek(offset)
        return b"rpc_inference.open(blocks=2:4" in log.read()


def test_partition_a_provider_mid_generation(mesh, tiny_model_dir) -> None:
    """Cut the link of the host serving blocks 2:4 mid-generation (b or c: whichever the route took, from its
    server's log): the request completes on the other one, the spare, with identical tokens; the cut node is
    declared offline after the time-out and paid only for the work it did; restored, it comes back online."""
    offsets = {name: mesh.nodes[name].log_path.stat().st_size for name in "bc"}
    cut: dict = {}

    def on_token(index: int) -> None:
        if index == CUT_AT and not cut:
            serving = [name for name in "bc" if _opened_a_session(mesh.nodes[name], offsets[name])]
            assert len(serving) == 1, serving
            cut.update(name=serving[0], spare="c" if serving[0] == "b" else "b")
            mesh.net.cut(mesh.net.hosts[cut["name"]])
            cut["at"] = time.monotonic()

    try:
        tokens, done, request_id = generate(mesh, 60, on_token)
        finished = time.monotonic()
        b, c = mesh.net.hosts[cut["name"]], mesh.net.hosts[cut["spare"]]  # the cut host and the spare
        peer_b, peer_c = mesh.nodes[b.name].peer_id, mesh.nodes[c.name].peer_id
        assert done["event"] == "done", done
        assert [t["token_id"] for t in tokens] == greedy_ids(tiny_model_dir, PROMPT, 60)
        print(f"\npartition: {b.name} (serving 2:4) cut after {CUT_AT} tokens; the request finished on the spare {finished - cut['at']:.1f} s "
              f"later")
        session, contributions = recorded(mesh, request_id)
        late = {c["peer_id"]: c for c in contributions if (c["start_block"], c["end_block"]) == (2, 4)}
        assert set(late) == {peer_b, peer_c}, contributions  # b's work up to the cut, then the spare's
        assert late[peer_b]["wallet"] == wallet_of(b) and late[peer_c]["wallet"] == wallet_of(c)
        assert 0 < late[peer_b]["tokens_processed"] < late[peer_c]["tokens_processed"] + late[peer_b]["tokens_processed"]
        assert sum(c["earnings"] for c in contributions) == session["cost"]
        # b's pay is its share of the work it did, nothing for the time it was away
        assert late[peer_b]["earnings"] < late[peer_c]["earnings"] + late[peer_b]["earnings"]
        offline_at = mesh.wait_for(lambda: mesh.node_state(peer_b) == "offline" and time.monotonic(),
                                   "the registry times the cut node out", NODE_TIMEOUT + 30)
        print(f"partition: {b.name} recorded offline {offline_at - cut['at']:.1f} s after the cut "
              f"(FARMESH_NODE_TIMEOUT={NODE_TIMEOUT:g})")
        assert mesh.node_state(peer_c) == "online"
        audit_is_clean(mesh)
    finally:
        if cut:
            mesh.net.restore(mesh.net.hosts[cut["name"]])
    back = mesh.wait_for(lambda: mesh.node_state(peer_b) == "online" and time.monotonic(),
                         "the restored node comes back online", 60)
    print(f"partition: {b.name} online again {back - cut.get('at', back):.1f} s after the cut")
    earned = mesh.query("SELECT sum(earnings) AS e FROM far_session_contributions WHERE peer_id = $1", peer_b)[0]["e"]
    assert earned == sum(c["earnings"] for c in mesh.query(
        "SELECT earnings FROM far_session_contributions WHERE peer_id = $1", peer_b))
    assert money.to_base_units(earned) > 0
    audit_is_clean(mesh)
