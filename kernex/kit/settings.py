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
    log_format: LogFormat = "console"

    @property
    def is_production(self) -> bool:
        """True when missing or default secrets must stop the process."""
        return self.environment is Environment.PRODUCTION
