"""End to end, the way a user runs it: `kernex up` (Mosquitto, ingest, API) plus real agents.

Agents register over HTTP, connect over mutual TLS, publish signed heartbeats; ingest verifies
and stores them; the API shows the devices online. On PostgreSQL and on embedded SQLite.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kernex.storage.database import create_engine
from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for

SETTLE_S = 60  # registration + TLS + first heartbeats + a batch, on a loaded 2-core machine


async def scalar(database_url: str, sql: str, **params: object) -> object:
    """One value straight from the database, bypassing the API."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(sql), params)).scalar_one()
    finally:
        await engine.dispose()


@pytest.fixture
async def platform_with_devices(database_url: str, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_platform(tmp_path, database_url, devices=3, interval=1) as platform:
        yield platform
    assert platform.proc.returncode == 0, platform.log()[-3000:]


async def test_quick_start_devices_appear_online_with_stored_heartbeats(
    platform_with_devices: Platform,
) -> None:
    platform = platform_with_devices

    async def all_online() -> list[dict[str, object]] | None:
        page = (await platform.get("/api/v1/devices", status="online")).json()
        items = page["items"]
        ready = len(items) == 3 and all((d["last_seq"] or 0) >= 2 for d in items)
        return items if ready else None

    devices = await wait_for(all_online, SETTLE_S, "3 simulated devices online with heartbeats", log=platform)
    for device in devices:
        stored = await scalar(
            platform.database_url, "SELECT count(*) FROM heartbeats WHERE device_id = :id", id=device["id"]
        )
        assert isinstance(stored, int)
        assert stored >= 2
        assert device["metrics"]["memory_mb"] > 0
        assert device["agent_version"]

    stats = (await platform.get("/api/v1/devices/stats")).json()
    assert stats["total"] == 3
    assert stats["online"] == 3

    first = devices[0]["id"]
    history = (await platform.get(f"/api/v1/devices/{first}/heartbeats", limit=5)).json()["items"]
    seqs = [h["seq"] for h in history]
    assert seqs == sorted(seqs, reverse=True)
    assert len(seqs) >= 2

    assert await platform.ingest_metric("kernex_ingest_messages_total", outcome="accepted") >= 6
    assert (await platform.get("/readyz")).json()["checks"] == {"database": "ok", "broker": "ok"}


async def _agent(platform: Platform, state_dir: Path, key_type: str) -> subprocess.Popen[bytes]:
    cmd = [KERNEX, "agent", "run", "--api", platform.api_url, "--state-dir", str(state_dir)]
    cmd += ["--key-type", key_type, "--interval", "1"]
    log = (state_dir.parent / f"{state_dir.name}.log").open("ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


async def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    proc.send_signal(sig)
    return await asyncio.to_thread(proc.wait, 30)


@pytest.mark.parametrize("key_type", ["ed25519", "rsa-4096"])
async def test_agent_restart_keeps_identity_and_seq_and_last_will_marks_offline(
    pg_url: str, tmp_path: Path, key_type: str
) -> None:
    async with run_platform(tmp_path, pg_url) as platform:
        state_dir = tmp_path / "agent"
        agent = await _agent(platform, state_dir, key_type)

        async def one_online_device() -> dict[str, object] | None:
            items = (await platform.get("/api/v1/devices")).json()["items"]
            if len(items) == 1 and items[0]["status"] == "online" and (items[0]["last_seq"] or 0) >= 1:
                return dict(items[0])
            return None

        try:
            device = await wait_for(one_online_device, SETTLE_S, "the agent online", log=platform)
        finally:
            # A clean stop says "offline" itself before disconnecting.
            assert await _stop(agent, signal.SIGINT) == 0
        device_id = device["id"]
        assert device["key_type"] == key_type

        async def status_is(want: str) -> bool:
            return (await platform.get(f"/api/v1/devices/{device_id}")).json()["status"] == want

        await wait_for(lambda: status_is("offline"), SETTLE_S, "offline after a clean stop", log=platform)
        seq_before = (await platform.get(f"/api/v1/devices/{device_id}")).json()["last_seq"]

        agent = await _agent(platform, state_dir, key_type)

        async def beats_again() -> bool:
            current = (await platform.get(f"/api/v1/devices/{device_id}")).json()
            return current["status"] == "online" and current["last_seq"] > seq_before

        await wait_for(beats_again, SETTLE_S, "the restarted agent's heartbeats", log=platform)
        assert (await platform.get("/api/v1/devices")).json()["total"] == 1, "same key, same device"

        # An unclean death: the broker publishes the agent's Last Will.
        agent.kill()
        await asyncio.to_thread(agent.wait, 30)
        await wait_for(lambda: status_is("offline"), 90, "offline from the Last Will", log=platform)
        stored = await scalar(
            pg_url, "SELECT count(DISTINCT seq) FROM heartbeats WHERE device_id = :id", id=device_id
        )
        total = await scalar(pg_url, "SELECT count(*) FROM heartbeats WHERE device_id = :id", id=device_id)
        assert stored == total
