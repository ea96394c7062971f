"""Operations end to end on `kernex up` with a real agent: `kernex agent check` and `status` against
the running platform (and a broker CA the device does not trust), and `kernex backup` / `kernex
restore` onto a fresh data dir and database, after which the same agent reconnects and heartbeats
without registering again. On PostgreSQL and on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kernex.broker.pki import FleetPKI
from tests.fixtures.broker import TEST_PKI_PASSPHRASE
from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for

SETTLE_S = 60  # registration + TLS + first heartbeats + a batch, on a loaded 2-core machine
PASSPHRASE = "e2e-backup-passphrase-0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNEX_AGENT_", "KERNEX_"))}
    return {**env, "KERNEX_AGENT_CONFIG": "", "KERNEX_AGENT_LOG_FORMAT": "json", **extra}


@asynccontextmanager
async def running_agent(platform: Platform, state_dir: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`kernex agent run` against the platform, stopped with SIGINT (a clean "offline") at the end."""
    cmd = [
        KERNEX,
        "agent",
        "run",
        "--api",
        platform.api_url,
        "--state-dir",
        str(state_dir),
        "--interval",
        "1",
    ]
    with (state_dir.parent / f"{state_dir.name}.log").open("ab") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(proc.wait, 30)


async def _online_device(platform: Platform, *, after_seq: int = 0) -> dict[str, Any]:
    async def online() -> dict[str, Any] | None:
        items = (await platform.get("/api/v1/devices")).json()["items"]
        ready = len(items) == 1 and items[0]["status"] == "online" and (items[0]["last_seq"] or 0) > after_seq
        return dict(items[0]) if ready else None

    return await wait_for(online, SETTLE_S, f"the agent online with seq > {after_seq}", log=platform)


