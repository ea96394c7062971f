"""The ingest worker against a real Mosquitto and real databases: devices publish, rows appear."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.ingest.exceptions import WriteError
from kernex.ingest.metrics import IngestMetrics
from kernex.ingest.verifier import Verified
from kernex.ingest.writer import WriteResult
from kernex.protocol.messages import RejectReason, format_ts, utc_now
from kernex.storage.database import create_engine, session_factory
from kernex.storage.models import AdmissionState, ConnectionState, Device
from tests.fixtures.broker import (
    DeviceIdentity,
    RunningBroker,
    close_client,
    connect_client,
    make_device,
    publish,
)
from tests.fixtures.ingest import (
    ago,
    ingest_settings,
    new_key,
    register_device,
    running_worker,
    sample,
    signed_event,
    signed_heartbeat,
    wait_for,
)

OVERSIZED = 70_000  # above ingest's 64 KiB limit, below the broker's max_packet_size


@pytest.fixture
async def pg_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(pg_url)
    yield engine
    await engine.dispose()


async def connect_device(broker: RunningBroker, identity: DeviceIdentity, **kwargs: Any) -> mqtt.Client:
    # paho's connect blocks until CONNACK: off the loop the worker runs on.
    return await asyncio.to_thread(
        connect_client, broker, identity.cert_path, identity.key_path, identity.device_id, **kwargs
    )


async def send(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    reason = await asyncio.to_thread(publish, client, topic, payload, retain=retain)
    assert not reason.is_failure, str(reason)


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as conn:
        value = (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()
    return int(value)


async def device_row(engine: AsyncEngine, device_id: str) -> Device:
    async with session_factory(engine)() as session:
        found = await session.get(Device, device_id)
        assert found is not None
        return found


async def registered(
    broker: RunningBroker, engine: AsyncEngine, state: AdmissionState = AdmissionState.ACTIVE
):
    identity = make_device(broker.pki)
    await register_device(engine, identity.key, state)
    return identity


async def test_heartbeats_from_a_real_device_are_stored_and_set_latest_state(
    broker: RunningBroker, database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    try:
        identity = await registered(broker, engine)
        device_id = identity.device_id
        metrics = IngestMetrics()
        async with running_worker(ingest_settings(broker, database_url, tmp_path), broker, metrics):
            device = await connect_device(broker, identity)
            try:
                online = json.dumps({"status": "online", "ts": format_ts(ago(seconds=1))}).encode()
                await send(device, broker.topics.status(device_id), online, retain=True)
                for seq in (1, 2, 3):
                    payload = signed_heartbeat(identity.key, device_id, seq, agent_version=f"0.1.{seq}")
                    await send(device, broker.topics.heartbeat(device_id), payload)
                await send(
                    device, broker.topics.events(device_id), signed_event(identity.key, device_id, 1, step=2)
                )
                await wait_for(lambda: _at_least(engine, "heartbeats", 3), "three heartbeats")
                await wait_for(lambda: _at_least(engine, "device_events", 1), "the event")
            finally:
                await asyncio.to_thread(close_client, device)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text("SELECT seq, agent_version, cpu_percent FROM heartbeats ORDER BY seq")
                )
            ).all()
        assert [tuple(r) for r in rows] == [(1, "0.1.1", 12.5), (2, "0.1.2", 12.5), (3, "0.1.3", 12.5)]
        d = await device_row(engine, device_id)
        assert (d.last_seq, d.agent_version, d.health, d.bundle_version) == (3, "0.1.3", "ok", "1.4.2")
        assert d.status is ConnectionState.ONLINE
        assert d.last_seen_at is not None
        assert utc_now() - d.last_seen_at < timedelta(minutes=1)
        assert sample(metrics, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 3
        assert sample(metrics, "kernex_ingest_messages_total", channel="events", outcome="accepted") == 1
        assert sample(metrics, "kernex_ingest_pending_acks") == 0
        assert sample(metrics, "kernex_ingest_batch_size_count") >= 1
    finally:
        await engine.dispose()


async def _at_least(engine: AsyncEngine, table: str, n: int) -> bool:
    return await count(engine, table) >= n


async def test_replayed_heartbeat_is_stored_once_and_counted_duplicate(
    broker: RunningBroker, pg_url: str, pg_engine: AsyncEngine, tmp_path: Path
) -> None:
    identity = await registered(broker, pg_engine)
    metrics = IngestMetrics()
    payload = signed_heartbeat(identity.key, identity.device_id, 42)
    async with running_worker(ingest_settings(broker, pg_url, tmp_path), broker, metrics):
        device = await connect_device(broker, identity)
        try:
            for _ in range(3):
                await send(device, broker.topics.heartbeat(identity.device_id), payload)
            await wait_for(
                lambda: _metric_at_least(metrics, 3, "kernex_ingest_messages_total", channel="heartbeat"),
                "three heartbeats handled",
            )
        finally:
            await asyncio.to_thread(close_client, device)
    assert await count(pg_engine, "heartbeats") == 1
    assert sample(metrics, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 1
    assert sample(metrics, "kernex_ingest_messages_total", channel="heartbeat", outcome="duplicate") == 2


async def _metric_at_least(metrics: IngestMetrics, n: float, name: str, **labels: str) -> bool:
    total = sum(
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
    return total >= n


def _nested_claims(device_id: str) -> bytes:
    return b'{"device_id":"' + device_id.encode() + b'","x":' + b"[" * 5000 + b"]" * 5000 + b"}"


async def test_bad_messages_are_rejected_by_reason_acknowledged_and_never_stored(
    broker: RunningBroker, pg_url: str, pg_engine: AsyncEngine, tmp_path: Path
) -> None:
    good = await registered(broker, pg_engine)
    revoked = await registered(broker, pg_engine, AdmissionState.REVOKED)
    unknown = make_device(broker.pki)  # has a certificate, but no row: e.g. deleted since
    forger = new_key()
    gid = good.device_id
    hb = broker.topics.heartbeat
    from kernex.protocol import jws  # noqa: PLC0415 - only this test signs raw claims

    def raw(claims: bytes) -> bytes:
        return jws.sign(claims, good.key, kid=gid, typ=jws.TYP_HEARTBEAT).encode()

    huge = json.dumps({"device_id": gid, "seq": 1, "ts": format_ts(utc_now())}).replace(
        '"seq": 1', '"seq": ' + "9" * 5000
    )
    expected = {
        RejectReason.BAD_SIGNATURE: [(good, hb(gid), signed_heartbeat(forger, gid, 1))],
        RejectReason.UNKNOWN_DEVICE: [
            (unknown, hb(unknown.device_id), signed_heartbeat(unknown.key, unknown.device_id, 1))
        ],
        RejectReason.REVOKED_DEVICE: [
            (revoked, hb(revoked.device_id), signed_heartbeat(revoked.key, revoked.device_id, 1))
        ],
        RejectReason.MALFORMED: [
            (good, hb(gid), b"{not json"),
            (good, hb(gid), b"\xff\xfe\x00garbage"),
            (good, hb(gid), raw(b"\xff\xfe{}")),
            (good, hb(gid), raw(_nested_claims(gid))),
            (good, hb(gid), raw(huge.encode())),
        ],
        RejectReason.TOO_LARGE: [(good, hb(gid), b"x" * OVERSIZED)],
        RejectReason.CLOCK_SKEW: [
            (good, hb(gid), signed_heartbeat(good.key, gid, 2, ts=utc_now() + timedelta(hours=1)))
        ],
    }
    metrics = IngestMetrics()
    settings = ingest_settings(broker, pg_url, tmp_path)
    async with running_worker(settings, broker, metrics):
        clients = {i.device_id: await connect_device(broker, i) for i in (good, revoked, unknown)}
        try:
            for cases in expected.values():
                for identity, topic, payload in cases:
                    await send(clients[identity.device_id], topic, payload)
            # A valid heartbeat last: once it is stored, everything before it was handled.
            await send(clients[gid], hb(gid), signed_heartbeat(good.key, gid, 3))
            await wait_for(lambda: _at_least(pg_engine, "heartbeats", 1), "the valid heartbeat")
            await wait_for(
                lambda: _metric_at_least(metrics, 10, "kernex_ingest_rejected_total"),
                "ten rejections counted",
            )
        finally:
            for client in clients.values():
                await asyncio.to_thread(close_client, client)
    for reason, cases in expected.items():
        assert sample(metrics, "kernex_ingest_rejected_total", reason=reason.value) == len(cases), reason
    assert sample(metrics, "kernex_ingest_rejected_total", reason=RejectReason.TOPIC_MISMATCH.value) == 0
    assert sample(metrics, "kernex_ingest_messages_total", channel="heartbeat", outcome="rejected") == 10
    async with pg_engine.connect() as conn:
        seqs = (await conn.execute(sa.text("SELECT device_id, seq FROM heartbeats"))).all()
    assert [tuple(r) for r in seqs] == [(gid, 3)]
    assert await count(pg_engine, "heartbeats") == 1

    # Rejected messages were acknowledged: the resumed session redelivers none of them
    # (a redelivery would arrive before this marker heartbeat).
    again = IngestMetrics()
    async with running_worker(settings, broker, again):
        client = await connect_device(broker, good)
        try:
            await send(client, hb(gid), signed_heartbeat(good.key, gid, 4))
            await wait_for(lambda: _at_least(pg_engine, "heartbeats", 2), "the marker heartbeat")
        finally:
            await asyncio.to_thread(close_client, client)
    assert sum(sample(again, "kernex_ingest_rejected_total", reason=r.value) for r in RejectReason) == 0
    assert sample(again, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 1


async def test_a_failed_write_is_retried_and_stored_once(
    broker: RunningBroker,
    pg_url: str,
    pg_engine: AsyncEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    identity = await registered(broker, pg_engine)
    metrics = IngestMetrics()
    async with running_worker(ingest_settings(broker, pg_url, tmp_path), broker, metrics) as worker:
        real_write = worker.writer.write
        calls: list[int] = []

        async def fail_once(records: list[Verified]) -> WriteResult:
            calls.append(len(records))
            if len(calls) == 1:
                raise WriteError("injected: the database went away")
            return await real_write(records)

        monkeypatch.setattr(worker.writer, "write", fail_once)
        device = await connect_device(broker, identity)
        try:
            await send(
                device,
                broker.topics.heartbeat(identity.device_id),
                signed_heartbeat(identity.key, identity.device_id, 1),
            )
            await wait_for(lambda: _at_least(pg_engine, "heartbeats", 1), "the retried heartbeat")
        finally:
            await asyncio.to_thread(close_client, device)
    assert len(calls) == 2, "the same batch is written again after the failure"
    assert await count(pg_engine, "heartbeats") == 1
    assert sample(metrics, "kernex_ingest_db_errors_total") == 1
    assert sample(metrics, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 1
    assert sample(metrics, "kernex_ingest_pending_acks") == 0


async def test_an_uncommitted_message_is_not_acknowledged_and_comes_back_after_restart(
    broker: RunningBroker,
    pg_url: str,
    pg_engine: AsyncEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    identity = await registered(broker, pg_engine)
    settings = ingest_settings(broker, pg_url, tmp_path)
    down = IngestMetrics()
    async with running_worker(settings, broker, down) as worker:

        async def always_fail(records: list[Verified]) -> WriteResult:
            raise WriteError("injected: the database is down")

        monkeypatch.setattr(worker.writer, "write", always_fail)
        device = await connect_device(broker, identity)
        try:
            await send(
                device,
                broker.topics.heartbeat(identity.device_id),
                signed_heartbeat(identity.key, identity.device_id, 7),
            )
            await wait_for(
                lambda: _metric_at_least(down, 1, "kernex_ingest_db_errors_total"), "a failed write"
            )
        finally:
            await asyncio.to_thread(close_client, device)
        # Leaving the block stops the worker with the batch still uncommitted: it is not acked.
    assert await count(pg_engine, "heartbeats") == 0
    assert sample(down, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 0

    # Same client id, clean_start=False: the broker redelivers the unacknowledged message.
    up = IngestMetrics()
    async with running_worker(settings, broker, up):
        await wait_for(lambda: _at_least(pg_engine, "heartbeats", 1), "the redelivered heartbeat")
    assert await count(pg_engine, "heartbeats") == 1
    assert sample(up, "kernex_ingest_messages_total", channel="heartbeat", outcome="accepted") == 1


async def test_messages_published_while_the_worker_is_down_are_delivered_on_restart(
    broker: RunningBroker, pg_url: str, pg_engine: AsyncEngine, tmp_path: Path
) -> None:
    identity = await registered(broker, pg_engine)
    settings = ingest_settings(broker, pg_url, tmp_path)
    async with running_worker(settings, broker):
        pass  # creates the persistent session and its subscriptions, then leaves
    device = await connect_device(broker, identity)
    try:
        for seq in range(1, 6):
            await send(
                device,
                broker.topics.heartbeat(identity.device_id),
                signed_heartbeat(identity.key, identity.device_id, seq),
            )
    finally:
        await asyncio.to_thread(close_client, device)
    async with running_worker(settings, broker):
        await wait_for(lambda: _at_least(pg_engine, "heartbeats", 5), "the five queued heartbeats")
    d = await device_row(pg_engine, identity.device_id)
    assert d.last_seq == 5


async def test_retained_status_and_last_will_drive_online_offline(
    broker: RunningBroker, pg_url: str, pg_engine: AsyncEngine, tmp_path: Path
) -> None:
    identity = await registered(broker, pg_engine)
    status_topic = broker.topics.status(identity.device_id)
    # Like the agent's: the Will's ts is fixed when it connects, before everything it sends.
    will_payload = json.dumps({"status": "offline", "ts": format_ts(ago(seconds=3))}).encode()
    will = (status_topic, will_payload, True)
    device = await connect_device(broker, identity, will=will)
    # Published before any worker exists: only the retained copy can tell ingest.
    online = json.dumps({"status": "online", "ts": format_ts(ago(seconds=2))}).encode()
    await send(device, status_topic, online, retain=True)
    async with running_worker(ingest_settings(broker, pg_url, tmp_path), broker):

        async def status_is(value: ConnectionState) -> bool:
            return (await device_row(pg_engine, identity.device_id)).status is value

        await wait_for(lambda: status_is(ConnectionState.ONLINE), "online from the retained status")
        await send(
            device,
            broker.topics.heartbeat(identity.device_id),
            signed_heartbeat(identity.key, identity.device_id, 1),
        )
        await wait_for(lambda: _at_least(pg_engine, "heartbeats", 1), "a heartbeat of this connection")
        # The device drops off asking for its Will: the broker publishes "offline".
        await asyncio.to_thread(
            device.disconnect, reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        await wait_for(lambda: status_is(ConnectionState.OFFLINE), "offline from the Last Will")
    await asyncio.to_thread(close_client, device)
    async with pg_engine.connect() as conn:
        changes = (
            (await conn.execute(sa.text("SELECT status FROM device_status_changes ORDER BY at")))
            .scalars()
            .all()
        )
    assert list(changes) == ["online", "offline"]


async def test_run_ingest_serves_metrics_and_flushes_when_cancelled(
    broker: RunningBroker, pg_url: str, pg_engine: AsyncEngine
) -> None:
    import httpx  # noqa: PLC0415 - only this test reads the metrics endpoint

    from kernex.ingest.worker import run_ingest  # noqa: PLC0415 - the entry point under test
    from tests.fixtures.broker import TEST_PKI_PASSPHRASE, free_port  # noqa: PLC0415

    identity = await registered(broker, pg_engine)
    port = free_port()
    settings = ingest_settings(
        broker,
        pg_url,
        broker.pki.directory.parent,  # run_ingest finds the PKI at data_dir/pki, as in production
        pki_passphrase=TEST_PKI_PASSPHRASE.decode(),
        metrics_port=port,
    )
    task = asyncio.create_task(run_ingest(settings))

    async def scrape(line: str) -> str:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        except httpx.TransportError:
            return ""  # not listening yet
        return text if line in text else ""

    # Subscribed before the device publishes: a brand-new session has nothing to queue into.
    await wait_for(lambda: scrape("kernex_ingest_broker_connected 1.0"), "the worker subscribed")
    device = await connect_device(broker, identity)
    try:
        await send(
            device,
            broker.topics.heartbeat(identity.device_id),
            signed_heartbeat(identity.key, identity.device_id, 1),
        )
        await wait_for(lambda: _at_least(pg_engine, "heartbeats", 1), "the heartbeat")
        accepted = 'kernex_ingest_messages_total{channel="heartbeat",outcome="accepted"} 1.0'
        text = await wait_for(lambda: scrape(accepted), "the accepted heartbeat in /metrics")
        assert "kernex_ingest_rejected_total" in text
    finally:
        await asyncio.to_thread(close_client, device)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
