"""The deployment aggregate and the writer's handling of reports it cannot act on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from kernex.protocol.messages import Event
from kernex.storage.database import create_engine
from kernex.storage.deployments import DeploymentStatus, aggregate_status
from kernex.storage.models import DeviceEvent
from kernex.storage.records import VerifiedEvent
from kernex.storage.writer import BatchWriter
from tests.fixtures.ingest import new_key, register_device


@pytest.mark.parametrize(
    ("counts", "cancelled", "expected"),
    [
        ({"pending": 3}, False, DeploymentStatus.PENDING),
        ({"pending": 2, "superseded": 1}, False, DeploymentStatus.PENDING),
        ({"pending": 2, "downloading": 1}, False, DeploymentStatus.IN_PROGRESS),
        ({"pending": 1, "succeeded": 1}, False, DeploymentStatus.IN_PROGRESS),
        ({"pending": 1, "failed": 1}, False, DeploymentStatus.IN_PROGRESS),
        ({"succeeded": 3}, False, DeploymentStatus.SUCCEEDED),
        ({"succeeded": 2, "superseded": 1}, False, DeploymentStatus.SUCCEEDED),
        ({"failed": 1, "rolled_back": 1, "refused": 1}, False, DeploymentStatus.FAILED),
        ({"succeeded": 1, "rolled_back": 1}, False, DeploymentStatus.PARTIALLY_FAILED),
        ({"succeeded": 1, "cancelled": 1}, False, DeploymentStatus.PARTIALLY_FAILED),
        ({"superseded": 2}, False, DeploymentStatus.CANCELLED),
        ({"downloading": 1, "cancelled": 1}, True, DeploymentStatus.CANCELLED),
    ],
)
def test_aggregate_status(counts: dict[str, int], cancelled: bool, expected: DeploymentStatus) -> None:
    assert aggregate_status(counts, cancelled=cancelled) is expected


async def test_reports_that_match_nothing_are_stored_and_change_nothing(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        device_id = await register_device(engine, new_key())
        now = datetime.now(UTC)
        events = [
            # Not a DeploymentProgress: stored as signed, never applied.
            Event(device_id=device_id, seq=1, ts=now, type="deployment", data={"stage": "exploded"}),
            # A deployment that does not exist.
            Event(
                device_id=device_id,
                seq=2,
                ts=now,
                type="deployment",
                data={
                    "deployment_id": "nosuch",
                    "command_id": "c",
                    "bundle_id": "b",
                    "version": "1",
                    "stage": "succeeded",
                },
            ),
            Event(device_id=device_id, seq=3, ts=now, type="config_applied", data={"version": 0}),
        ]
        result = await BatchWriter(engine).write([VerifiedEvent(device_id, e, now) for e in events])
        assert (result.events.stored, result.reports_applied) == (3, 0)
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(sa.func.count()).select_from(DeviceEvent))).scalar_one()
        assert stored == 3
    finally:
        await engine.dispose()
