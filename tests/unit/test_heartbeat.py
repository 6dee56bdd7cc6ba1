"""Heartbeat signatures: the node's libp2p identity (hivemind's format), canonical signing bytes, verification."""
from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2

from farmesh.swarm.identity import (
    SIGNING_DOMAIN,
    NodeIdentity,
    SignatureError,
    decode_key,
    encode_key,
    sign_heartbeat,
    signing_bytes,
    verify_payload,
)
from producers.node.heartbeat import HeartbeatPublisher, NodeDescription, device_info
from schemas.events import DeviceInfo, NodeHeartbeat


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.generate(tmp_path_factory.mktemp("id") / "node.identity")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.generate(tmp_path_factory.mktemp("id") / "other.identity")


def heartbeat(peer_id: str, **changes) -> NodeHeartbeat:
    fields = dict(peer_id=peer_id, wallet="wallet-a", model="tiny", start_block=0, end_block=2, total_blocks=4,
                  throughput=12.5, state="online", version="farmesh/0.1.0", interval_seconds=5.0,
                  device=DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=85_000_000_000))
    return NodeHeartbeat(**{**fields, **changes})


def wire(event: NodeHeartbeat) -> dict:
    """What the registry parses: the JSON the node published."""
    return json.loads(event.model_dump_json())


# ------------------------------------------------------------------------------------------ identity


def test_reads_hivemind_identities_and_writes_them_the_same_way(tmp_path: Path) -> None:
    P2P.generate_identity(str(tmp_path / "hivemind.key"))
    ours = NodeIdentity.load(tmp_path / "hivemind.key")
    assert ours.peer_id == PeerID.from_identity((tmp_path / "hivemind.key").read_bytes()).to_base58()
    assert ours.peer_id.startswith("Qm")

    made = NodeIdentity.generate(tmp_path / "ours.key")
    assert PeerID.from_identity((tmp_path / "ours.key").read_bytes()).to_base58() == made.peer_id
    assert (tmp_path / "ours.key").stat().st_mode & 0o777 == 0o400
    assert NodeIdentity.load(tmp_path / "ours.key").peer_id == made.peer_id
    with pytest.raises(FileExistsError):  # never overwrites an identity
        NodeIdentity.generate(tmp_path / "ours.key")


def test_key_encoding_is_libp2p_protobuf(identity: NodeIdentity) -> None:
    key_type, data = decode_key(identity.public_key_proto)
    reference = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=data).SerializeToString()
    assert key_type == crypto_pb2.RSA and reference == identity.public_key_proto == encode_key(key_type, data)
    for bad in (b"", b"\x08\x00", identity.public_key_proto + b"\x00", identity.public_key_proto[:-1]):
        with pytest.raises(ValueError):
            decode_key(bad)


