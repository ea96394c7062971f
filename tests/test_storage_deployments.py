"""The deployment aggregate and the writer's handling of reports it cannot act on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlmodel import col

from kernex.protocol.messages import Event
from kernex.storage.database import create_engine
from kernex.storage.deployments import DeploymentStatus, aggregate_status, recompute, record_history
from kernex.storage.models import Bundle, Deployment, DeviceBundleHistory, DeviceEvent
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


async def test_two_workers_recomputing_one_deployment_queue_instead_of_deadlocking(pg_url: str) -> None:
    """Each transaction first inserts a history row that refers to the deployment (a key-share
    lock on its row, from the foreign key), then recomputes it, as two ingest workers applying
    final reports of the same deployment do. Locking the row FOR UPDATE there deadlocked; the
    recompute's FOR NO KEY UPDATE is compatible with the key-share locks, so the second waits."""
    engine = create_engine(pg_url)
    try:
        device_ids = [await register_device(engine, new_key()) for _ in range(2)]
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            bundle = Bundle(name="app", version="1.0.0", sha256="0" * 64, size=1, storage_key="bundles/x")
            await conn.execute(sa.insert(Bundle).values(**bundle.model_dump()))
            deployment = Deployment(bundle_id=bundle.id, status="in_progress")
            await conn.execute(sa.insert(Deployment).values(**deployment.model_dump()))
        both_hold_key_share = asyncio.Barrier(2)

        async def worker(device_id: str) -> None:
            async with engine.begin() as conn:
                await record_history(
                    conn,
                    device_id=device_id,
                    deployment_id=deployment.id,
                    bundle_id=bundle.id,
                    version="1.0.0",
                    result="succeeded",
                    started_at=now,
                    finished_at=now,
                )
                await both_hold_key_share.wait()
                await recompute(conn, [deployment.id], now)

        async with asyncio.timeout(30):
            await asyncio.gather(*(worker(d) for d in device_ids))
        async with engine.connect() as conn:
            history = await conn.execute(
                sa.select(sa.func.count()).where(col(DeviceBundleHistory.deployment_id) == deployment.id)
            )
            assert history.scalar_one() == len(device_ids)
    finally:
        await engine.dispose()
