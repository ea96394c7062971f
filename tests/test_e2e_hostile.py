"""Hostile and broken device messages against the running platform (`kernex up`).

A device registered through the API connects with its real fleet certificate and publishes
forged, replayed, cross-device, malformed, oversized and time-shifted heartbeats. Only the
genuine ones reach the database; every rejection is counted by reason.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kernex.broker.pki import FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.protocol import jws
from kernex.protocol.keys import (
    KeyType,
    PrivateKey,
    build_csr,
    device_id_for,
    generate_private_key,
    private_key_to_pem,
)
from kernex.protocol.messages import format_ts, utc_now
from kernex.protocol.topics import Topics
from kernex.storage.database import create_engine
from tests.fixtures.broker import ClientConnectError, close_client, connect_client, publish
from tests.fixtures.platform import Platform, run_platform, wait_for

SETTLE_S = 30


@dataclass(frozen=True)
class PlatformBroker:
    """The broker `kernex up` runs, as the MQTT test helpers want it."""

    host: str
    port: int
    pki: FleetPKI


@dataclass(frozen=True)
class RegisteredDevice:
    device_id: str
    key: PrivateKey
    cert_path: Path
    key_path: Path


async def register(platform: Platform, directory: Path) -> RegisteredDevice:
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{platform.api_url}/api/v1/devices/register", json={"csr": build_csr(key, device_id)}
        )
    assert response.status_code == 201, response.text
    directory.mkdir(parents=True)
    cert_path, key_path = directory / "device.crt", directory / "device.key"
    cert_path.write_text(response.json()["certificate"])
    key_path.write_bytes(private_key_to_pem(key))
    key_path.chmod(0o600)
    return RegisteredDevice(device_id, key, cert_path, key_path)


def heartbeat(device_id: str, seq: int, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "ts": format_ts(utc_now()),
        "status": "ok",
        "metrics": {"cpu_percent": 1.0, "memory_mb": 2.0, "disk_free_mb": 3.0, "uptime_s": 4.0},
        "agent_version": "test",
    }
    claims.update(overrides)
    return claims


def signed(claims: dict[str, Any], key: PrivateKey, kid: str) -> bytes:
    return jws.sign_claims(claims, key, kid=kid, typ=jws.TYP_HEARTBEAT).encode()


async def stored_seqs(database_url: str, device_id: str) -> list[int]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT seq FROM heartbeats WHERE device_id = :id ORDER BY seq"), {"id": device_id}
            )
            return [int(r[0]) for r in rows]
    finally:
        await engine.dispose()


@pytest.fixture
async def platform(pg_url: str, tmp_path: Path):
    async with run_platform(tmp_path, pg_url) as running:
        yield running


async def test_only_genuine_heartbeats_are_stored_and_rejections_are_counted(
    platform: Platform, tmp_path: Path
) -> None:
    alice = await register(platform, tmp_path / "alice")
    bob = await register(platform, tmp_path / "bob")
    pki = FleetPKI.from_settings(BrokerSettings(data_dir=platform.data_dir))
    endpoint = PlatformBroker("127.0.0.1", platform.mqtt_port, pki)
    topics = Topics()
    client = await asyncio.to_thread(
        connect_client, endpoint, alice.cert_path, alice.key_path, alice.device_id
    )
    try:
        topic = topics.heartbeat(alice.device_id)
        genuine = signed(heartbeat(alice.device_id, 1), alice.key, alice.device_id)
        mallory = generate_private_key(KeyType.ECDSA_P256)
        # Nested deeper than any JSON parser's recursion limit (and json.dumps's): built as text.
        deep = json.dumps(heartbeat(alice.device_id, 4)).replace(
            '"status"', '"x": ' + "[" * 20_000 + "]" * 20_000 + ', "status"'
        )
        hostile: dict[str, list[bytes]] = {
            "bad_signature": [signed(heartbeat(alice.device_id, 2), mallory, alice.device_id)],
            "topic_mismatch": [signed(heartbeat(bob.device_id, 3), alice.key, bob.device_id)],
            "malformed": [
                b"not a jws at all",
                b"\xff\xfe\x00garbage",
                jws.sign(deep.encode(), alice.key, kid=alice.device_id, typ=jws.TYP_HEARTBEAT).encode(),
                signed(heartbeat(alice.device_id, 10**30), alice.key, alice.device_id),
                jws.sign(b"{not json", alice.key, kid=alice.device_id, typ=jws.TYP_HEARTBEAT).encode(),
            ],
            "too_large": [
                signed(heartbeat(alice.device_id, 5, padding="x" * 100_000), alice.key, alice.device_id)
            ],
            "clock_skew": [
                signed(
                    heartbeat(alice.device_id, 6, ts=format_ts(utc_now() + timedelta(hours=1))),
                    alice.key,
                    alice.device_id,
                )
            ],
        }
        codes = [await asyncio.to_thread(publish, client, topic, genuine)]
        codes.append(await asyncio.to_thread(publish, client, topic, genuine))  # replayed: stored once
        codes += [
            await asyncio.to_thread(publish, client, topic, payload)
            for payloads in hostile.values()
            for payload in payloads
        ]
        assert not any(code.is_failure for code in codes), codes

        # A device cannot publish on another device's topic at all: the broker refuses it.
        refused = await asyncio.to_thread(
            publish,
            client,
            topics.heartbeat(bob.device_id),
            signed(heartbeat(bob.device_id, 7), alice.key, bob.device_id),
        )
        assert refused.is_failure
        assert "authorized" in str(refused).lower()

        # A last genuine heartbeat: once it is stored, everything before it has been judged.
        await asyncio.to_thread(
            publish, client, topic, signed(heartbeat(alice.device_id, 8), alice.key, alice.device_id)
        )
    finally:
        await asyncio.to_thread(close_client, client)

    async def last_one_stored() -> bool:
        return 8 in await stored_seqs(platform.database_url, alice.device_id)

    await wait_for(last_one_stored, SETTLE_S, "the closing genuine heartbeat", log=platform)
    assert await stored_seqs(platform.database_url, alice.device_id) == [1, 8]
    assert await stored_seqs(platform.database_url, bob.device_id) == []
    for reason, payloads in hostile.items():
        expected = len(payloads)
        counted = await platform.ingest_metric("kernex_ingest_rejected_total", reason=reason)
        assert counted == expected, f"{reason}: counted {counted}, expected {expected}"
    assert await platform.ingest_metric("kernex_ingest_messages_total", outcome="duplicate") == 1

    device = (await platform.get(f"/api/v1/devices/{alice.device_id}")).json()
    assert device["last_seq"] == 8


async def test_certificates_not_from_the_fleet_ca_are_refused(platform: Platform, tmp_path: Path) -> None:
    pki = FleetPKI.from_settings(BrokerSettings(data_dir=platform.data_dir))
    endpoint = PlatformBroker("127.0.0.1", platform.mqtt_port, pki)
    foreign = FleetPKI(tmp_path / "foreign-pki", b"another fleet's passphrase")
    foreign.init()
    cert, key = foreign.issue_client_certificate("impostor", tmp_path / "impostor")
    with pytest.raises(ClientConnectError):
        await asyncio.to_thread(connect_client, endpoint, cert, key, "impostor")
    with pytest.raises(ClientConnectError):
        await asyncio.to_thread(connect_client, endpoint, None, None, "anonymous")
