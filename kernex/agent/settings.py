"""Agent settings: a TOML config file, `KERNEX_AGENT_` environment variables, CLI options.

Precedence, highest first: command-line options (init arguments), environment variables, the
config file, defaults. The file is `--config` / `KERNEX_AGENT_CONFIG`, else
/etc/kernex/agent.toml when it exists; its keys are the setting names (`api_url = "..."`), and an
unknown key is an error rather than a silently ignored typo.
"""

from __future__ import annotations

import os
import platform
import tomllib
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kernex.agent.exceptions import AgentError
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
# Where `kernex agent install` puts the config file, and where the agent looks when none is named.
DEFAULT_CONFIG_FILE = Path("/etc/kernex/agent.toml")
CONFIG_ENV = "KERNEX_AGENT_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_RENEW_BEFORE_FRACTION = 1 / 3  # a 30-day certificate renews with 10 days to spare


# Two minutes of failed reconnects (several backoff rounds) before heartbeats go over HTTPS: long
# enough to ride out a broker restart, short enough that the platform does not mark the device
# offline at the default interval (3 missed heartbeats).
DEFAULT_FALLBACK_AFTER_S = 120.0


class ConfigFileError(AgentError):
    """The config file is missing, unreadable, not TOML, or names a setting that does not exist."""


class AgentSettings(BaseSettings):
    """Everything a device agent needs to know before it has registered."""

    # Not KernexSettings: that base carries server-side fields (data dir, environment).
    model_config = SettingsConfigDict(env_prefix="KERNEX_AGENT_", extra="ignore", frozen=True)

    # The TOML file the settings were read from (None: no file); set by --config or KERNEX_AGENT_CONFIG.
    config: Path | None = None
    api_url: str = "http://127.0.0.1:8000"
    # An HTTP(S) proxy for API calls (registration, downloads, the HTTPS fallback), e.g.
    # "http://proxy.lan:3128". MQTT always connects directly. Unset: no proxy (the environment's
    # HTTPS_PROXY is ignored, so what the agent does is what this file says).
    proxy: str | None = None
    # A PEM bundle to verify the API's TLS certificate (a private CA behind the reverse proxy);
    # unset: the system's CA store.
    api_ca_file: Path | None = None
    # Holds the device key, the registration result, certificates and the seq reservation.
    state_dir: Path = Path(".kernex-agent")
    # Used only when the state dir has no key yet; an existing key always wins.
    key_type: KeyType = KeyType.ECDSA_P256
    heartbeat_interval_s: Annotated[float, Field(ge=MIN_HEARTBEAT_INTERVAL_S)] = DEFAULT_HEARTBEAT_INTERVAL_S
    buffer_size: Annotated[int, Field(ge=1)] = DEFAULT_BUFFER_SIZE
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    # Sent at registration: under the `token` admission policy a valid one admits the device at once.
    enrollment_token: SecretStr | None = None
    # Renew the device certificate once less than this fraction of its lifetime remains.
    renew_before_fraction: Annotated[float, Field(gt=0, le=1)] = DEFAULT_RENEW_BEFORE_FRACTION
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

    @field_validator("config", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # KERNEX_AGENT_CONFIG="" means "no config file", not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or not urlsplit(value).hostname:
            raise ValueError(f"api_url must be an http:// or https:// URL with a host, got {value!r}")
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith(("http://", "https://")) or not urlsplit(value).hostname
        ):
            raise ValueError(f"proxy must be an http:// or https:// URL with a host, got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files on a device
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no secrets dir either
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI options (init), then the environment, then the config file, then defaults."""
        named = (
            init_settings.init_kwargs.get("config") if isinstance(init_settings, InitSettingsSource) else None
        )
        path = config_file_path(named)
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, _config_file_source(settings_cls, path)


def config_file_path(named: Path | str | None = None) -> Path | None:
    """The config file in effect: `named`, else KERNEX_AGENT_CONFIG, else the default when it exists.

    An empty KERNEX_AGENT_CONFIG means "no file", even when the default exists.
    """
    if named is not None:
        return Path(named)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env is not None:
        return Path(from_env) if from_env.strip() else None
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The TOML file, checked: it must exist and parse, and every key must be a setting."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from None
    # `config` names the file itself: it has no meaning inside it.
    unknown = sorted(key for key in data if key not in settings_cls.model_fields or key == "config")
    if unknown:
        raise ConfigFileError(f"config file {path}: unknown setting {unknown[0]!r}")
    return InitSettingsSource(settings_cls, init_kwargs={**data, "config": path})
