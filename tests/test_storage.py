"""Migrations: up, down and up again on PostgreSQL and SQLite, one step at a time and all at once;
the schema matches the models; `kernex db upgrade` is safe to repeat and to run concurrently."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

from kernex.storage import models
from kernex.storage.database import create_engine, session_factory
from kernex.storage.dump import schema_revision
from kernex.storage.migrate import alembic_config, downgrade, include_name, upgrade
from tests.fixtures.platform import KERNEX


def _diff(connection: sa.Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_name": include_name}
    )
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


def _revisions(database_url: str) -> list[str]:
    """Every migration, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(database_url))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


async def _at(database_url: str) -> str | None:
    return await asyncio.to_thread(schema_revision, database_url)


async def test_every_migration_steps_down_and_up_one_at_a_time(database_url: str) -> None:
    revisions = _revisions(database_url)
    assert len(revisions) >= 3
    assert await _at(database_url) == revisions[-1]
    # Down one step at a time to base, checking where each step lands ...
    for index in reversed(range(len(revisions))):
        below = revisions[index - 1] if index else "base"
        await asyncio.to_thread(downgrade, database_url, below)
        assert await _at(database_url) == (revisions[index - 1] if index else None)
    # ... then up one step at a time, and each step down and up again on the way.
    for index, revision in enumerate(revisions):
        await asyncio.to_thread(upgrade, database_url, revision)
        assert await _at(database_url) == revision
        await asyncio.to_thread(downgrade, database_url, revisions[index - 1] if index else "base")
        await asyncio.to_thread(upgrade, database_url, revision)
        assert await _at(database_url) == revision
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_concurrent_upgrades_of_a_fresh_postgres_database_all_succeed(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    # `kernex db upgrade` runs on every start: processes starting together must not collide.
    name = f"kernex_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = (
        postgres_admin_url.replace("postgresql://", "postgresql+asyncpg://", 1).rsplit("/", 1)[0] + f"/{name}"
    )
    try:
        # Separate processes, as on a real start (Alembic's context is per process, not per thread).
        env = {**os.environ, "KERNEX_DATABASE_URL": url, "KERNEX_DATA_DIR": str(tmp_path)}
        procs = [
            await asyncio.create_subprocess_exec(
                KERNEX, "db", "upgrade", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        results = [await proc.communicate() for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * 4, [err.decode() for _, err in results]
        assert await _at(url) == _revisions(url)[-1]
    finally:
        admin = await asyncpg.connect(postgres_admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def test_db_upgrade_command_is_safe_to_repeat(tmp_path: Path) -> None:
    env = {**os.environ, "KERNEX_DATA_DIR": str(tmp_path / "data")}
    env.pop("KERNEX_DATABASE_URL", None)
    for _ in range(2):
        done = subprocess.run([KERNEX, "db", "upgrade"], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "latest schema" in done.stdout
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'kernex.db'}"
    assert schema_revision(url) == _revisions(url)[-1]
