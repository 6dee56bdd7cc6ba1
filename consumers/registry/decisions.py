"""The registry's signature on its time-out decisions: only the registry can take a node offline.

A `node.timed_out` travels on the heartbeat topic, which providers' nodes may produce to, so anyone who can
produce there could otherwise write one and take an honest node offline. The registry therefore signs each
decision it publishes and applies (live, and in `farmesh registry rebuild`) only decisions whose signature
verifies with one of its own keys; anything else is dead-lettered with the reason and changes nothing.

Scheme: Ed25519. The registry's private key is a PEM (PKCS#8) file (`FARMESH_REGISTRY_KEY`, default
`<data dir>/registry.key`, created on the registry's first start, mode 0600; `openssl genpkey -algorithm ed25519`
writes the same format). A decision carries `key_id` (which key signed it) and `signature` (base64) over
`signing_bytes`: a domain tag, then the received JSON object without `signature`, keys sorted, compact, UTF-8 --
the heartbeat's canonical form (farmesh/swarm/identity.py) under another tag, so a signature made for one kind of
event never verifies as the other.

Why a key pair and not an HMAC secret: verifying needs no secret. The registry's public keys can be pinned in
configuration (`FARMESH_REGISTRY_PUBLIC_KEYS`) so a rebuild into another database, on another machine, verifies
the same history without holding the key that could forge it; several keys can be pinned at once, so a new key
(rotation) still accepts the decisions the old one signed; and any other reader of the topic could verify them
too. With nothing pinned, the registry trusts exactly the key it signs with.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from schemas.events import NodeTimedOut

# Prepended to every signed decision, so a signature made for anything else with the same key never verifies.
SIGNING_DOMAIN = b"farmesh.registry.node_timed_out.v2\n"


class KeyFileError(ValueError):
    """The registry's key file cannot be read, written or used."""


class DecisionSignatureError(ValueError):
    """A time-out decision is unsigned, badly signed, or signed by a key the registry does not trust."""


def signing_bytes(payload: Mapping[str, Any]) -> bytes:
    """What a decision's signature covers: the domain tag, then its JSON object without `signature`, keys sorted,
    compact, UTF-8 (floats as Python's shortest repr, which round-trips)."""
    body = {k: v for k, v in payload.items() if k != "signature"}
    return SIGNING_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                       allow_nan=False).encode("utf-8")


