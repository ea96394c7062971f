"""Database dumps for `kernex backup` / `kernex restore`: pg_dump/pg_restore, or SQLite's backup API.

PostgreSQL is dumped in pg_dump's custom format (`-Fc`: compressed, restorable table by table)
by the pg_dump program, so the dump is exactly what PostgreSQL's own tools expect; the password
goes through the environment (PGPASSWORD), never the command line. SQLite is copied with the
sqlite3 backup API, which takes a consistent snapshot while ingest and the API keep writing.

Everything here blocks (subprocesses, file copies): call it from the CLI or off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
from enum import StrEnum
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from kernex.storage.database import create_engine, is_sqlite
from kernex.storage.exceptions import StorageError

PG_TOOL_TIMEOUT_S = 3600  # a large fleet's history takes minutes; an hour means something hangs
SQLITE_PAGES_PER_STEP = 1024  # copy in steps so writers get the lock between them


class DumpError(StorageError):
    """A dump or restore failed; the message says what to do."""


class DatabaseKind(StrEnum):
    """What a dump holds; a dump restores only onto the same kind."""

    POSTGRES = "postgres"
    SQLITE = "sqlite"


def kind_of(database_url: str) -> DatabaseKind:
    """The kind of database a SQLAlchemy URL names."""
    return DatabaseKind.SQLITE if is_sqlite(database_url) else DatabaseKind.POSTGRES


def dump_file_name(kind: DatabaseKind) -> str:
    """The dump's name inside a backup."""
    return "kernex.dump" if kind is DatabaseKind.POSTGRES else "kernex.sqlite"


def dump(database_url: str, target: Path) -> DatabaseKind:
    """Write a consistent dump of the database to `target`."""
    kind = kind_of(database_url)
    if kind is DatabaseKind.SQLITE:
        source = _sqlite_path(database_url)
        if not source.is_file():
            raise DumpError(f"the SQLite database {source} does not exist")
        _sqlite_copy(source, target)
        return kind
    url = make_url(database_url)
    _run_pg_tool("pg_dump", ["--format=custom", "--no-owner", "--no-privileges", f"--file={target}"], url)
    return kind


def restore(database_url: str, source: Path, kind: DatabaseKind, *, force: bool = False) -> None:
    """Load a dump into the database; refuses a database that holds tables unless `force`."""
    if kind is not kind_of(database_url):
        raise DumpError(
            f"this backup holds a {kind.value} database and KERNEX_DATABASE_URL names a "
            f"{kind_of(database_url).value} one: restore onto the same kind"
        )
    if not force and not is_empty(database_url):
        raise DumpError(
            "the target database already has tables: restore onto a fresh database, or pass --force"
        )
    if kind is DatabaseKind.SQLITE:
        target = _sqlite_path(database_url)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in (
            target,
            target.with_name(target.name + "-wal"),
            target.with_name(target.name + "-shm"),
        ):
            leftover.unlink(missing_ok=True)
        _sqlite_copy(source, target)
        target.chmod(0o600)
        return
    options = ["--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction"]
    if force:
        options += ["--clean", "--if-exists"]
    _run_pg_tool("pg_restore", [*options, str(source)], make_url(database_url), database_option=True)


def is_empty(database_url: str) -> bool:
    """True when the database has no tables (a fresh one); a missing SQLite file is empty too."""
    if is_sqlite(database_url) and not _sqlite_path(database_url).exists():
        return True
    return asyncio.run(_table_count(database_url)) == 0


def schema_revision(database_url: str) -> str | None:
    """The Alembic revision the database is at, or None before the first migration."""
    return asyncio.run(_revision(database_url))


async def _table_count(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DumpError(f"cannot inspect the target database: {exc}") from None
    finally:
        await engine.dispose()
    return len(names)


async def _revision(database_url: str) -> str | None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
            if "alembic_version" not in tables:
                return None
            value = (
                await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).scalar_one_or_none()
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise DumpError(f"cannot read the schema revision: {exc}") from None
    finally:
        await engine.dispose()
    return str(value) if value is not None else None


def _sqlite_copy(source: Path, target: Path) -> None:
    """Copy a live SQLite database page by page with the backup API (a consistent snapshot)."""
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(target)) as dst,
        ):
            src.backup(dst, pages=SQLITE_PAGES_PER_STEP)
    except sqlite3.Error as exc:
        raise DumpError(f"cannot copy the SQLite database {source} to {target}: {exc}") from None


def _sqlite_path(database_url: str) -> Path:
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise DumpError(f"{database_url} is not an SQLite file")
    return Path(database)


def _run_pg_tool(tool: str, options: list[str], url: URL, *, database_option: bool = False) -> None:
    program = shutil.which(tool)
    if program is None:
        raise DumpError(
            f"{tool} is not installed: apt-get install postgresql-client (the server's major version)"
        )
    env = {**os.environ}
    connection: list[str] = []
    if url.host:
        connection.append(f"--host={url.host}")
    if url.port:
        connection.append(f"--port={url.port}")
    if url.username:
        connection.append(f"--username={url.username}")
    if url.password is not None:
        env["PGPASSWORD"] = url.password  # the environment, not argv: argv is visible in ps
    ssl = url.query.get("ssl") or url.query.get("sslmode")
    if isinstance(ssl, str):
        env["PGSSLMODE"] = ssl
    database = url.database or "postgres"
    target = [f"--dbname={database}"] if database_option else [database]
    try:
        result = subprocess.run(  # noqa: S603 - a fixed program; arguments from our own settings
            [program, *connection, "--no-password", *options, *target],
            env=env,
            capture_output=True,
            text=True,
            timeout=PG_TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DumpError(f"{tool} did not finish within {PG_TOOL_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise DumpError(f"{tool} failed (exit {result.returncode}): {lines[-1] if lines else 'no message'}")
