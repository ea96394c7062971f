"""Database settings shared by the processes that use storage (api, ingest, CLI)."""

from __future__ import annotations

from kernex.kit.settings import KernexSettings

SQLITE_FILE = "kernex.db"


class StorageSettings(KernexSettings):
    """Where the database is: embedded SQLite in the data dir unless KERNEX_DATABASE_URL is set."""

    database_url: str | None = None

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy async URL in use."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / SQLITE_FILE).resolve()}"
