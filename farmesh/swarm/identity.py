"""A node's libp2p identity and its signed heartbeats: signing (the node, producers/node/heartbeat.py) and
verification (the registry).

Identity. A Petals node's peer id is the libp2p peer id of the private key in its `--identity-path` file
(hivemind 1.1.12 writes a libp2p protobuf `PrivateKey{key_type: RSA, data: DER (PKCS#1) private key}`, RSA 2048).
The peer id is the multihash of the protobuf-encoded *public* key `PublicKey{key_type, data}` (for RSA, data is
the DER SubjectPublicKeyInfo): sha2-256 when that encoding is longer than 42 bytes, identity otherwise (Ed25519),
written in base58 ("Qm..." for RSA). https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md

Signature. A heartbeat carries that public key (`public_key`, base64 of the protobuf encoding) and a signature
(`signature`, base64) over `signing_bytes`: a domain tag, then the heartbeat's JSON object without `signature`,
keys sorted, no whitespace, UTF-8. RSA keys sign with RSASSA-PKCS1-v1_5 / SHA-256 and Ed25519 keys with Ed25519, as
libp2p does. The registry verifies (1) the public key hashes to the claimed peer id, and (2) the signature over
the *received* JSON object, so only the holder of the node's identity key can publish as that peer or change its
wallet. Verification needs only `cryptography` and `base58` (no hivemind import).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from schemas.events import NodeHeartbeat

log = logging.getLogger(__name__)

# Prepended to every signed heartbeat, so a signature made for anything else with the same key never verifies.
SIGNING_DOMAIN = b"farmesh.node.heartbeat.v2\n"

# libp2p crypto.proto KeyType
KEY_RSA = 0
KEY_ED25519 = 1
_KEY_NAMES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
_MIN_RSA_BITS = 2048  # libp2p refuses smaller RSA keys
_IDENTITY_MULTIHASH_MAX = 42  # libp2p: public keys encoded in at most 42 bytes are inlined (identity multihash)


class SignatureError(ValueError):
    """A heartbeat is unsigned, badly signed, or its key is not the one behind its peer id."""


# --------------------------------------------------------------------------------------------- protobuf
# crypto.proto's PublicKey/PrivateKey are two required fields: 1 key_type (varint), 2 data (bytes).
# Encoded by hand (canonical field order, as libp2p and protobuf do) to keep verification free of hivemind.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_key(key_type: int, data: bytes) -> bytes:
    """libp2p protobuf `PublicKey`/`PrivateKey` {key_type, data}."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key(encoded: bytes) -> tuple[int, bytes]:
    """(key_type, data) of a protobuf-encoded libp2p key; only the canonical encoding is accepted."""
    if encoded[:1] != b"\x08":
        raise ValueError("not a libp2p protobuf key (field 1 missing)")
    key_type, pos = _read_varint(encoded, 1)
    if encoded[pos:pos + 1] != b"\x12":
        raise ValueError("not a libp2p protobuf key (field 2 missing)")
    length, pos = _read_varint(encoded, pos + 1)
    data = encoded[pos:pos + length]
    if len(data) != length or pos + length != len(encoded):
        raise ValueError("libp2p protobuf key has the wrong length or trailing bytes")
    if encode_key(key_type, data) != encoded:
        raise ValueError("libp2p protobuf key is not canonically encoded")
    return key_type, data


def peer_id_of(public_key_proto: bytes) -> str:
    """The libp2p peer id (base58) of a protobuf-encoded public key."""
    if len(public_key_proto) <= _IDENTITY_MULTIHASH_MAX:
        multihash = b"\x00" + _varint(len(public_key_proto)) + public_key_proto
    else:
        multihash = b"\x12\x20" + hashlib.sha256(public_key_proto).digest()
    return base58.b58encode(multihash).decode("ascii")