def test_ed25519_identity_uses_the_inline_peer_id(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    made = NodeIdentity.from_private_key(key)
    # libp2p: a 36-byte encoded Ed25519 key is inlined (identity multihash), so peer ids start with 12D3KooW
    assert made.peer_id.startswith("12D3KooW")
    assert base58.b58decode(made.peer_id)[2:] == made.public_key_proto
    seed = key.private_bytes_raw()
    (tmp_path / "ed.key").write_bytes(encode_key(1, seed + key.public_key().public_bytes_raw()))
    assert NodeIdentity.load(tmp_path / "ed.key").peer_id == made.peer_id
    signed = sign_heartbeat(made, heartbeat(made.peer_id))
    verify_payload(wire(signed))


# ------------------------------------------------------------------------------------------ signatures


def test_signed_heartbeat_verifies_from_the_wire(identity: NodeIdentity) -> None:
    signed = sign_heartbeat(identity, heartbeat(identity.peer_id))
    payload = wire(signed)
    verify_payload(payload)
    assert payload["public_key"] == identity.public_key_b64
    # The registry checks the object it received: key order and whitespace on the wire do not matter.
    reordered = json.loads(json.dumps(dict(reversed(list(payload.items()))), indent=2))
    verify_payload(reordered)
    assert signing_bytes(payload).startswith(SIGNING_DOMAIN)
    assert b'"signature"' not in signing_bytes(payload)


@pytest.mark.parametrize("field, value", [
    ("wallet", "attacker-wallet"), ("state", "offline"), ("start_block", 1), ("throughput", 12.6),
    ("occurred_at", "2030-01-01T00:00:00Z"), ("event_id", "00000000-0000-4000-8000-000000000000"),
    ("model", "other"), ("interval_seconds", 300.0),
])
def test_any_change_breaks_the_signature(identity: NodeIdentity, field: str, value: object) -> None:
    payload = wire(sign_heartbeat(identity, heartbeat(identity.peer_id)))
    payload[field] = value
    with pytest.raises(SignatureError, match="bad signature"):
        verify_payload(payload)


def test_added_field_breaks_the_signature(identity: NodeIdentity) -> None:
    payload = wire(sign_heartbeat(identity, heartbeat(identity.peer_id)))
    payload["device"] = {**payload["device"], "name": "CPU"}
    with pytest.raises(SignatureError, match="bad signature"):
        verify_payload(payload)


def test_unsigned_is_refused(identity: NodeIdentity) -> None:
    payload = wire(heartbeat(identity.peer_id))
    with pytest.raises(SignatureError, match="unsigned"):
        verify_payload(payload)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_payload({**wire(sign_heartbeat(identity, heartbeat(identity.peer_id))), "signature": ""})


def test_another_key_cannot_speak_for_a_peer(identity: NodeIdentity, other: NodeIdentity) -> None:
    """Same peer id, new wallet: signed with another key, with either public key."""
    forged = heartbeat(identity.peer_id, wallet="attacker-wallet")
    # 1. the attacker's own key and public key: that key hashes to another peer id
    own = wire(forged.model_copy(update={"public_key": other.public_key_b64}))
    own["signature"] = base64.b64encode(other.sign(signing_bytes(own))).decode()
    with pytest.raises(SignatureError, match=f"belongs to peer {other.peer_id}"):
        verify_payload(own)
    # 2. the victim's public key with the attacker's signature
    borrowed = wire(forged.model_copy(update={"public_key": identity.public_key_b64}))
    borrowed["signature"] = base64.b64encode(other.sign(signing_bytes(borrowed))).decode()
    with pytest.raises(SignatureError, match="bad signature"):
        verify_payload(borrowed)
    # 3. a signature from another heartbeat of the victim, pasted
    genuine = wire(sign_heartbeat(identity, heartbeat(identity.peer_id)))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_payload({**borrowed, "signature": genuine["signature"]})
    with pytest.raises(ValueError, match="cannot be signed"):
        sign_heartbeat(other, heartbeat(identity.peer_id))


def test_signature_is_bound_to_the_heartbeat_domain(identity: NodeIdentity) -> None:
    payload = wire(sign_heartbeat(identity, heartbeat(identity.peer_id)))
    body = signing_bytes(payload)[len(SIGNING_DOMAIN):]
    payload["signature"] = base64.b64encode(identity.sign(body)).decode()  # the same JSON without the tag
    with pytest.raises(SignatureError, match="bad signature"):
        verify_payload(payload)


def test_malformed_keys_and_signatures(identity: NodeIdentity) -> None:
    payload = wire(sign_heartbeat(identity, heartbeat(identity.peer_id)))
    for changes, reason in [
        ({"signature": "not base64!"}, "not valid base64"),
        ({"public_key": "not base64!"}, "not valid base64"),
        ({"public_key": base64.b64encode(b"\x08\x00\x12\x01").decode()}, "public_key"),
        ({"signature": base64.b64encode(b"short").decode()}, "bad signature"),
    ]:
        with pytest.raises(SignatureError, match=reason):
            verify_payload({**payload, **changes})


def test_small_rsa_keys_are_refused() -> None:
    weak = NodeIdentity.from_private_key(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(SignatureError, match="1024 bits"):
        verify_payload(wire(sign_heartbeat(weak, heartbeat(weak.peer_id))))


def test_heartbeat_schema_rejects_spans_outside_the_model(identity: NodeIdentity) -> None:
    with pytest.raises(ValueError, match="span"):
        heartbeat(identity.peer_id, start_block=2, end_block=5)
    with pytest.raises(ValueError):
        heartbeat(identity.peer_id, throughput=float("nan"))


# ------------------------------------------------------------------------------------------ node side


def test_publisher_signs_and_survives_an_absent_broker(identity: NodeIdentity) -> None:
    description = NodeDescription("wallet-a", "tiny", 0, 2, 4, 3.0, "v", device_info("cpu"), 0.5)
    publisher = HeartbeatPublisher("127.0.0.1:9", identity, description, send_timeout=2.0)
    try:
        event = publisher.heartbeat("joining")
        verify_payload(wire(event))
        assert (event.state, event.peer_id, event.total_blocks) == ("joining", identity.peer_id, 4)
        started = time.monotonic()
        assert publisher.beat("online") is False  # logged, not raised: the node keeps serving
        assert time.monotonic() - started < 10
        assert publisher.sent == 0
    finally:
        publisher.close()


def test_device_info_cpu() -> None:
    info = device_info("cpu")
    assert info.kind == "cpu" and info.memory_bytes > 0
    assert os.cpu_count()


def test_node_throughput_flag_is_a_number_or_measure() -> None:
    import click

    from producers.node.server import ThroughputParam

    param = ThroughputParam()
    assert param.convert("measure", None, None) == "measure"
    assert param.convert("2.5", None, None) == 2.5
    for bad in ("auto", "-1", "inf", "nan"):
        with pytest.raises(click.BadParameter):
            param.convert(bad, None, None)