def _raw(public: ed25519.Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def public_key_text(public: ed25519.Ed25519PublicKey) -> str:
    """The form FARMESH_REGISTRY_PUBLIC_KEYS pins: base64 of the 32 raw bytes."""
    return base64.b64encode(_raw(public)).decode("ascii")


def parse_public_key(text: str) -> ed25519.Ed25519PublicKey:
    """A pinned public key: base64 of 32 raw bytes (as `farmesh registry key` prints it)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"registry public key {text!r} is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"registry public key {text!r} is not an Ed25519 key (32 bytes, base64)")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class RegistryKey:
    """The registry's signing key (only the registry holds it)."""

    private_key: ed25519.Ed25519PrivateKey

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    @property
    def public_key_text(self) -> str:
        return public_key_text(self.public_key)

    @classmethod
    def load(cls, path: Path | str) -> RegistryKey:
        """Read a PEM (PKCS#8) Ed25519 private key; KeyFileError says why it cannot be used."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"registry key {path}: {exc.strerror or exc}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"registry key {path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"registry key {path}: a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def create(cls, path: Path | str) -> RegistryKey:
        """Write a new key to `path` (mode 0600; never over an existing file)."""
        path = Path(path)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise
        except OSError as exc:
            raise KeyFileError(f"registry key {path}: cannot create it: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path | str) -> tuple[RegistryKey, bool]:
        """The key in `path`, created first if there is none; and whether it was created now."""
        if not Path(path).exists():
            try:
                return cls.create(path), True
            except FileExistsError:
                pass  # another registry created it meanwhile: use that one
        return cls.load(path), False

    def sign(self, decision: NodeTimedOut) -> NodeTimedOut:
        """The decision with this key's id and its signature."""
        unsigned = decision.model_copy(update={"key_id": self.key_id, "signature": None})
        signature = self.private_key.sign(signing_bytes(unsigned.model_dump(mode="json")))
        return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose time-out decisions the registry applies, by key id."""

    keys: Mapping[str, ed25519.Ed25519PublicKey]

    @classmethod
    def of(cls, public_keys: Iterable[ed25519.Ed25519PublicKey]) -> TrustedKeys:
        return cls({key_id_of(k): k for k in public_keys})

    @classmethod
    def parse(cls, texts: Iterable[str]) -> TrustedKeys:
        return cls.of(parse_public_key(t) for t in texts)

    def __contains__(self, key: RegistryKey) -> bool:
        return key.key_id in self.keys

    def verify(self, payload: Mapping[str, Any]) -> None:
        """Check a received decision (parsed JSON): signed by one of these keys, over exactly this object.
        Raises DecisionSignatureError with the reason."""
        key_id, signature_text = payload.get("key_id"), payload.get("signature")
        if not key_id or not signature_text:
            raise DecisionSignatureError("unsigned time-out decision (no key_id/signature): only the registry "
                                         "decides that a node timed out")
        public = self.keys.get(key_id) if isinstance(key_id, str) else None
        if public is None:
            raise DecisionSignatureError(f"time-out decision signed by key {key_id!r}, not one of the registry's "
                                         f"keys ({', '.join(sorted(self.keys)) or 'none'})")
        try:
            signature = base64.b64decode(signature_text, validate=True) if isinstance(signature_text, str) else b""
        except (binascii.Error, ValueError):
            raise DecisionSignatureError("time-out decision's signature is not valid base64") from None
        try:
            public.verify(signature, signing_bytes(payload))
        except (InvalidSignature, ValueError):  # ValueError: a value canonical JSON cannot hold (NaN)
            raise DecisionSignatureError(f"bad signature: the time-out decision does not verify with the "
                                         f"registry's key {key_id}") from None


def registry_keys(key_path: Path, pinned: Iterable[str], *, signing: bool) -> tuple[RegistryKey | None, TrustedKeys]:
    """The registry's signing key (when `signing`) and the keys it trusts, from its configuration
    (FARMESH_REGISTRY_KEY, FARMESH_REGISTRY_PUBLIC_KEYS); SettingError says what is wrong and how to fix it.

    The service (`signing`) loads its key, creating it on first start unless keys are pinned (a new key nobody
    pinned would refuse its own decisions), and refuses to start if its key is not among the pinned ones. A
    rebuild only verifies: with pinned keys it needs no key file; without, it reads the file and never creates one
    (a new key would refuse every decision in the history).
    """
    from farmesh.runtime.errors import SettingError

    pinned = list(pinned)
    try:
        trusted = TrustedKeys.parse(pinned) if pinned else None
    except ValueError as exc:
        raise SettingError(f"FARMESH_REGISTRY_PUBLIC_KEYS: {exc}") from None
    if not signing and trusted is not None:
        return None, trusted
    if not key_path.exists() and (trusted is not None or not signing):
        raise SettingError(
            f"registry key {key_path} not found: time-out decisions are verified with the registry's key; point "
            f"FARMESH_REGISTRY_KEY (--registry-key) at the live registry's key file"
            + (" or pin its public key (FARMESH_REGISTRY_PUBLIC_KEYS)" if not signing else
               ", or unset FARMESH_REGISTRY_PUBLIC_KEYS to start with a new key"))
    try:
        key, _ = RegistryKey.load_or_create(key_path) if signing else (RegistryKey.load(key_path), False)
    except KeyFileError as exc:
        raise SettingError(f"{exc} (FARMESH_REGISTRY_KEY)") from None
    if trusted is None:
        return key, TrustedKeys.of([key.public_key])
    if key not in trusted:
        raise SettingError(f"registry key {key_path} ({key.key_id}, public key {key.public_key_text}) is not among "
                           f"FARMESH_REGISTRY_PUBLIC_KEYS: its decisions would be refused; pin it too")
    return key, trusted
