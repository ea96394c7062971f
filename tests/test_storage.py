"""Migrations: up, down and up again on PostgreSQL and SQLite, and the schema matches the models."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from kernex.storage import models
from kernex.storage.database import create_engine, session_factory
from kernex.storage.migrate import downgrade, upgrade


def _diff(connection: sa.Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


async def test_migrations_round_trip_and_match_models(database_url: str) -> None:
    await asyncio.to_thread(downgrade, database_url, "base")
    await asyncio.to_thread(upgrade, database_url)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(_diff)
        assert differences == [], f"models and migrations disagree: {differences}"
    finally:
        await engine.dispose()


async def test_datetimes_come_back_aware_utc_on_both_databases(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            session.add(
                models.Device(id="d1", key_type="ed25519", public_key_pem="pem", key_fingerprint="f" * 64)
            )
            await session.commit()
            device = await session.get(models.Device, "d1", populate_existing=True)
            assert device is not None
            assert device.registered_at.tzinfo is not None
            assert device.state is models.AdmissionState.ACTIVE
            device.last_seen_at = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
            with pytest.raises(sa.exc.StatementError, match="naive"):
                await session.commit()
            await session.rollback()
            device.last_seen_at = datetime(2026, 1, 1, tzinfo=UTC)
            await session.commit()
    finally:
        await engine.dispose()
