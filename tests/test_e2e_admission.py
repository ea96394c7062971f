"""Admission end to end: `kernex up` under the manual and token policies with real agents.

Pending agents poll (same key, backoff) and connect once accepted; a rejected agent stops with
exit 1 and a clear log line and never reaches the broker; an enrollment token admits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for

SETTLE_S = 60  # registration + backoff polls + TLS + first heartbeats, on a loaded 2-core machine


def _agent(platform: Platform, state_dir: Path, **env: str) -> subprocess.Popen[bytes]:
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
    log = (state_dir.parent / f"{state_dir.name}.log").open("ab")
    try:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KERNEX_AGENT_CONFIG": "", **env},
        )
    finally:
        log.close()


async def _post(platform: Platform, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            platform.api_url + path, json=body, headers={"Authorization": f"Bearer {platform.token}"}
        )


async def _devices(platform: Platform, **params: str | int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await platform.get("/api/v1/devices", **params)).json()["items"]
    return items


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    return await asyncio.to_thread(proc.wait, 30)


async def test_manual_pending_accepted_connects_and_rejected_never_connects(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with run_platform(tmp_path, sqlite_url, env={"KERNEX_ADMISSION_POLICY": "manual"}) as platform:
        good = _agent(platform, tmp_path / "good", KERNEX_AGENT_NAME="good")
        bad = _agent(platform, tmp_path / "bad", KERNEX_AGENT_NAME="bad")
        try:

            async def two_pending() -> list[dict[str, Any]] | None:
                items = await _devices(platform, state="pending")
                return items if len(items) == 2 else None

            pending = await wait_for(two_pending, SETTLE_S, "two pending devices", log=platform)
            by_name = {d["name"]: d["id"] for d in pending}
            # Pending devices have no certificate, so they cannot have connected.
            await asyncio.sleep(2)
            assert all(d["status"] == "unknown" for d in await _devices(platform))

            rejected = await _post(platform, f"/api/v1/devices/{by_name['bad']}/reject")
            assert rejected.status_code == 200, rejected.text
            accepted = await _post(platform, f"/api/v1/devices/{by_name['good']}/accept")
            assert accepted.status_code == 200, accepted.text

            async def good_online() -> bool:
                device = (await platform.get(f"/api/v1/devices/{by_name['good']}")).json()
                return bool(device["status"] == "online" and (device["last_seq"] or 0) >= 1)

            await wait_for(good_online, SETTLE_S, "the accepted agent online with heartbeats", log=platform)
            assert await asyncio.to_thread(bad.wait, SETTLE_S) == 1
            bad_log = (tmp_path / "bad.log").read_text()
            assert "registration refused by the control plane" in bad_log
            assert "rejected" in bad_log
            bad_device = (await platform.get(f"/api/v1/devices/{by_name['bad']}")).json()
            assert bad_device["state"] == "rejected"
            assert bad_device["status"] == "unknown"
            assert bad_device["last_seq"] is None
        finally:
            assert await _stop(good) == 0
            await _stop(bad)


async def test_enrollment_token_admits_at_once_with_tags(sqlite_url: str, tmp_path: Path) -> None:
    async with run_platform(tmp_path, sqlite_url, env={"KERNEX_ADMISSION_POLICY": "token"}) as platform:
        created = await _post(
            platform, "/api/v1/enrollment-tokens", {"name": "site a", "tags": ["site-a"], "max_uses": 1}
        )
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        first = _agent(platform, tmp_path / "first", KERNEX_AGENT_ENROLLMENT_TOKEN=token)
        second = _agent(platform, tmp_path / "second", KERNEX_AGENT_ENROLLMENT_TOKEN=token)
        try:

            async def one_online_one_pending() -> list[dict[str, Any]] | None:
                items = await _devices(platform)
                online = [d for d in items if d["status"] == "online" and (d["last_seq"] or 0) >= 1]
                pending = [d for d in items if d["state"] == "pending"]
                return items if len(online) == 1 and len(pending) == 1 else None

            items = await wait_for(
                one_online_one_pending, SETTLE_S, "one admitted by the token, one pending", log=platform
            )
            [admitted] = [d for d in items if d["state"] == "active"]
            assert admitted["tags"] == ["site-a"]
        finally:
            assert await _stop(first) == 0
            assert await _stop(second) == 0
