"""What the registry refuses before touching the database: malformed, mis-keyed, unsigned, forged records
(heartbeats not signed by their node, time-out decisions not signed by the registry)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from consumers.registry import consumer
from consumers.registry.consumer import log_time
from consumers.registry.decisions import RegistryKey, TrustedKeys
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
def registry_key(tmp_path_factory: pytest.TempPathFactory) -> RegistryKey:
    return RegistryKey.create(Path(tmp_path_factory.mktemp("registry")) / "registry.key")


@pytest.fixture
def check_record(registry_key: RegistryKey):
    """check_record as the registry calls it: trusting its own key."""
    return lambda record: consumer.check_record(record, TrustedKeys.of([registry_key.public_key]))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.generate(Path(tmp_path_factory.mktemp("id")) / "node.identity")


def signed(node: NodeIdentity, **changes) -> NodeHeartbeat:
    fields = dict(peer_id=node.peer_id, wallet="w", model="tiny", start_block=0, end_block=2, total_blocks=4,
                  throughput=1.0, state="online", version="v", device=DeviceInfo(kind="cpu"), interval_seconds=1.0)
    return sign_heartbeat(node, NodeHeartbeat(**{**fields, **changes}))


def record(event, key: str | None = None) -> Record:
    return Record(event.model_dump_json().encode(), (key or event.peer_id).encode())


def test_a_signed_heartbeat_passes(node: NodeIdentity, check_record) -> None:
    event = signed(node)
    assert check_record(record(event)) == event


@pytest.mark.parametrize("value, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "node.heartbeat", "peer_id": "x"}', "malformed"),
    (b'{"type": "node.unknown"}', "malformed"),
])
def test_malformed(value: bytes, reason: str, check_record) -> None:
    with pytest.raises(ValueError, match=reason):
        check_record(Record(value, b"x"))


def test_key_must_be_the_peer_id(node: NodeIdentity, check_record) -> None:
    with pytest.raises(ValueError, match="record key"):
        check_record(record(signed(node), key="someone-else"))
    with pytest.raises(ValueError, match="record key"):
        check_record(Record(signed(node).model_dump_json().encode(), None))


def test_unsigned_and_forged(node: NodeIdentity, tmp_path: Path, check_record) -> None:
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


def test_old_schema_versions_are_refused(node: NodeIdentity, check_record) -> None:
    with pytest.raises(ValueError, match="schema_version 1"):
        check_record(record(signed(node, schema_version=1)))


def decision(**changes) -> NodeTimedOut:
    fields = dict(peer_id="QmX", last_heartbeat_id="00000000-0000-4000-8000-000000000001",
                  last_seen=datetime(2026, 1, 1, tzinfo=timezone.utc), timeout_seconds=5)
    return NodeTimedOut(**{**fields, **changes})


def test_time_outs_need_the_registrys_signature_and_the_right_key(registry_key: RegistryKey, check_record) -> None:
    # Until issue 12 a time-out needed no signature; now only one the registry signed passes (then as before:
    # the record key must still be the peer id).
    signed_decision = registry_key.sign(decision())
    assert check_record(record(signed_decision)) == signed_decision
    assert signed_decision.key_id == registry_key.key_id and signed_decision.signature
    with pytest.raises(ValueError, match="record key"):
        check_record(record(signed_decision, key="QmY"))
    with pytest.raises(ValueError, match="signature: unsigned time-out decision"):
        check_record(record(decision()))


def test_forged_time_outs_are_refused(registry_key: RegistryKey, tmp_path: Path, check_record) -> None:
    other = RegistryKey.create(tmp_path / "other.key")
    with pytest.raises(ValueError, match="not one of the registry's keys"):
        check_record(record(other.sign(decision())))  # another key (a registry elsewhere, an attacker)
    borrowed = json.loads(other.sign(decision()).model_dump_json())
    borrowed["key_id"] = registry_key.key_id  # claims the registry's key, signed with another
    with pytest.raises(ValueError, match="bad signature"):
        check_record(Record(json.dumps(borrowed).encode(), b"QmX"))
    for field, value in (("last_heartbeat_id", "00000000-0000-4000-8000-000000000002"), ("timeout_seconds", 1.0),
                         ("peer_id", "QmY")):
        edited = json.loads(registry_key.sign(decision()).model_dump_json())
        edited[field] = value  # signed by the registry, then changed: the signature no longer covers it
        with pytest.raises(ValueError, match="bad signature"):
            check_record(Record(json.dumps(edited).encode(), edited["peer_id"].encode()))
    garbled = json.loads(registry_key.sign(decision()).model_dump_json())
    garbled["signature"] = "not base64!"
    with pytest.raises(ValueError, match="not valid base64"):
        check_record(Record(json.dumps(garbled).encode(), b"QmX"))
    with pytest.raises(ValueError, match="schema_version 1"):  # the unsigned v1 of before
        check_record(record(registry_key.sign(decision(schema_version=1))))


def test_a_signature_for_a_heartbeat_never_verifies_as_a_decision(registry_key: RegistryKey) -> None:
    from consumers.registry.decisions import SIGNING_DOMAIN, signing_bytes
    from farmesh.swarm import identity

    payload = json.loads(registry_key.sign(decision()).model_dump_json())
    assert signing_bytes(payload).startswith(SIGNING_DOMAIN) and SIGNING_DOMAIN != identity.SIGNING_DOMAIN
    assert signing_bytes(payload)[len(SIGNING_DOMAIN):] == identity.signing_bytes(payload)[
        len(identity.SIGNING_DOMAIN):]  # the same canonical JSON, under another domain tag


def test_log_time() -> None:
    fallback = datetime(2020, 1, 1, tzinfo=timezone.utc)
    assert log_time(Record(b"", None, timestamp=1_700_000_000_000), fallback) == datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert log_time(Record(b"", None, timestamp=None), fallback) == fallback
    assert log_time(Record(b"", None, timestamp=-1), fallback) == fallback
