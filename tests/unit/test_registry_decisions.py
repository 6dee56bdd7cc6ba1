"""The registry's key: created once and kept, refused when unusable, and which keys the service and the rebuild
trust (FARMESH_REGISTRY_KEY, FARMESH_REGISTRY_PUBLIC_KEYS)."""
from __future__ import annotations

import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from consumers.registry.decisions import RegistryKey, TrustedKeys, registry_keys
from farmesh.runtime.errors import SettingError
from farmesh.runtime.settings import Settings
from schemas.events import NodeTimedOut

DECISION = NodeTimedOut(peer_id="QmX", last_heartbeat_id="00000000-0000-4000-8000-000000000001",
                        last_seen=datetime(2026, 1, 1, tzinfo=timezone.utc), timeout_seconds=5)


def test_created_on_first_start_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "registry.key"
    key, created = RegistryKey.load_or_create(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created = RegistryKey.load_or_create(path)
    assert not created and again.key_id == key.key_id and again.public_key_text == key.public_key_text
    with pytest.raises(FileExistsError):
        RegistryKey.create(path)  # never over an existing key


def test_an_openssl_style_pem_key_is_read(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "registry.key"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key = RegistryKey.load(path)
    TrustedKeys.of([private.public_key()]).verify(key.sign(DECISION).model_dump(mode="json"))


def test_unusable_key_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    garbage, rsa_key = tmp_path / "garbage.key", tmp_path / "rsa.key"
    garbage.write_text("not a key")
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for path, reason in ((garbage, "not an unencrypted PEM private key"), (rsa_key, "not an Ed25519 key")):
        with pytest.raises(SettingError, match=reason):
            registry_keys(path, [], signing=True)


def test_the_service_trusts_its_own_key_or_the_pinned_ones(tmp_path: Path) -> None:
    path = tmp_path / "registry.key"
    key, trusted = registry_keys(path, [], signing=True)  # first start: created
    assert key is not None and path.exists() and list(trusted.keys) == [key.key_id]
    old = RegistryKey.create(tmp_path / "old.key")
    key2, trusted = registry_keys(path, [old.public_key_text, key.public_key_text], signing=True)  # rotated
    assert key2 is not None and key2.key_id == key.key_id and set(trusted.keys) == {key.key_id, old.key_id}
    with pytest.raises(SettingError, match="is not among FARMESH_REGISTRY_PUBLIC_KEYS"):
        registry_keys(path, [old.public_key_text], signing=True)  # would refuse its own decisions
    with pytest.raises(SettingError, match="not found"):  # pinned: no new key is created in its place
        registry_keys(tmp_path / "lost.key", [key.public_key_text], signing=True)
    assert not (tmp_path / "lost.key").exists()
    with pytest.raises(SettingError, match="FARMESH_REGISTRY_PUBLIC_KEYS: .*not base64"):
        registry_keys(path, ["%%%"], signing=True)
    with pytest.raises(SettingError, match="not an Ed25519 key"):
        registry_keys(path, ["AAAA"], signing=True)


def test_the_rebuild_verifies_with_pinned_keys_or_the_key_file_and_creates_nothing(tmp_path: Path) -> None:
    key = RegistryKey.create(tmp_path / "registry.key")
    none, trusted = registry_keys(tmp_path / "absent.key", [key.public_key_text], signing=False)
    assert none is None and list(trusted.keys) == [key.key_id]  # pinned: no private key needed
    _, trusted = registry_keys(tmp_path / "registry.key", [], signing=False)
    assert list(trusted.keys) == [key.key_id]
    with pytest.raises(SettingError, match="not found"):
        registry_keys(tmp_path / "absent.key", [], signing=False)
    assert not (tmp_path / "absent.key").exists()


def test_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FARMESH_REGISTRY_KEY", raising=False)
    monkeypatch.delenv("FARMESH_REGISTRY_PUBLIC_KEYS", raising=False)
    assert Settings(data_dir=tmp_path).registry_key_path == tmp_path / "registry.key"
    monkeypatch.setenv("FARMESH_REGISTRY_KEY", str(tmp_path / "k.pem"))
    monkeypatch.setenv("FARMESH_REGISTRY_PUBLIC_KEYS", "a=, b=")
    settings = Settings()
    assert settings.registry_key_path == tmp_path / "k.pem" and settings.registry_public_keys == ["a=", "b="]


def test_the_key_command_prints_what_to_pin(tmp_path: Path) -> None:
    from consumers.registry.cli import registry

    path = tmp_path / "registry.key"
    first = CliRunner().invoke(registry, ["key", "--registry-key", str(path)])
    assert first.exit_code == 0, first.output
    key = RegistryKey.load(path)
    assert first.output.strip() == (f"registry key {path} (created) key_id={key.key_id} "
                                    f"public_key={key.public_key_text}")
    again = CliRunner().invoke(registry, ["key", "--registry-key", str(path)])
    assert "(created)" not in again.output and key.public_key_text in again.output
