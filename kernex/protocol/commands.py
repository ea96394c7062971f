"""Signed commands (platform → device) and the events that report on them (DESIGN.md).

Commands are retained on `.../commands/{kind}`, signed by a control-plane key the device pinned
at registration (or took up since from a signed key set, below). Each carries a per-device
`revision` that only grows; the agent compares it per kind with the last revision it executed,
so a retained command is never run twice and an older one never undoes a newer one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernex.protocol import jws
from kernex.protocol.exceptions import InvalidKeyError, MessageError, SignatureError, StaleKeySetError
from kernex.protocol.keys import PrivateKey, PublicKey, load_public_key_pem
from kernex.protocol.messages import BIGINT_MAX, ID_MAX_LEN, SHORT_TEXT, CommandKey
from kernex.protocol.topics import CommandKind

CONFIG_VALUES_MAX_BYTES = 64 * 1024  # config rides in a retained MQTT message; keep it small

Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
Revision = Annotated[int, Field(ge=1, le=BIGINT_MAX)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class DeployBody(_Frozen):
    """Install (or roll back to) a bundle."""

    deployment_id: Id
    bundle_id: Id
    name: Annotated[str, Field(max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=1, le=2**40)]
    download_path: Annotated[str, Field(pattern=r"^/api/v1/[A-Za-z0-9/_.-]+$", max_length=512)]
    rollback: bool = False


class ConfigBody(_Frozen):
    """A device's desired configuration at a version."""

    version: Annotated[int, Field(ge=1, le=BIGINT_MAX)]
    values: dict[str, Any]


class Command(_Frozen):
    """Claims of a signed command."""

    command_id: Id
    device_id: Id
    kind: CommandKind
    revision: Revision
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    deploy: DeployBody | None = None
    config: ConfigBody | None = None

    @model_validator(mode="after")
    def _one_body_matching_kind(self) -> Self:
        bodies = {CommandKind.DEPLOY: self.deploy, CommandKind.CONFIG: self.config}
        if bodies[self.kind] is None or any(b is not None for k, b in bodies.items() if k is not self.kind):
            raise ValueError(f"a {self.kind.value} command carries exactly its own body")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


def sign_command(command: Command, key: PrivateKey, key_id: str) -> str:
    """Sign a command with a control-plane key."""
    return jws.sign_claims(command.model_dump(mode="json"), key, kid=key_id, typ=jws.TYP_COMMAND)


def verify_command(
    token: str | bytes, pinned: Mapping[str, PublicKey], *, device_id: str, now: datetime
) -> Command:
    """Verify a command for this device: pinned key, valid signature, addressed here, not expired."""
    parsed = jws.parse(token)
    header = parsed.header
    if header.get("typ") != jws.TYP_COMMAND:
        raise SignatureError("not a command")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in pinned:
        raise SignatureError(f"command signed by a key this device does not trust: {kid!r}")
    verified = jws.verify(parsed, pinned[kid])
    try:
        command = Command.model_validate(json.loads(verified.payload))
    except (ValueError, ValidationError) as exc:
        raise MessageError(f"malformed command: {exc}") from None
    if command.device_id != device_id:
        raise SignatureError(f"command addressed to {command.device_id}, not this device")
    if command.expires_at <= now:
        raise SignatureError(f"command {command.command_id} expired at {command.expires_at.isoformat()}")
    return command


# --- Command key sets: rotating the control-plane keys ------------------------------------

TYP_KEY_SET = "kernex-keyset+jws"
# A device pins a handful of keys: the one signing now, the next one, and a few not yet retired.
KEY_SET_MAX_KEYS = 16


class KeySet(_Frozen):
    """Claims of a signed command key set: the control-plane keys a device is to pin, all of them.

    Signed by a key the device already pins, so trust passes from key to key; `version` only
    grows, so an older set (which may still list a retired key) is never taken back.
    """

    version: Annotated[int, Field(ge=1, le=BIGINT_MAX)]
    issued_at: AwareDatetime
    keys: Annotated[list[CommandKey], Field(min_length=1, max_length=KEY_SET_MAX_KEYS)]


def sign_key_set(key_set: KeySet, key: PrivateKey, key_id: str) -> str:
    """Sign a key set with the control-plane key that signs commands now."""
    return jws.sign_claims(key_set.model_dump(mode="json"), key, kid=key_id, typ=TYP_KEY_SET)


def verify_key_set(
    token: str | bytes, pinned: Mapping[str, PublicKey], *, current_version: int
) -> tuple[KeySet, dict[str, PublicKey]]:
    """Verify a key set against the pinned keys; returns it and its keys by kid.

    Raises SignatureError when it is not signed by a pinned key, StaleKeySetError when its
    version is not above current_version, MessageError when its claims or keys are unusable
    (a set is taken whole or not at all: a device never pins half of one).
    """
    parsed = jws.parse(token)
    header = parsed.header
    if header.get("typ") != TYP_KEY_SET:
        raise SignatureError("not a command key set")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in pinned:
        raise SignatureError(f"key set signed by a key this device does not trust: {kid!r}")
    verified = jws.verify(parsed, pinned[kid])
    try:
        key_set = KeySet.model_validate(json.loads(verified.payload))
    except (ValueError, ValidationError) as exc:
        raise MessageError(f"malformed key set: {exc}") from None
    if key_set.version <= current_version:
        raise StaleKeySetError(
            f"key set version {key_set.version} is not above the pinned {current_version}",
            version=key_set.version,
        )
    keys: dict[str, PublicKey] = {}
    for key in key_set.keys:
        try:
            keys[key.kid] = load_public_key_pem(key.public_key_pem)
        except InvalidKeyError as exc:
            raise MessageError(
                f"key set version {key_set.version}: key {key.kid!r} is unusable: {exc}"
            ) from None
    return key_set, keys


# --- Events that report on commands ------------------------------------------------------


class EventType(StrEnum):
    """`type` of a device Event (kernex.protocol.messages.Event)."""

    DEPLOYMENT = "deployment"
    CONFIG_APPLIED = "config_applied"


class DeploymentStage(StrEnum):
    """Where a device is with a deploy command."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECKING = "health_checking"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"


TERMINAL_STAGES = frozenset(
    {DeploymentStage.SUCCEEDED, DeploymentStage.FAILED, DeploymentStage.ROLLED_BACK, DeploymentStage.REFUSED}
)


class DeploymentProgress(_Frozen):
    """`data` of a `deployment` event."""

    deployment_id: Id
    command_id: Id
    bundle_id: Id
    version: Annotated[str, Field(max_length=SHORT_TEXT)]
    stage: DeploymentStage
    error: Annotated[str, Field(max_length=4096)] | None = None
    output: Annotated[str, Field(max_length=16_384)] | None = None
    current_version: Annotated[str, Field(max_length=SHORT_TEXT)] | None = None


class ConfigApplied(_Frozen):
    """`data` of a `config_applied` event."""

    command_id: Id
    version: Annotated[int, Field(ge=1, le=BIGINT_MAX)]
    error: Annotated[str, Field(max_length=4096)] | None = None
