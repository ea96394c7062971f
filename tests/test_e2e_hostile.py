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
from kernex.protocol.topics import CommandKind, Topics
from kernex.storage.database import create_engine
from tests.fixtures.broker import (
    ClientConnectError,
    close_client,
    connect_client,
    publish,
    wait_disconnected,
)
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


def event(device_id: str, seq: int, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "ts": format_ts(utc_now()),
        "type": "note",
        "data": {"text": "genuine"},
    }
    claims.update(overrides)
    return claims


def signed_event(claims: dict[str, Any], key: PrivateKey, kid: str) -> bytes:
    return jws.sign_claims(claims, key, kid=kid, typ=jws.TYP_EVENT).encode()


async def stored_event_seqs(database_url: str, device_id: str) -> list[int]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT seq FROM device_events WHERE device_id = :id ORDER BY seq"), {"id": device_id}
            )
            return [int(r[0]) for r in rows]
    finally:
        await engine.dispose()


TEN_MB = 10 * 1024 * 1024  # far over the broker's max_packet_size (256 KiB)
OVER_INGEST_LIMIT = 200 * 1024  # over ingest's 64 KiB, under the broker's limit: ingest's refusal


async def test_hostile_payloads_on_every_device_topic_are_refused_and_counted_by_reason(
    platform: Platform, tmp_path: Path
) -> None:
    alice = await register(platform, tmp_path / "alice")
    bob = await register(platform, tmp_path / "bob")
    mallory = generate_private_key(KeyType.ECDSA_P256)
    pki = FleetPKI.from_settings(BrokerSettings(data_dir=platform.data_dir))
    endpoint = PlatformBroker("127.0.0.1", platform.mqtt_port, pki)
    topics = Topics()
    aid = alice.device_id
    garbage = [
        b"\x00\x01\x02 garbage",
        b"\xff\xfe\xfd not UTF-8",
        b"[" * 60_000,  # deeper than any parser recurses, within the size limit
        b'{"status": "online", "ts": 1e999999, "seq": ' + b"9" * 10_000 + b"}",  # huge numbers
    ]
    deep_claims = json.dumps(event(aid, 90)).replace(
        '"data": {', '"data": {"x": ' + "[" * 20_000 + "]" * 20_000 + ", "
    )
    # (topic, payload, expected reason) on every device topic.
    cases: list[tuple[str, bytes, str]] = []
    for topic in (topics.heartbeat(aid), topics.events(aid), topics.status(aid)):
        cases += [(topic, payload, "malformed") for payload in garbage]
        cases.append((topic, b"x" * OVER_INGEST_LIMIT, "too_large"))
    cases += [
        # Forged: the right kid, another key.
        (topics.events(aid), signed_event(event(aid, 2), mallory, aid), "bad_signature"),
        # Cross-device: alice's own topic and key, claims naming bob.
        (
            topics.events(aid),
            signed_event(event(bob.device_id, 3), alice.key, bob.device_id),
            "topic_mismatch",
        ),
        (topics.events(aid), signed_event(event(bob.device_id, 4), alice.key, aid), "topic_mismatch"),
        # Signed for real, hostile inside.
        (
            topics.events(aid),
            jws.sign(deep_claims.encode(), alice.key, kid=aid, typ=jws.TYP_EVENT).encode(),
            "malformed",
        ),
        (topics.events(aid), signed_event(event(aid, 10**30), alice.key, aid), "malformed"),
        (topics.events(aid), signed_event(event(aid, 5, data={"n": "\x00"}), alice.key, aid), "malformed"),
        # A heartbeat replayed onto the events topic.
        (topics.events(aid), signed(heartbeat(aid, 6), alice.key, aid), "malformed"),
        (topics.status(aid), json.dumps({"status": "online", "ts": "9999-99-99"}).encode(), "malformed"),
        (topics.status(aid), json.dumps({"status": "hacked"}).encode(), "malformed"),
    ]
    genuine_event = signed_event(event(aid, 1), alice.key, aid)
    client = await asyncio.to_thread(connect_client, endpoint, alice.cert_path, alice.key_path, aid)
    try:
        for topic, payload, _reason in cases:
            code = await asyncio.to_thread(publish, client, topic, payload)
            assert not code.is_failure, (topic, payload[:40], code)
        for _ in range(2):  # replayed: stored once
            assert not (
                await asyncio.to_thread(publish, client, topics.events(aid), genuine_event)
            ).is_failure

        # Commands come only from the platform: no device may publish one, for another device or itself.
        for target in (bob.device_id, aid):
            for kind in CommandKind:
                refused = await asyncio.to_thread(
                    publish, client, topics.command(target, kind), signed(heartbeat(aid, 7), alice.key, aid)
                )
                assert refused.is_failure, (target, kind)
                assert "authorized" in str(refused).lower()

        # 10 MB: the broker drops the connection (max_packet_size); nothing reaches ingest.
        big = await asyncio.to_thread(connect_client, endpoint, alice.cert_path, alice.key_path, f"{aid}-big")
        try:
            info = big.publish(topics.heartbeat(aid), b"x" * TEN_MB, qos=1)
            if info.rc == 0:  # paho sent it: the broker must cut the connection
                reasons = await asyncio.to_thread(wait_disconnected, big, 30)
                assert reasons, "the broker kept a client that sent a 10 MB packet"
        finally:
            await asyncio.to_thread(close_client, big)

        # The genuine traffic of the same connection still flows.
        closing = signed(heartbeat(aid, 8), alice.key, aid)
        assert not (await asyncio.to_thread(publish, client, topics.heartbeat(aid), closing)).is_failure
    finally:
        await asyncio.to_thread(close_client, client)

    expected: dict[str, int] = {}
    for _topic, _payload, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    per_channel = {
        channel: sum(topic.endswith(f"/{channel}") for topic, _p, _r in cases)
        for channel in ("heartbeat", "events", "status")
    }

    counted: dict[str, float] = {}

    async def all_counted() -> bool:
        for reason in expected:
            counted[reason] = await platform.ingest_metric("kernex_ingest_rejected_total", reason=reason)
        return counted == expected and 8 in await stored_seqs(platform.database_url, aid)

    try:
        await wait_for(all_counted, SETTLE_S, f"rejections counted by reason: {expected}")
    except AssertionError as exc:
        raise AssertionError(f"counted {counted}, expected {expected}") from exc
    for channel, n in per_channel.items():
        counted = await platform.ingest_metric(
            "kernex_ingest_messages_total", channel=channel, outcome="rejected"
        )
        assert counted == n, (channel, counted, n)
    assert await stored_seqs(platform.database_url, aid) == [8]
    assert await stored_event_seqs(platform.database_url, aid) == [1]
    assert await stored_seqs(platform.database_url, bob.device_id) == []
    assert await stored_event_seqs(platform.database_url, bob.device_id) == []
    assert (
        await platform.ingest_metric("kernex_ingest_messages_total", channel="events", outcome="duplicate")
        == 1
    )
    # The platform survived all of it.
    assert platform.proc.poll() is None
    assert (await platform.get("/readyz")).status_code == 200
