"""Apply Alembic migrations programmatically (`kernex db upgrade`, `kernex up`, tests)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from kernex.storage.exceptions import MigrationError
from kernex.storage.partitions import is_partition

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def include_name(name: str | None, type_: str, _parent_names: object) -> bool:
    """Alembic's comparison filter: heartbeat partitions are created at run time, not modelled."""
    return not (type_ == "table" and name is not None and is_partition(name))


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at our migrations, without an alembic.ini."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # `%` would be read as interpolation by configparser.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision`. Blocking: call it off the event loop."""
    try:
        command.upgrade(alembic_config(database_url), revision)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise MigrationError(f"migration to {revision} failed: {exc}") from exc


def downgrade(database_url: str, revision: str) -> None:
    """Take the schema down to `revision`. Blocking."""
    try:
        command.downgrade(alembic_config(database_url), revision)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise MigrationError(f"migration to {revision} failed: {exc}") from exc
