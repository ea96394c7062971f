"""Alembic environment: runs migrations over our async engines (asyncpg or aiosqlite)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from kernex.storage import models
from kernex.storage.database import create_engine
from kernex.storage.migrate import include_name

target_metadata = SQLModel.metadata
# `kernex db upgrade` runs on every start, possibly in several processes at once: on PostgreSQL
# they take this transaction-level advisory lock, so one migrates and the others wait, then find
# the schema current. (An arbitrary constant: "kernex" in ASCII.)
MIGRATION_LOCK_KEY = 0x6B65726E6578
assert models.Device.__tablename__  # importing models registers every table on the metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode recreates tables.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _run_async() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
