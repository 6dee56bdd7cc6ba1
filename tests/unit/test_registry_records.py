"""What the registry refuses before touching the database: malformed, mis-keyed, unsigned, forged records."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from consumers.registry.consumer import check_record, log_time
from farmesh.swarm.identity import NodeIdentity, sign_heartbeat
from schemas.events import DeviceInfo, NodeHeartbeat, NodeTimedOut


@dataclass
class Record:
    value: bytes
    key: bytes | None
    topic: str = "farmesh.nodes.heartbeats"
    partition: int = 0
    offset: int = 0
    timestamp: int | None = 1_700_000_000_000


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.generate(Path(tmp_path_factory.mktemp("id")) / "node.identity")


def signed(node: NodeIdentity, **changes) -> NodeHeartbeat:
    fields = dict(peer_id=node.peer_id, wallet="w", model="tiny", start_block=0, end_block=2, total_blocks=4,
                  throughput=1.0, state="online", version="v", device=DeviceInfo(kind="cpu"), interval_seconds=1.0)
    return sign_heartbeat(node, NodeHeartbeat(**{**fields, **changes}))


def record(event, key: str | None = None) -> Record:
    return Record(event.model_dump_json().encode(), (key or event.peer_id).encode())


def test_a_signed_heartbeat_passes(node: NodeIdentity) -> None:
    event = signed(node)
    assert check_record(record(event)) == event


@pytest.mark.parametrize("value, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "node.heartbeat", "peer_id": "x"}', "malformed"),
    (b'{"type": "node.unknown"}', "malformed"),
])
def test_malformed(value: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_record(Record(value, b"x"))


def test_key_must_be_the_peer_id(node: NodeIdentity) -> None:
    with pytest.raises(ValueError, match="record key"):
        check_record(record(signed(node), key="someone-else"))
    with pytest.raises(ValueError, match="record key"):
        check_record(Record(signed(node).model_dump_json().encode(), None))


def test_unsigned_and_forged(node: NodeIdentity, tmp_path: Path) -> None:
    unsigned = signed(node).model_copy(update={"signature": None})
    with pytest.raises(ValueError, match="signature: unsigned"):
        check_record(record(unsigned))
    payload = json.loads(signed(node).model_dump_json())
    payload["wallet"] = "attacker"
    with pytest.raises(ValueError, match="bad signature"):
        check_record(Record(json.dumps(payload).encode(), node.peer_id.encode()))
    attacker = NodeIdentity.generate(tmp_path / "attacker.identity")
    forged = signed(attacker).model_copy(update={"peer_id": node.peer_id})
    with pytest.raises(ValueError, match="belongs to peer"):
        check_record(record(forged))


def test_old_schema_versions_are_refused(node: NodeIdentity) -> None:
    with pytest.raises(ValueError, match="schema_version 1"):
        check_record(record(signed(node, schema_version=1)))


def test_time_outs_need_no_signature_but_the_right_key() -> None:
    decision = NodeTimedOut(peer_id="QmX", last_heartbeat_id="00000000-0000-4000-8000-000000000001",
                            last_seen=datetime(2026, 1, 1, tzinfo=timezone.utc), timeout_seconds=5)
    assert check_record(record(decision)) == decision
    with pytest.raises(ValueError, match="record key"):
        check_record(record(decision, key="QmY"))


def test_log_time() -> None:
    fallback = datetime(2020, 1, 1, tzinfo=timezone.utc)
    assert log_time(Record(b"", None, timestamp=1_700_000_000_000), fallback) == datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert log_time(Record(b"", None, timestamp=None), fallback) == fallback
    assert log_time(Record(b"", None, timestamp=-1), fallback) == fallback
