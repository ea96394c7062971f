"""Device configuration: the typed settings a config command carries (ConfigBody.values).

Operators set fleet-wide defaults and per-device overrides (`SettingsOverrides`: every field
optional, unset means "inherit"); the platform merges built-in defaults, fleet defaults and the
device's overrides into one complete `DeviceSettings`, and sends its JSON form as the values of
a signed config command. The agent validates the values with `DeviceSettings` and applies them.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator

from kernex.protocol.commands import CONFIG_VALUES_MAX_BYTES

HEARTBEAT_INTERVAL_MAX_S = 86_400  # a day: beyond it the liveness sweeper could not tell dead from quiet
TIMEOUT_MAX_S = 86_400
EXTRA_MAX_KEYS = 64
EXTRA_VALUE_MAX_CHARS = 512  # 64 keys of this stay well inside a config command's 64 KiB
# Built-in defaults, the same as the agent's own (kernex.agent.settings).
DEFAULT_HEARTBEAT_INTERVAL_S = 60
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800  # a large bundle over a slow cellular link
DEFAULT_INSTALL_TIMEOUT_S = 600  # upper bound for a bundle's install script (manifests may ask for less)
DEFAULT_API_TIMEOUT_S = 30

EXTRA_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ExtraKey = Annotated[str, StringConstraints(pattern=EXTRA_KEY_PATTERN)]
ExtraValue = (
    Annotated[str, StringConstraints(max_length=EXTRA_VALUE_MAX_CHARS)]
    | bool
    | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(allow_inf_nan=False)]
)
# Written out, because pydantic's own schema for constrained keys (patternProperties) would let any
# other key through with any value: clients generating requests from the schema need the real rule.
Extra = Annotated[
    dict[ExtraKey, ExtraValue],
    Field(max_length=EXTRA_MAX_KEYS),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": EXTRA_MAX_KEYS,
            "propertyNames": {"pattern": EXTRA_KEY_PATTERN},
            "additionalProperties": {
                "anyOf": [
                    {"type": "string", "maxLength": EXTRA_VALUE_MAX_CHARS},
                    {"type": "boolean"},
                    {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                    {"type": "number"},
                ]
            },
        }
    ),
]
HeartbeatInterval = Annotated[int, Field(ge=1, le=HEARTBEAT_INTERVAL_MAX_S)]
Timeout = Annotated[int, Field(ge=1, le=TIMEOUT_MAX_S)]


class LogLevel(StrEnum):
    """The agent's log level."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class SettingsOverrides(BaseModel):
    """Settings an operator sets: for the fleet (defaults) or one device (overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heartbeat_interval_s: HeartbeatInterval | None = None
    log_level: LogLevel | None = None
    download_timeout_s: Timeout | None = None
    install_timeout_s: Timeout | None = None
    api_timeout_s: Timeout | None = None
    extra: Extra | None = Field(
        default=None, description=f"Free-form settings: up to {EXTRA_MAX_KEYS} keys, scalar values"
    )

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        size = len(json.dumps(self.model_dump(mode="json", exclude_none=True)).encode("utf-8"))
        if size > CONFIG_VALUES_MAX_BYTES:
            raise ValueError(f"settings take {size} bytes as JSON; the limit is {CONFIG_VALUES_MAX_BYTES}")
        return self


class DeviceSettings(BaseModel):
    """A device's complete configuration: the values of a config command."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    heartbeat_interval_s: HeartbeatInterval = DEFAULT_HEARTBEAT_INTERVAL_S
    log_level: LogLevel = LogLevel.INFO
    download_timeout_s: Timeout = DEFAULT_DOWNLOAD_TIMEOUT_S
    install_timeout_s: Timeout = DEFAULT_INSTALL_TIMEOUT_S
    api_timeout_s: Timeout = DEFAULT_API_TIMEOUT_S
    extra: Extra = Field(default_factory=dict)


def merge(*layers: SettingsOverrides) -> DeviceSettings:
    """Built-in defaults, then each layer in order (fleet defaults, then the device's overrides).

    Typed settings: the last layer that sets one wins. `extra`: merged key by key.
    """
    values: dict[str, Any] = DeviceSettings().model_dump()
    extra: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.model_dump(exclude_none=True).items():
            if name == "extra":
                extra.update(value)
            else:
                values[name] = value
    values["extra"] = extra
    return DeviceSettings.model_validate(values)
