"""`kernex users` and `kernex tokens`, run as a user runs them; the first admin of `kernex up`."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from kernex.cli.users import first_run_admin
from tests.fixtures.auth import api_settings, bearer, login, running_api
from tests.fixtures.platform import KERNEX


def _kernex(
    tmp_path: Path, url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERNEX_DATA_DIR": str(tmp_path / "data"), "KERNEX_DATABASE_URL": url}
    return subprocess.run(
        [KERNEX, *args], input=stdin, env=env, capture_output=True, text=True, check=False, timeout=60
    )


async def test_create_admin_prints_a_generated_password_once_and_it_logs_in(
    sqlite_url: str, tmp_path: Path
) -> None:
    created = await asyncio.to_thread(
        _kernex, tmp_path, sqlite_url, "users", "create-admin", "--username", "root"
    )
    assert created.returncode == 0, created.stderr
    password = created.stdout.strip().rsplit(" ", 1)[-1]
    assert len(password) >= 24
    assert password not in created.stderr, "the password goes to stdout only, never the log"
    again = await asyncio.to_thread(
        _kernex, tmp_path, sqlite_url, "users", "create-admin", "--username", "root"
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr

    piped = await asyncio.to_thread(
        _kernex,
        tmp_path,
        sqlite_url,
        "users",
        "create-admin",
        "--username",
        "ops",
        "--password-stdin",
        stdin="a piped admin password\n",
    )
    assert piped.returncode == 0, piped.stderr
    assert "a piped admin password" not in piped.stdout + piped.stderr
    short = await asyncio.to_thread(
        _kernex,
        tmp_path,
        sqlite_url,
        "users",
        "create-admin",
        "--username",
        "x1",
        "--password-stdin",
        stdin="short\n",
    )
    assert short.returncode == 1

    async with running_api(api_settings(tmp_path, sqlite_url)) as (_app, client):
        token = await login(client, "root", password)
        assert (await client.get("/api/v1/auth/me", headers=bearer(token))).json()["role"] == "admin"
        await login(client, "ops", "a piped admin password")


async def test_tokens_create_list_revoke(sqlite_url: str, tmp_path: Path) -> None:
    created = await asyncio.to_thread(
        _kernex, tmp_path, sqlite_url, "tokens", "create", "ci", "--scope", "operator"
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("kx_")
    token_id = token.split("_")[1]
    listed = await asyncio.to_thread(_kernex, tmp_path, sqlite_url, "tokens", "list")
    assert token_id in listed.stdout
    assert token not in listed.stdout, "never shown again"
    async with running_api(api_settings(tmp_path, sqlite_url)) as (_app, client):
        assert (await client.get("/api/v1/auth/me", headers=bearer(token))).json()["role"] == "operator"
        revoked = await asyncio.to_thread(_kernex, tmp_path, sqlite_url, "tokens", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        assert (await client.get("/api/v1/auth/me", headers=bearer(token))).status_code == 401
    bad_scope = await asyncio.to_thread(
        _kernex, tmp_path, sqlite_url, "tokens", "create", "x", "--scope", "admin"
    )
    assert bad_scope.returncode == 1


async def test_first_run_creates_one_admin_only_once(sqlite_url: str, tmp_path: Path) -> None:
    password = await asyncio.to_thread(first_run_admin, sqlite_url)
    assert password is not None
    assert await asyncio.to_thread(first_run_admin, sqlite_url) is None, "the second start creates nobody"
    async with running_api(api_settings(tmp_path, sqlite_url)) as (_app, client):
        await login(client, "admin", password)
