"""Fleet-wide gauges on the API's /metrics: devices by admission and connection state,
deployment targets and webhook deliveries by status, rollouts by state.

Counted from the database every REFRESH_S by one task per API process; each process reports
the same figures, so dashboards and alerts aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.kit.logs import get_logger
from kernex.storage.models import DeploymentTarget, Device, Rollout, WebhookDelivery

log = get_logger(__name__)

REFRESH_S = 15.0  # the usual Prometheus scrape interval: fresher figures would not be seen

_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_TARGETS: sa.Table = DeploymentTarget.__table__  # type: ignore[attr-defined]  # as above
_DELIVERIES: sa.Table = WebhookDelivery.__table__  # type: ignore[attr-defined]  # as above
_ROLLOUTS: sa.Table = Rollout.__table__  # type: ignore[attr-defined]  # as above


class FleetGauges:
    """The gauges, registered on the API's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.devices = Gauge(
            "kernex_devices",
            "Registered devices by admission state and connection status.",
            ["state", "status"],
            registry=registry,
        )
        self.targets = Gauge(
            "kernex_deployment_targets",
            "Deployment targets (one device in one deployment) by status.",
            ["status"],
            registry=registry,
        )
        self.deliveries = Gauge(
            "kernex_webhook_deliveries",
            "Webhook deliveries by status (pending, succeeded, failed).",
            ["status"],
            registry=registry,
        )
        self.rollouts = Gauge(
            "kernex_rollouts",
            "Phased rollouts by state (running, awaiting_approval, completed, aborted, cancelled).",
            ["state"],
            registry=registry,
        )

    async def refresh(self, engine: AsyncEngine) -> None:
        """Count everything once and replace the gauges' values."""
        async with engine.connect() as conn:
            devices = (
                await conn.execute(
                    sa.select(_DEVICES.c.state, _DEVICES.c.status, sa.func.count()).group_by(
                        _DEVICES.c.state, _DEVICES.c.status
                    )
                )
            ).all()
            targets = (
                await conn.execute(sa.select(_TARGETS.c.status, sa.func.count()).group_by(_TARGETS.c.status))
            ).all()
            deliveries = (
                await conn.execute(
                    sa.select(_DELIVERIES.c.status, sa.func.count()).group_by(_DELIVERIES.c.status)
                )
            ).all()
            rollouts = (
                await conn.execute(sa.select(_ROLLOUTS.c.state, sa.func.count()).group_by(_ROLLOUTS.c.state))
            ).all()
        # clear() then set: a combination that disappeared must not keep its last value.
        self.devices.clear()
        for state, status, n in devices:
            self.devices.labels(state=str(state), status=str(status)).set(n)
        self.targets.clear()
        for status, n in targets:
            self.targets.labels(status=status).set(n)
        self.deliveries.clear()
        for status, n in deliveries:
            self.deliveries.labels(status=status).set(n)
        self.rollouts.clear()
        for state, n in rollouts:
            self.rollouts.labels(state=state).set(n)

    async def run(self, engine: AsyncEngine, interval_s: float = REFRESH_S) -> None:
        """Refresh until cancelled; a failed refresh is logged and the old values kept."""
        while True:
            try:
                await self.refresh(engine)
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("fleet metrics not refreshed", error=str(exc))
            await asyncio.sleep(interval_s)