async def _kernex(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KERNEX, *args, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_and_status_against_a_running_platform(pg_url: str, tmp_path: Path) -> None:
    async with run_platform(tmp_path, pg_url) as platform:
        state_dir = tmp_path / "agent"
        async with running_agent(platform, state_dir):
            device = await _online_device(platform, after_seq=1)

            code, out, err = await _kernex(
                "agent", "check", "--json", "--api", platform.api_url, "--state-dir", str(state_dir)
            )
            assert code == 0, out + err
            checks = {c["name"]: c for c in json.loads(out)["checks"]}
            for name in (
                "api dns",
                "api",
                "clock",
                "registration",
                "protocol",
                "certificate",
                "broker tls",
                "broker",
            ):
                assert checks[name]["verdict"] == "ok", checks[name]
            assert checks["broker"]["message"].endswith(f"accepted as {device['id']}")

            async def live() -> dict[str, Any] | None:
                code, out, _ = await _kernex("agent", "status", "--json", "--state-dir", str(state_dir))
                report = json.loads(out)
                ready = code == 0 and report["live"]["connected"] and (report["live"]["last_seq"] or 0) >= 2
                return report if ready else None

            report = await wait_for(live, SETTLE_S, "status showing the running agent", log=platform)
            assert report["device_id"] == device["id"]
            assert report["admission"] == "active"
            assert report["live"]["running"] is True
            assert report["live"]["buffered"] == 0
            assert report["certificate"]["expired"] is False
            assert report["broker"] == f"127.0.0.1:{platform.mqtt_port}"

            # The same device with a CA of another fleet: its broker is no longer trusted.
            impostor = tmp_path / "impostor"
            shutil.copytree(state_dir, impostor, ignore=shutil.ignore_patterns("status.json", "bundles"))
            foreign = FleetPKI(tmp_path / "foreign-pki", TEST_PKI_PASSPHRASE)
            await asyncio.to_thread(foreign.init)
            shutil.copyfile(foreign.ca_cert_path, impostor / "ca.crt")
            code, out, _ = await _kernex(
                "agent", "check", "--json", "--api", platform.api_url, "--state-dir", str(impostor)
            )
            assert code == 1
            checks = {c["name"]: c for c in json.loads(out)["checks"]}
            assert checks["certificate"]["message"] == "device.crt was not issued by the fleet CA in ca.crt"
            assert "is not trusted by this device's fleet CA (ca.crt)" in checks["broker tls"]["message"]
            assert "broker" not in checks, "no MQTT attempt after the TLS check failed"

        code, out, _ = await _kernex("agent", "status", "--state-dir", str(state_dir))
        assert code == 0
        assert "agent:              not running (stopped at " in out
        assert "broker connection:  unknown (agent not running)" in out


async def _empty_postgres_database(admin_url: str) -> str:
    name = f"kernex_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return admin_url.replace("postgresql://", "postgresql+asyncpg://", 1).rsplit("/", 1)[0] + f"/{name}"


async def _drop_postgres_database(admin_url: str, url: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.timeout(420)
async def test_backup_and_restore_bring_the_fleet_back_without_re_registering(
    database_url: str, postgres_admin_url: str, tmp_path: Path
) -> None:
    on_postgres = database_url.startswith("postgresql")
    # PostgreSQL: a production-like passphrase in the environment, kept out of the archive.
    # SQLite: the development passphrase generated in the data dir, carried by --include-secrets.
    secrets_env = {"KERNEX_PKI_PASSPHRASE": PASSPHRASE} if on_postgres else {}
    backup_flags = [] if on_postgres else ["--include-secrets"]
    archive = tmp_path / "fleet-backup.tar.gz"
    state_dir = tmp_path / "agent"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()

    async with run_platform(first_dir, database_url, env=secrets_env) as first:
        async with running_agent(first, state_dir):
            device = await _online_device(first, after_seq=1)
            # A hot backup, while ingest writes heartbeats.
            env = _env(KERNEX_DATA_DIR=str(first.data_dir), KERNEX_DATABASE_URL=database_url, **secrets_env)
            code, out, err = await _kernex("backup", "--output", str(archive), *backup_flags, env=env)
            assert code == 0, err
            assert f"backup written to {archive}" in out
            if on_postgres:
                assert "not included: the PKI passphrase and JWT secret" in err
            else:
                assert "WARNING: this archive holds the PKI passphrase" in err
        seq_before = (await first.get(f"/api/v1/devices/{device['id']}")).json()["last_seq"]
    assert first.proc.returncode == 0, first.log()[-3000:]
    assert archive.stat().st_mode & 0o777 == 0o600
    certificate = (state_dir / "device.crt").read_bytes()

    restored_dir = second_dir / "kernex-data"
    restored_url = (
        await _empty_postgres_database(postgres_admin_url)
        if on_postgres
        else f"sqlite+aiosqlite:///{restored_dir / 'kernex.db'}"
    )
    try:
        env = _env(KERNEX_DATA_DIR=str(restored_dir), KERNEX_DATABASE_URL=restored_url, **secrets_env)
        code, out, err = await _kernex("restore", str(archive), env=env)
        assert code == 0, err
        assert "migrated to the latest schema" in out
        again = await _kernex("restore", str(archive), env=env)
        assert again[0] == 1
        assert "is not empty: restore into a fresh one, or pass --force" in again[2]

        async with run_platform(
            second_dir,
            restored_url,
            env=secrets_env,
            data_dir=restored_dir,
            api_port=int(first.api_url.rsplit(":", 1)[1]),
            mqtt_port=first.mqtt_port,
            create_admin=False,  # the admin came back with the database
        ) as second:
            restored = (await second.get(f"/api/v1/devices/{device['id']}")).json()
            assert restored["registered_at"] == device["registered_at"]
            async with running_agent(second, state_dir) as agent:
                back = await _online_device(second, after_seq=seq_before)
                assert agent.poll() is None
            assert back["id"] == device["id"]
            assert back["registered_at"] == device["registered_at"], "the device did not register again"
            assert (await second.get("/api/v1/devices")).json()["total"] == 1
            assert (state_dir / "device.crt").read_bytes() == certificate, "its certificate is still trusted"
            log = (tmp_path / "agent.log").read_text()
            assert log.count('"event": "registered"') <= 1, "registered once, before the backup"
        assert second.proc.returncode == 0, second.log()[-3000:]
    finally:
        if on_postgres:
            await _drop_postgres_database(postgres_admin_url, restored_url)
