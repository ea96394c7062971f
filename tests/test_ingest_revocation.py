"""Revocation as ingest sees it (issues #6 and #9), against a real Mosquitto and both databases.

A device still connected right after the API revoked it in the database (before the CRL reload
and the session cut, or on a broker Kernex does not run) keeps publishing: none of that reaches
the database, although ingest's key cache held the device as active. Integrators are told once,
on the fleet status topic, however many ingest workers run; the status history records it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.ingest.metrics import IngestMetrics
from kernex.protocol.fleet import FleetStatus
from kernex.storage.database import create_engine
from tests.fixtures import asyncapi
from tests.fixtures.broker import (
    QUIET_PERIOD_S,
    RunningBroker,
    close_client,
    connect_client,
    make_device,
    next_message,
    publish,
)
from tests.fixtures.fleet import connect_integrator
from tests.fixtures.ingest import (
    ingest_settings,
    register_device,
    running_worker,
    sample,
    signed_event,
    signed_heartbeat,
    wait_for,
)

WAIT_S = 30.0  # generous: two workers and a broker on a loaded 2-core host


@pytest.fixture
def integrator(broker: RunningBroker, tmp_path: Path) -> Iterator[mqtt.Client]:
    client = connect_integrator(broker, tmp_path / "integrator")
    yield client
    close_client(client)


async def _scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(sa.text(sql), params)).scalar()


def _statuses(client: mqtt.Client) -> list[tuple[str, dict[str, Any]]]:
    """Fleet status messages received until a quiet period."""
    seen: list[tuple[str, dict[str, Any]]] = []
    while True:
        try:
            message = next_message(client, timeout=QUIET_PERIOD_S * 3)
        except pytest.fail.Exception:
            return seen
        if message.topic.endswith("/status"):
            seen.append((message.topic, json.loads(message.payload)))


async def test_a_revoked_device_is_refused_at_once_and_announced_once(
    broker: RunningBroker, database_url: str, tmp_path: Path, integrator: mqtt.Client
) -> None:
    topics = broker.topics
    engine = create_engine(database_url)
    try:
        device = make_device(broker.pki)
        did = await register_device(engine, device.key)
        # Two workers on one shared subscription: the announcement must still come once.
        metrics = [IngestMetrics(), IngestMetrics()]
        settings = [
            ingest_settings(
                broker, database_url, tmp_path, client_id=f"kernex-ingest-{n}", key_cache_ttl_s=300
            )
            for n in range(2)
        ]
        async with (
            running_worker(settings[0], broker, metrics[0]),
            running_worker(settings[1], broker, metrics[1]),
        ):
            client = await asyncio.to_thread(connect_client, broker, device.cert_path, device.key_path, did)
            try:
                # Warm both workers' key caches with the device as active (the shared
                # subscription may hand both heartbeats to one worker: then one cache is warm).
                for seq in (1, 2):
                    payload = signed_heartbeat(device.key, did, seq)
                    assert not (
                        await asyncio.to_thread(publish, client, topics.heartbeat(did), payload)
                    ).is_failure

                async def stored_two() -> bool:
                    return (
                        await _scalar(engine, "SELECT count(*) FROM heartbeats WHERE device_id = :d", d=did)
                        == 2
                    )

                await wait_for(stored_two, "the first heartbeats stored", timeout=WAIT_S)

                # What the API's revoke commits first (kernex.api.devices.revocation); the CRL
                # reload and the session cut come after, so the device can still publish.
                revoked_at = datetime.now(UTC)
                async with engine.begin() as conn:
                    await conn.execute(
                        sa.text("UPDATE devices SET state = 'revoked', revoked_at = :at WHERE id = :d"),
                        {"at": revoked_at, "d": did},
                    )
                late = [
                    (topics.heartbeat(did), signed_heartbeat(device.key, did, seq)) for seq in range(3, 9)
                ]
                late.append((topics.events(did), signed_event(device.key, did, 9, "custom.thing", x=1)))
                for topic, payload in late:
                    assert not (await asyncio.to_thread(publish, client, topic, payload)).is_failure
            finally:
                await asyncio.to_thread(close_client, client)

            async def all_refused() -> bool:
                refused = sum(
                    sample(m, "kernex_ingest_rejected_total", reason="revoked_device") for m in metrics
                )
                return refused == len(late)

            await wait_for(all_refused, "every message after the revocation refused", timeout=WAIT_S)
            statuses = await asyncio.to_thread(_statuses, integrator)
        assert await _scalar(engine, "SELECT count(*) FROM heartbeats WHERE device_id = :d", d=did) == 2
        assert await _scalar(engine, "SELECT count(*) FROM device_events WHERE device_id = :d", d=did) == 0
        assert await _scalar(engine, "SELECT max(seq) FROM heartbeats WHERE device_id = :d", d=did) == 2

        revoked = [(t, p) for t, p in statuses if p["status"] == "revoked"]
        assert len(revoked) == 1, statuses
        topic, body = revoked[0]
        assert topic == f"{topics.prefix}/fleet/devices/{did}/status"
        assert not asyncapi.message_errors(topic, body, prefix=topics.prefix), body
        announced = FleetStatus.model_validate(body)
        assert (announced.device_id, announced.reason) == (did, "revoked")
        assert abs((announced.ts - revoked_at).total_seconds()) < 1
        history = await _scalar(
            engine,
            "SELECT count(*) FROM device_status_changes WHERE device_id = :d AND status = 'revoked'",
            d=did,
        )
        assert history == 1
        assert (
            await _scalar(engine, "SELECT revocation_announced_at FROM devices WHERE id = :d", d=did)
            is not None
        )
    finally:
        await engine.dispose()
