"""The device key: created once with private permissions, reused across restarts, never replaced."""

from __future__ import annotations

import stat

import pytest
from structlog.testing import capture_logs

from kernex.agent.exceptions import IdentityError
from kernex.agent.identity import KEY_FILE, load_or_create
from kernex.protocol.keys import KeyType, device_id_for, key_type_of


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_key_is_created_private_and_reused(tmp_path, key_type):
    state_dir = tmp_path / "agent"

    first = load_or_create(state_dir, key_type)

    key_path = state_dir / KEY_FILE
    assert first.key_path == key_path
    assert _mode(key_path) == 0o600
    assert _mode(state_dir) == 0o700
    assert key_type_of(first.key.public_key()) is key_type
    assert first.device_id == device_id_for(first.key.public_key())
    pem = key_path.read_bytes()

    second = load_or_create(state_dir, key_type)  # a restart

    assert second.device_id == first.device_id
    assert key_path.read_bytes() == pem
    # Only the key: no temporary files left behind.
    assert [p.name for p in state_dir.iterdir()] == [KEY_FILE]


def test_existing_key_of_another_type_is_kept(tmp_path):
    original = load_or_create(tmp_path, KeyType.ED25519)

    with capture_logs() as logs:
        again = load_or_create(tmp_path, KeyType.ECDSA_P256)

    assert again.device_id == original.device_id
    assert again.key_type is KeyType.ED25519
    warning = next(entry for entry in logs if entry["log_level"] == "warning")
    assert warning["existing"] == "ed25519"
    assert warning["configured"] == "ecdsa-p256"


def test_corrupt_key_stops_instead_of_creating_a_new_device(tmp_path):
    key_path = tmp_path / KEY_FILE
    tmp_path.chmod(0o700)
    key_path.write_bytes(b"not a key")
    key_path.chmod(0o600)

    with pytest.raises(IdentityError, match="unusable"):
        load_or_create(tmp_path, KeyType.ECDSA_P256)

    assert key_path.read_bytes() == b"not a key"


def test_loose_permissions_are_tightened(tmp_path):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    identity.key_path.chmod(0o644)
    tmp_path.chmod(0o755)

    again = load_or_create(tmp_path, KeyType.ECDSA_P256)

    assert again.device_id == identity.device_id
    assert _mode(identity.key_path) == 0o600
    assert _mode(tmp_path) == 0o700
