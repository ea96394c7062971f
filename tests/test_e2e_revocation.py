"""Revocation end to end: `kernex up`, a real agent, POST /api/v1/devices/{id}/revoke.

Within seconds the agent's session is cut, its reconnects fail the TLS handshake against the
reloaded CRL, its publishes never reach the database, its retained commands are cleared, and
re-registering the same key gets no certificate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from cryptography import x509

from kernex.agent.identity import load_or_create
from kernex.protocol import devicetoken
from kernex.protocol.keys import KeyType, build_csr
from kernex.storage.database import create_engine
from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for

SETTLE_S = 60  # registration + TLS + first heartbeats, on a loaded 2-core machine
CUT_WITHIN_S = 5  # "cut off within seconds"
QUIET_S = 6  # several heartbeat intervals (1 s) with nothing stored


async def _scalar(database_url: str, sql: str, **params: object) -> Any:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(sql), params)).scalar_one()
    finally:
        await engine.dispose()


async def _request(platform: Platform, method: str, path: str, body: object = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.request(
            method, platform.api_url + path, json=body, headers={"Authorization": f"Bearer {platform.token}"}
        )


async def test_revoked_device_is_cut_off(sqlite_url: str, tmp_path: Path) -> None:
    async with run_platform(tmp_path, sqlite_url) as platform:
        state_dir = tmp_path / "agent"
        log_path = tmp_path / "agent.log"
        with log_path.open("ab") as log:
            agent = subprocess.Popen(
                [
                    KERNEX,
                    "agent",
                    "run",
                    "--api",
                    platform.api_url,
                    "--state-dir",
                    str(state_dir),
                    "--interval",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KERNEX_AGENT_CONFIG": ""},
            )
        try:

            async def online() -> dict[str, Any] | None:
                items = (await platform.get("/api/v1/devices")).json()["items"]
                if items and items[0]["status"] == "online" and (items[0]["last_seq"] or 0) >= 2:
                    return dict(items[0])
                return None

            device = await wait_for(online, SETTLE_S, "the agent online", log=platform)
            device_id = device["id"]
            # A retained config command for it, which revocation must clear.
            configured = await _request(
                platform, "PUT", f"/api/v1/devices/{device_id}/config", {"heartbeat_interval_s": 1}
            )
            assert configured.status_code == 200, configured.text

            revoked = await _request(platform, "POST", f"/api/v1/devices/{device_id}/revoke")
            assert revoked.status_code == 200, revoked.text
            result = revoked.json()
            assert result["device"]["state"] == "revoked"
            assert result["session_cut"] is True, result
            assert result["broker_reloaded"] is True, result
            assert result["errors"] == []
            assert result["cleared_commands"] >= 1
            crl = x509.load_pem_x509_crl((platform.data_dir / "pki" / "crl.pem").read_bytes())
            assert int(result["crl_serial"], 16) in {r.serial_number for r in crl}

            await asyncio.sleep(CUT_WITHIN_S)
            stored = await _scalar(
                sqlite_url, "SELECT count(*) FROM heartbeats WHERE device_id = :id", id=device_id
            )
            await asyncio.sleep(QUIET_S)
            assert (
                await _scalar(
                    sqlite_url, "SELECT count(*) FROM heartbeats WHERE device_id = :id", id=device_id
                )
                == stored
            ), "heartbeats of the revoked device reached the database"
            cleared = await _scalar(
                sqlite_url,
                "SELECT count(*) FROM device_commands"
                " WHERE device_id = :id AND state NOT IN ('cleared', 'superseded')",
                id=device_id,
            )
            assert cleared == 0
            # Its reconnects fail: the broker log shows the refused handshakes.
            broker_log = (platform.data_dir / "broker" / "mosquitto.log").read_text(errors="replace")
            assert "revoked" in broker_log.lower() or "certificate verify failed" in broker_log.lower()

            # The same key gets no certificate again, and its device token is refused.
            identity = await asyncio.to_thread(load_or_create, state_dir, KeyType.ECDSA_P256)
            async with httpx.AsyncClient(timeout=10) as client:
                again = await client.post(
                    platform.api_url + "/api/v1/devices/register",
                    json={"csr": build_csr(identity.key, identity.device_id)},
                )
                assert again.json()["status"] == "revoked"
                assert again.json()["certificate"] is None
                refused = await client.get(
                    platform.api_url + "/api/v1/bundles/any/download",
                    headers={
                        "Authorization": f"Bearer {devicetoken.issue(identity.key, identity.device_id)}"
                    },
                )
                assert refused.status_code == 403, refused.text
            audit = (await platform.get("/api/v1/audit", limit=50)).json()["items"]
            assert any(e["action"] == "device.revoke" and e["outcome"] == "success" for e in audit)
            twice = await _request(platform, "POST", f"/api/v1/devices/{device_id}/revoke")
            assert twice.status_code == 409
        finally:
            agent.send_signal(signal.SIGINT)
            await asyncio.to_thread(agent.wait, 30)
