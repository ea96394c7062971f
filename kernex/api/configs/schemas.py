"""Request and response bodies of the configuration domain."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from kernex.protocol.config import DeviceSettings, SettingsOverrides


class ConfigVersionOut(BaseModel):
    """One version of a device's desired configuration."""

    version: int
    values: DeviceSettings = Field(
        description="What the device is sent: fleet defaults merged with overrides"
    )
    overrides: SettingsOverrides = Field(description="The device's own settings at this version")
    defaults_version: int | None = Field(description="The fleet defaults version merged under them")
    created_at: datetime
    created_by: str | None
    command_id: str | None
    command_state: str | None


class ReportedConfig(BaseModel):
    """What the device last reported about its configuration."""

    version: int | None = Field(
        description="The version it runs (from its newest heartbeat or config_applied)"
    )
    applied_at: datetime | None
    error: str | None = Field(description="Why the device could not apply a version, if it said so last")


class DeviceConfigView(BaseModel):
    """A device's desired configuration against what it reported."""

    device_id: str
    desired: ConfigVersionOut | None
    reported: ReportedConfig
    in_sync: bool = Field(
        description="The device reported applying the desired version (true if none is set)"
    )


class ConfigHistory(BaseModel):
    """A device's configuration versions, newest first."""

    device_id: str
    items: list[ConfigVersionOut]


class FleetDefaultsOut(BaseModel):
    """The fleet-wide configuration defaults in effect."""

    version: int | None = Field(description="None until defaults are first set")
    values: SettingsOverrides
    effective: DeviceSettings = Field(description="The built-in defaults with these applied")
    created_at: datetime | None
    created_by: str | None
    devices_updated: int | None = Field(default=None, description="Devices sent a new version by this change")
