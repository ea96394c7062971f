"""Agent settings: `KERNEX_AGENT_` environment variables, overridden by CLI options."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kernex.kit.logs import LogFormat
from kernex.protocol.keys import KeyType

DEFAULT_HEARTBEAT_INTERVAL_S = 60.0  # DESIGN.md: a heartbeat a minute per device
MIN_HEARTBEAT_INTERVAL_S = 1.0  # faster than this floods the broker for no operational gain
DEFAULT_BUFFER_SIZE = 1000  # ~16 hours of heartbeats at the default interval
DEFAULT_API_TIMEOUT_S = 30.0  # registration may sign a certificate; generous for slow links
# A bundle download must fit the device's staging storage; raise it for full-image bundles.
DEFAULT_MAX_BUNDLE_BYTES = 1024**3
# Decompression-bomb cap on a bundle's unpacked files, whatever the archive's size.
DEFAULT_MAX_UNPACKED_BYTES = 4 * 1024**3
# Two minutes of failed reconnects (several backoff rounds) before heartbeats go over HTTPS: long
# enough to ride out a broker restart, short enough that the platform does not mark the device
# offline at the default interval (3 missed heartbeats).
DEFAULT_FALLBACK_AFTER_S = 120.0


class AgentSettings(BaseSettings):
    """Everything a device agent needs to know before it has registered."""

    # Not KernexSettings: that base carries server-side fields (data dir, environment).
    model_config = SettingsConfigDict(env_prefix="KERNEX_AGENT_", extra="ignore", frozen=True)

    api_url: str = "http://127.0.0.1:8000"
    # Holds the device key, the registration result, certificates and the seq reservation.
    state_dir: Path = Path(".kernex-agent")
    # Used only when the state dir has no key yet; an existing key always wins.
    key_type: KeyType = KeyType.ECDSA_P256
    heartbeat_interval_s: Annotated[float, Field(ge=MIN_HEARTBEAT_INTERVAL_S)] = DEFAULT_HEARTBEAT_INTERVAL_S
    buffer_size: Annotated[int, Field(ge=1)] = DEFAULT_BUFFER_SIZE
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    log_level: str = "INFO"
    log_format: LogFormat = "console"
    api_timeout_s: Annotated[float, Field(gt=0)] = DEFAULT_API_TIMEOUT_S
    max_bundle_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_BUNDLE_BYTES
    max_unpacked_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_UNPACKED_BYTES
    # MQTT unreachable this long: heartbeats and events go over HTTPS (and commands come back in
    # the answers) until the broker is reachable again. 0 turns the fallback off.
    fallback_after_s: Annotated[float, Field(ge=0)] = DEFAULT_FALLBACK_AFTER_S
    # Bundles list the device types they fit (manifest.device_types); "*" fits every device.
    device_type: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: platform.machine() or "unknown"
    )

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"api_url must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")
