"""The device's own key pair, created once on first start and kept in the state dir.

The private key never leaves the device; the device id derives from its public key, so the same
key always names the same device (DESIGN.md "Identity and trust").
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from kernex.agent.exceptions import IdentityError
from kernex.agent.files import PRIVATE_FILE_MODE, create_exclusive, ensure_private_dir
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import (
    KeyType,
    PrivateKey,
    device_id_for,
    generate_private_key,
    key_type_of,
    load_private_key_pem,
    private_key_to_pem,
)

KEY_FILE = "device.key"

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """The device key, where it lives, and the device id it derives."""

    key: PrivateKey
    key_path: Path
    device_id: str

    @property
    def key_type(self) -> KeyType:
        """The type of the device key."""
        return key_type_of(self.key.public_key())


def load_or_create(state_dir: Path, key_type: KeyType) -> Identity:
    """Load the key from `state_dir`, creating one of `key_type` on first start.

    Blocking (file I/O, and RSA-4096 generation takes about a second): call it off the event loop.
    """
    key_path = state_dir / KEY_FILE
    try:
        ensure_private_dir(state_dir)
        if not key_path.exists():
            _create(key_path, key_type)
        identity = _load(key_path)
    except OSError as exc:
        raise IdentityError(f"cannot access the device key {key_path}: {exc}") from None
    if identity.key_type is not key_type:
        # Changing the type would mean a new key, hence a new device: keep the identity.
        log.warning(
            "existing device key has another type than configured: keeping the existing key",
            key_path=str(key_path),
            existing=identity.key_type.value,
            configured=key_type.value,
        )
    return identity


def _create(key_path: Path, key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    if create_exclusive(key_path, private_key_to_pem(key)):
        log.info("created device key", key_path=str(key_path), key_type=key_type.value)


def _load(key_path: Path) -> Identity:
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & ~PRIVATE_FILE_MODE:
        log.warning(
            "device key was readable by others: restricting it", key_path=str(key_path), mode=oct(mode)
        )
        key_path.chmod(PRIVATE_FILE_MODE)
    try:
        key = load_private_key_pem(key_path.read_bytes())
    except InvalidKeyError as exc:
        # Never replace an unreadable key silently: that would turn this device into another.
        raise IdentityError(f"device key {key_path} is unusable ({exc}); move it away to re-enrol") from None
    return Identity(key=key, key_path=key_path, device_id=device_id_for(key.public_key()))
