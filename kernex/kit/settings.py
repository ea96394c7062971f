"""The base of every process's settings class: `KERNEX_` environment prefix, data dir, mode."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from kernex.kit.logs import LogFormat


class Environment(StrEnum):
    """Development generates missing secrets into the data dir; production refuses to start."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class KernexSettings(BaseSettings):
    """Fields every server-side process shares; each process defines one subclass."""

    model_config = SettingsConfigDict(env_prefix="KERNEX_", extra="ignore", frozen=True)

    environment: Environment = Environment.DEVELOPMENT
    # Holds the embedded SQLite file, the filesystem bundle store, the PKI and generated secrets.
    data_dir: Path = Path(".kernex")
    log_level: str = "INFO"
    # Unset: JSON lines in production (for log shippers), readable console lines in development.
    log_format: LogFormat | None = None

    @property
    def log_format_in_effect(self) -> LogFormat:
        """The configured log format, or the environment's default."""
        if self.log_format is not None:
            return self.log_format
        return "json" if self.environment is Environment.PRODUCTION else "console"

    @property
    def is_production(self) -> bool:
        """True when missing or default secrets must stop the process."""
        return self.environment is Environment.PRODUCTION
