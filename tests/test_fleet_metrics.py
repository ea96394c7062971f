"""The fleet gauges the API exports (devices by state, deployment targets, webhook deliveries)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kernex.api.fleet_metrics import FleetGauges
from kernex.storage.database import create_engine
from kernex.storage.models import AdmissionState
from tests.fixtures.auth import authed_api_on
from tests.fixtures.ingest import new_key, register_device


async def test_gauges_count_devices_by_state_and_status(database_url: str) -> None:
    engine = create_engine(database_url)
    registry = CollectorRegistry()
    gauges = FleetGauges(registry)
    try:
        for state in (AdmissionState.ACTIVE, AdmissionState.ACTIVE, AdmissionState.REVOKED):
            await register_device(engine, new_key(), state)
        await gauges.refresh(engine)
        value = registry.get_sample_value
        assert value("kernex_devices", {"state": "active", "status": "unknown"}) == 2
        assert value("kernex_devices", {"state": "revoked", "status": "unknown"}) == 1
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE devices SET status = 'online' WHERE state = 'active'"))
        await gauges.refresh(engine)
        assert value("kernex_devices", {"state": "active", "status": "online"}) == 2
        # A combination that no longer exists is gone, not stuck at its last value.
        assert value("kernex_devices", {"state": "active", "status": "unknown"}) is None
    finally:
        await engine.dispose()


async def test_the_api_serves_the_gauges(sqlite_url: str, tmp_path: Path) -> None:
    async with authed_api_on(tmp_path, sqlite_url) as api:
        body = (await api.client.get("/metrics")).text
    assert "# TYPE kernex_devices gauge" in body
    assert "# TYPE kernex_deployment_targets gauge" in body
    assert "# TYPE kernex_webhook_deliveries gauge" in body
