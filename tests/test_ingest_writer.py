"""The batch writer and the key cache on PostgreSQL (COPY) and SQLite, without a broker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.ingest.keys import KeyCache
from kernex.ingest.verifier import RawMessage, Verified, Verifier, VerifyLimits
from kernex.ingest.writer import BatchWriter
from kernex.protocol.keys import KeyType, PrivateKey, generate_private_key, public_key_to_pem
from kernex.protocol.messages import format_ts
from kernex.protocol.topics import Topics
from kernex.storage.database import create_engine, session_factory
from kernex.storage.models import AdmissionState, ConnectionState, Device
from tests.fixtures.ingest import new_key, register_device, signed_event, signed_heartbeat

TOPICS = Topics("kernex/v1")
LIMITS = VerifyLimits(65_536, timedelta(seconds=300), timedelta(days=1))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


async def verified(
    engine: AsyncEngine, *messages: tuple[str, bytes], received_at: datetime | None = None
) -> list[Verified]:
    """Run messages through the real verifier with keys from the database."""
    at = received_at or datetime.now(UTC)
    verifier = Verifier(TOPICS, LIMITS)
    keys = await KeyCache(engine, ttl_s=30).get_many(
        d for t, _ in messages if (d := verifier.device_id_of(t))
    )
    out = []
    for topic, payload in messages:
        verdict = verifier.verify(RawMessage(topic, payload, at), keys.get)
        assert not hasattr(verdict, "reason"), verdict
        out.append(verdict)
    return out


async def device(engine: AsyncEngine, device_id: str) -> Device:
    async with session_factory(engine)() as session:
        found = await session.get(Device, device_id)
        assert found is not None
        return found


async def scalar(engine: AsyncEngine, sql: str, **params: object) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(sa.text(sql), params)).scalar_one()


async def setup_device(engine: AsyncEngine) -> tuple[PrivateKey, str]:
    key = new_key()
    return key, await register_device(engine, key)


async def test_heartbeats_are_stored_with_their_columns_and_set_latest_state(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    ts = datetime.now(UTC) - timedelta(seconds=2)
    records = await verified(
        engine, (TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 5, ts=ts))
    )
    result = await BatchWriter(engine).write(records)
    assert (result.heartbeats.stored, result.heartbeats.duplicate, result.status_changes) == (1, 0, 1)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.text("SELECT * FROM heartbeats"))).mappings().one()
    assert row["device_id"] == device_id
    assert row["seq"] == 5
    assert row["status"] == "ok"
    assert (row["cpu_percent"], row["memory_mb"], row["disk_free_mb"], row["uptime_s"]) == (
        12.5,
        512,
        2048,
        3605,
    )
    assert (row["bundle_id"], row["bundle_version"], row["config_version"], row["agent_version"]) == (
        "bundle-1",
        "1.4.2",
        3,
        "0.1.0",
    )
    d = await device(engine, device_id)
    assert d.last_seq == 5
    assert d.health == "ok"
    assert d.bundle_version == "1.4.2"
    assert d.last_heartbeat_at is not None
    assert abs(d.last_heartbeat_at - ts) < timedelta(milliseconds=1)
    assert d.status is ConnectionState.ONLINE
    assert d.last_seen_at == records[0].received_at
    assert await scalar(engine, "SELECT count(*) FROM device_status_changes WHERE status = 'online'") == 1


async def test_redelivered_heartbeat_is_stored_once_and_counted_duplicate(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    payload = signed_heartbeat(key, device_id, 1)
    writer = BatchWriter(engine)
    first = await writer.write(await verified(engine, (TOPICS.heartbeat(device_id), payload)))
    # Again in a later batch, and twice within one batch.
    again = await writer.write(
        await verified(engine, (TOPICS.heartbeat(device_id), payload), (TOPICS.heartbeat(device_id), payload))
    )
    assert first.heartbeats.stored == 1
    assert (again.heartbeats.stored, again.heartbeats.duplicate) == (0, 2)
    assert await scalar(engine, "SELECT count(*) FROM heartbeats") == 1
    assert await scalar(engine, "SELECT count(*) FROM device_status_changes") == 1


async def test_latest_state_is_decided_by_seq_not_arrival(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    writer = BatchWriter(engine)
    topic = TOPICS.heartbeat(device_id)
    newer = signed_heartbeat(key, device_id, 10, agent_version="0.2.0", status="degraded")
    older = signed_heartbeat(key, device_id, 9, agent_version="0.1.9")
    await writer.write(await verified(engine, (topic, newer)))
    await writer.write(await verified(engine, (topic, older)))  # arrives later, e.g. from another worker
    d = await device(engine, device_id)
    assert (d.last_seq, d.agent_version, d.health) == (10, "0.2.0", "degraded")
    # Within one batch too: the highest seq wins whatever its position.
    await writer.write(
        await verified(
            engine,
            (topic, signed_heartbeat(key, device_id, 12, agent_version="0.3.0")),
            (topic, signed_heartbeat(key, device_id, 11, agent_version="0.2.9")),
        )
    )
    d = await device(engine, device_id)
    assert (d.last_seq, d.agent_version) == (12, "0.3.0")
    assert await scalar(engine, "SELECT count(*) FROM heartbeats") == 4


async def test_last_seen_never_moves_backwards(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    writer = BatchWriter(engine)
    topic = TOPICS.heartbeat(device_id)
    late = datetime.now(UTC)
    early = late - timedelta(seconds=30)
    await writer.write(
        await verified(engine, (topic, signed_heartbeat(key, device_id, 2, ts=early)), received_at=late)
    )
    await writer.write(
        await verified(engine, (topic, signed_heartbeat(key, device_id, 3, ts=early)), received_at=early)
    )
    d = await device(engine, device_id)
    assert d.last_seen_at is not None
    assert abs(d.last_seen_at - late) < timedelta(milliseconds=1)


async def test_status_follows_the_newest_ts_not_arrival_order(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    writer = BatchWriter(engine)
    now = datetime.now(UTC)
    status_topic = TOPICS.status(device_id)

    def status(value: str, at: datetime) -> tuple[str, bytes]:
        return status_topic, json.dumps({"status": value, "ts": format_ts(at)}).encode()

    await writer.write(await verified(engine, status("offline", now - timedelta(seconds=10))))
    await writer.write(await verified(engine, status("online", now - timedelta(seconds=20))))  # stale
    d = await device(engine, device_id)
    assert d.status is ConnectionState.OFFLINE
    # A heartbeat sent before the device went offline does not bring it back online ...
    old_beat = signed_heartbeat(key, device_id, 1, ts=now - timedelta(seconds=15))
    await writer.write(await verified(engine, (TOPICS.heartbeat(device_id), old_beat)))
    assert (await device(engine, device_id)).status is ConnectionState.OFFLINE
    # ... a newer one does, and each change is recorded once.
    await writer.write(
        await verified(engine, (TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 2)))
    )
    d = await device(engine, device_id)
    assert d.status is ConnectionState.ONLINE
    async with engine.connect() as conn:
        changes = (
            await conn.execute(sa.text("SELECT status, reason FROM device_status_changes ORDER BY at"))
        ).all()
    assert [tuple(c) for c in changes] == [("offline", "status message"), ("online", "heartbeat")]


async def test_events_are_stored_once(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    writer = BatchWriter(engine)
    payload = signed_event(key, device_id, 1, "deployment.result", ok=True, nested={"a": [1, 2.5, None]})
    first = await writer.write(await verified(engine, (TOPICS.events(device_id), payload)))
    again = await writer.write(await verified(engine, (TOPICS.events(device_id), payload)))
    assert (first.events.stored, again.events.duplicate) == (1, 1)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.text("SELECT type, data FROM device_events"))).one()
    data = row.data if isinstance(row.data, dict) else json.loads(row.data)
    assert row.type == "deployment.result"
    assert data == {"ok": True, "nested": {"a": [1, 2.5, None]}}
    d = await device(engine, device_id)
    assert d.last_seen_at is not None
    assert d.last_seq is None, "events do not touch the heartbeat state"


async def test_rows_of_a_device_deleted_meanwhile_are_skipped_not_failed(engine: AsyncEngine) -> None:
    key, device_id = await setup_device(engine)
    other_key, other_id = await setup_device(engine)
    records = await verified(
        engine,
        (TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 1)),
        (TOPICS.heartbeat(other_id), signed_heartbeat(other_key, other_id, 1)),
    )
    async with engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM devices WHERE id = :id"), {"id": device_id})
    result = await BatchWriter(engine).write(records)
    assert (result.heartbeats.stored, result.heartbeats.vanished, result.heartbeats.duplicate) == (1, 1, 0)
    assert await scalar(engine, "SELECT count(*) FROM heartbeats") == 1


async def test_key_cache_sees_revocation_at_once_keeps_keys_a_ttl_and_caches_unknown_ids(
    engine: AsyncEngine,
) -> None:
    _key, device_id = await setup_device(engine)
    clock = [0.0]
    cache = KeyCache(engine, ttl_s=30, negative_ttl_s=5, clock=lambda: clock[0])
    first = await cache.get(device_id)
    assert first is not None
    assert first.state is AdmissionState.ACTIVE
    other = generate_private_key(KeyType.ECDSA_P256)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE devices SET state = 'revoked', public_key_pem = :pem WHERE id = :id"),
            {"id": device_id, "pem": public_key_to_pem(other.public_key())},
        )
    clock[0] = 1.0
    revoked = await cache.get(device_id)
    assert revoked is not None
    assert revoked.state is AdmissionState.REVOKED, "the state is read on every lookup"
    assert revoked.public_key is first.public_key, "the parsed key is cached for the TTL"
    clock[0] = 31.0
    refreshed = await cache.get(device_id)
    assert refreshed is not None
    assert refreshed.state is AdmissionState.REVOKED
    assert refreshed.public_key is not None
    assert public_key_to_pem(refreshed.public_key) == public_key_to_pem(other.public_key())

    assert await cache.get("not-registered-yet") is None
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE devices SET id = 'not-registered-yet' WHERE id = :id"), {"id": device_id}
        )
    clock[0] = 34.0
    assert await cache.get("not-registered-yet") is None, "negative entries are cached briefly"
    clock[0] = 37.0
    assert await cache.get("not-registered-yet") is not None
