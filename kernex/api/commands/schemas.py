"""Bodies of `/api/v1/command-keys`: the command key ring, and rotating it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from kernex.broker.command_keys import COMMAND_KEY_ALG, Ring

TRANSITION_MAX_S = 30 * 24 * 3600  # past a month the fleet has long pinned the key; longer is a typo


class CommandKeyOut(BaseModel):
    """One control-plane key devices pin."""

    kid: str
    alg: str = COMMAND_KEY_ALG
    public_key_pem: str
    signs_from: datetime = Field(description="When this key starts (or started) signing commands")
    signing: bool = Field(description="True for the one key that signs commands now")


class CommandKeyRingOut(BaseModel):
    """The command key ring: the key set devices pin, at its version."""

    version: int = Field(description="Grows with every rotation or retirement; 0 before the first")
    keys: list[CommandKeyOut]

    @classmethod
    def of(cls, ring: Ring, now: datetime) -> CommandKeyRingOut:
        """The ring as the API shows it at `now`."""
        signer = ring.signer(now).kid
        return cls(
            version=ring.version,
            keys=[
                CommandKeyOut(
                    kid=k.kid,
                    public_key_pem=k.public_key_pem,
                    signs_from=k.signs_from,
                    signing=k.kid == signer,
                )
                for k in ring.keys
            ],
        )


class CommandKeyRotate(BaseModel):
    """Rotate: a new key, pinned by the fleet at once, signing after the transition."""

    transition_s: Annotated[int, Field(ge=0, le=TRANSITION_MAX_S)] | None = Field(
        default=None,
        description="Seconds the current key keeps signing (default KERNEX_COMMAND_KEY_TRANSITION_S)",
    )


class CommandKeyRotated(CommandKeyRingOut):
    """The ring after a rotation, and the key it added."""

    added: str = Field(description="kid of the new key")