# --------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class NodeIdentity:
    """A node's libp2p private key (as in its identity file) and what derives from it."""

    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    public_key_proto: bytes
    peer_id: str

    @classmethod
    def from_private_key(cls, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> NodeIdentity:
        public = key.public_key()
        if isinstance(key, rsa.RSAPrivateKey):
            der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            proto = encode_key(KEY_RSA, der)
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            proto = encode_key(KEY_ED25519, raw)
        else:
            raise TypeError(f"unsupported identity key type {type(key).__name__}")
        return cls(key, proto, peer_id_of(proto))

    @classmethod
    def load(cls, path: Path | str) -> NodeIdentity:
        """Read a libp2p identity file (hivemind's `--identity-path` format)."""
        key_type, data = decode_key(Path(path).read_bytes())
        if key_type == KEY_RSA:
            key = serialization.load_der_private_key(data, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{path}: RSA identity does not hold an RSA key")
        elif key_type == KEY_ED25519:
            if len(data) not in (32, 64):
                raise ValueError(f"{path}: an Ed25519 identity holds 64 bytes (seed + public key), got {len(data)}")
            key = ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
        else:
            raise ValueError(f"{path}: unsupported identity key type {_KEY_NAMES.get(key_type, key_type)}")
        return cls.from_private_key(key)

    @classmethod
    def generate(cls, path: Path | str) -> NodeIdentity:
        """Write a new RSA-2048 identity exactly as hivemind's P2P.generate_identity does (mode 0400)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as out:
            out.write(encode_key(KEY_RSA, der))
        return cls.from_private_key(key)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_proto).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return self.private_key.sign(message)


# --------------------------------------------------------------------------------------------- signatures


def signing_bytes(payload: Mapping[str, Any]) -> bytes:
    """What a heartbeat's signature covers: the domain tag, then its JSON object without `signature`,
    keys sorted, compact, UTF-8 (floats as Python's shortest repr, which round-trips)."""
    body = {k: v for k, v in payload.items() if k != "signature"}
    return SIGNING_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                       allow_nan=False).encode("utf-8")


def sign_heartbeat(identity: NodeIdentity, heartbeat: NodeHeartbeat) -> NodeHeartbeat:
    """The heartbeat with its public key and signature; its peer id must be the identity's."""
    if heartbeat.peer_id != identity.peer_id:
        raise ValueError(f"heartbeat of {heartbeat.peer_id} cannot be signed by {identity.peer_id}")
    unsigned = heartbeat.model_copy(update={"public_key": identity.public_key_b64, "signature": None})
    signature = identity.sign(signing_bytes(unsigned.model_dump(mode="json")))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise SignatureError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not valid base64") from None


def verify_payload(payload: Mapping[str, Any]) -> None:
    """Check a received heartbeat object (parsed JSON): its key is the one behind `peer_id` and its signature
    covers exactly this object. Raises SignatureError with the reason."""
    if payload.get("signature") in (None, "") or payload.get("public_key") in (None, ""):
        raise SignatureError("unsigned heartbeat (no public_key/signature)")
    proto = _b64(payload.get("public_key"), "public_key")
    signature = _b64(payload.get("signature"), "signature")
    try:
        key_type, data = decode_key(proto)
    except ValueError as exc:
        raise SignatureError(f"public_key: {exc}") from None
    claimed = payload.get("peer_id")
    derived = peer_id_of(proto)
    if claimed != derived:
        raise SignatureError(f"public_key belongs to peer {derived}, not to the claimed peer_id {claimed}")
    message = signing_bytes(payload)
    try:
        if key_type == KEY_RSA:
            key = serialization.load_der_public_key(data)
            if not isinstance(key, rsa.RSAPublicKey):
                raise SignatureError("public_key: RSA key type with a non-RSA key")
            if key.key_size < _MIN_RSA_BITS:
                raise SignatureError(f"public_key: RSA key of {key.key_size} bits (at least {_MIN_RSA_BITS})")
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif key_type == KEY_ED25519:
            ed25519.Ed25519PublicKey.from_public_bytes(data).verify(signature, message)
        else:
            raise SignatureError(f"public_key: unsupported key type {_KEY_NAMES.get(key_type, key_type)}")
    except InvalidSignature:
        raise SignatureError("bad signature: it does not verify with the peer's public key") from None
    except (ValueError, TypeError) as exc:  # malformed key material
        raise SignatureError(f"public_key: {exc}") from None


# --------------------------------------------------------------------------------------------- node side


