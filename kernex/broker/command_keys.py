"""The command key ring: rotating the control-plane keys that sign commands.

Until the first rotation the ring is the PKI's first key (`command-signing.key`) alone, at
version 0. `rotate` adds a new key (encrypted like the others, in `command-keys/<kid>.key`) that
starts signing only after a transition, and signs the new key set with the key that signs now:
devices trust that set because they pin its signer, and so pin the new key before it signs
anything. `retire` drops a key that no longer signs. Every change bumps the version and stores
the signed set (`token`) in `command-keys.json`; the API publishes it retained on
`{prefix}/control/command-keys` (kernex.api.commands.keys) and hands its keys to registering
devices.

Changes are serialised by a file lock and written atomically, so the CLI and several API
processes can share the directory; readers reload the file when it changes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from kernex.broker._files import atomic_write, ensure_private_dir
from kernex.broker.exceptions import PKIError
from kernex.broker.pki import (
    COMMAND_KEY_ID_HEX_CHARS,
    COMMAND_RING_FILE,
    COMMAND_RING_KEYS_DIR,
    FleetPKI,
    exclusive_lock,
)
from kernex.protocol.commands import KEY_SET_MAX_KEYS, KeySet, sign_key_set
from kernex.protocol.keys import PrivateKey, public_key_fingerprint, public_key_to_pem
from kernex.protocol.messages import BIGINT_MAX, CommandKey

RING_FILE = COMMAND_RING_FILE
RING_KEYS_DIR = COMMAND_RING_KEYS_DIR
RING_LOCK = ".command-keys.lock"
COMMAND_KEY_ALG = "ES256"  # every control-plane key is ECDSA P-256
_ALWAYS = datetime(1970, 1, 1, tzinfo=UTC)  # the first key has signed from the start


def command_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A command key's JWS `kid`: "cp-" and 64 bits of its SPKI SHA-256 (as FleetPKI.command_key_id)."""
    return "cp-" + public_key_fingerprint(public_key)[:COMMAND_KEY_ID_HEX_CHARS]


class RingKey(BaseModel):
    """One key of the ring and the moment it starts signing commands."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kid: str
    public_key_pem: str
    signs_from: AwareDatetime


class Ring(BaseModel):
    """The ring as stored: its version, its keys, and the signed key set of that version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Annotated[int, Field(ge=0, le=BIGINT_MAX)] = 0
    keys: Annotated[list[RingKey], Field(min_length=1, max_length=KEY_SET_MAX_KEYS)]
    # None at version 0: devices got the first key at registration, there is nothing to publish.
    token: str | None = None

    def signer(self, now: datetime) -> RingKey:
        """The key that signs at `now`: the newest whose transition is over."""
        started = [k for k in self.keys if k.signs_from <= now]
        if not started:
            raise PKIError("no command key of the ring signs yet")  # the first key always does
        return max(started, key=lambda k: k.signs_from)

    @property
    def public_keys(self) -> list[CommandKey]:
        """Every key of the ring, as devices pin them."""
        return [
            CommandKey(kid=k.kid, alg=COMMAND_KEY_ALG, public_key_pem=k.public_key_pem) for k in self.keys
        ]


class CommandKeyRing:
    """The command-signing keys of one PKI directory."""

    def __init__(self, pki: FleetPKI) -> None:
        self._pki = pki
        self._private: dict[str, PrivateKey] = {}

    @property
    def path(self) -> Path:
        """The ring file (written by the first rotation)."""
        return self._pki.directory / RING_FILE

    def key_path(self, kid: str) -> Path:
        """Where a ring key is kept, encrypted with the PKI passphrase."""
        if kid == self._pki.command_key_id:
            return self._pki.command_key_path
        return self._pki.directory / RING_KEYS_DIR / f"{kid}.key"

    def stamp(self) -> float | None:
        """The ring file's modification time (None before the first rotation): reload when it moves."""
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return None

    def load(self) -> Ring:
        """The ring as stored; before any rotation, the PKI's first key alone at version 0."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Ring(
                keys=[
                    RingKey(
                        kid=self._pki.command_key_id,
                        public_key_pem=self._pki.command_public_key_pem,
                        signs_from=_ALWAYS,
                    )
                ]
            )
        except OSError as exc:
            raise PKIError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return Ring.model_validate_json(raw)
        except ValidationError as exc:
            raise PKIError(f"{self.path} is corrupt ({exc.error_count()} errors)") from None

    def private_key(self, kid: str) -> PrivateKey:
        """Decrypt a ring key (once; runs the passphrase KDF, keep it off an event loop)."""
        if kid not in self._private:
            key = self._pki.open_key(self.key_path(kid), f"command-signing key {kid}")
            if command_key_id(key.public_key()) != kid:
                raise PKIError(f"{self.key_path(kid)} does not hold command key {kid}")
            self._private[kid] = key
        return self._private[kid]

    def rotate(self, transition: timedelta, now: datetime | None = None) -> tuple[Ring, RingKey]:
        """Add a new key that signs from now + transition; returns the new ring and the key."""
        if transition < timedelta(0):
            raise PKIError("the transition must not be negative")
        now = now or datetime.now(UTC)
        with exclusive_lock(self._pki.directory / RING_LOCK):
            ring = self.load()
            if len(ring.keys) >= KEY_SET_MAX_KEYS:
                raise PKIError(f"the ring holds {KEY_SET_MAX_KEYS} keys already: retire one first")
            key = ec.generate_private_key(ec.SECP256R1())
            added = RingKey(
                kid=command_key_id(key.public_key()),
                public_key_pem=public_key_to_pem(key.public_key()),
                signs_from=now + transition,
            )
            # The key first: a ring naming a key that is not on disk could sign nothing.
            ensure_private_dir(self.key_path(added.kid).parent)
            atomic_write(self.key_path(added.kid), self._pki.seal_key(key))
            self._private[added.kid] = key
            return self._save(ring, [*ring.keys, added], now), added

    def retire(self, kid: str, now: datetime | None = None) -> Ring:
        """Drop a key that no longer signs (a newer one took over); devices stop trusting it."""
        now = now or datetime.now(UTC)
        with exclusive_lock(self._pki.directory / RING_LOCK):
            ring = self.load()
            retiring = next((k for k in ring.keys if k.kid == kid), None)
            if retiring is None:
                raise PKIError(f"no command key {kid!r} in the ring")
            if retiring.signs_from >= ring.signer(now).signs_from:
                raise PKIError(f"command key {kid!r} signs now or will: only a superseded key can be retired")
            return self._save(ring, [k for k in ring.keys if k.kid != kid], now)

    def _save(self, ring: Ring, keys: list[RingKey], now: datetime) -> Ring:
        version = ring.version + 1
        signer = ring.signer(now)
        key_set = KeySet(version=version, issued_at=now, keys=Ring(keys=keys).public_keys)
        token = sign_key_set(key_set, self.private_key(signer.kid), signer.kid)
        new = Ring(version=version, keys=keys, token=token)
        atomic_write(self.path, new.model_dump_json(indent=2).encode("utf-8"))
        return new
