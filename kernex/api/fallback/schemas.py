"""Response bodies of the HTTP fallback."""

from __future__ import annotations

from pydantic import BaseModel, Field


class HeartbeatAccepted(BaseModel):
    """A heartbeat was verified; the device's outstanding commands come back with the answer."""

    accepted: bool = True
    stored: bool = Field(description="False when this (device, seq) was already stored: a retry")
    commands: list[str] = Field(
        description="Signed commands (compact JWS) the device has not finished: its current deploy "
        "command unless that deployment is over for it, its current config command unless it "
        "reported applying that version. Verify each like a retained MQTT command."
    )
    command_key_set: str | None = Field(
        default=None,
        description="The fleet's signed command key set (compact JWS), as retained on "
        "{prefix}/control/command-keys; null before the first rotation. Take it up (when newer "
        "than the pinned one) before verifying the commands.",
    )


class EventAccepted(BaseModel):
    """An event was verified and stored (or was already)."""

    accepted: bool = True
    stored: bool = Field(description="False when this (device, seq) was already stored: a retry")
