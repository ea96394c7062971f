"""Rollout progress for integrators, against a real Mosquitto: every recorded transition reaches
`fleet/rollouts/{id}` in order (the retained one is the latest) and the `rollouts` webhooks, once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from kernex.api.auth.schemas import Role
from kernex.protocol.fleet import FleetRollout, rollout_topic
from kernex.protocol.topics import CommandKind
from kernex.storage.models import RolloutTransition, WebhookDelivery
from tests.fixtures import asyncapi
from tests.fixtures.broker import RunningBroker, close_client, next_message
from tests.fixtures.fleet import Fleet, connect_integrator, open_fleet, wait_until

ENGINE_INTERVAL_S = 0.2


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, database_url, broker, rollout_interval_s=ENGINE_INTERVAL_S) as opened:
        yield opened


def _receive(client: mqtt.Client, topic: str, count: int) -> list[dict[str, Any]]:
    """The next `count` messages on topic (others on the fleet tree are skipped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        message = next_message(client, timeout=20)
        if message.topic == topic:
            found.append(json.loads(message.payload))
    return found


async def test_rollout_steps_reach_integrators_and_webhooks_in_order(fleet: Fleet, tmp_path: Path) -> None:
    integrator = await asyncio.to_thread(connect_integrator, fleet.broker, tmp_path, "rollout-watcher")
    try:
        hook = await fleet.api.client.post(
            "/api/v1/webhooks",
            # Nothing listens there: the deliveries stay in the log, which is what is checked.
            json={"url": "http://127.0.0.1:9/hook", "event_types": ["rollouts"]},
            headers=fleet.api.headers(Role.ADMIN),
        )
        assert hook.status_code == 201, hook.text
        devices = [await fleet.device(tags=["feed"]) for _ in range(4)]
        bundle = await fleet.bundle("3.0.0")
        strategy = {"phases": [{"percent": 50}, {"percent": 100}], "require_approval": True}
        created = (
            await fleet.api.client.post(
                "/api/v1/deployments",
                json={"bundle_id": bundle["id"], "tags": ["feed"], "rollout": strategy},
                headers=fleet.operator,
            )
        ).json()
        deployment_id = created["id"]
        by_id = {d.device_id: d for d in devices}
        for target in created["targets"]:
            device = by_id[target["device_id"]]
            await fleet.report(device, await fleet.command(device, CommandKind.DEPLOY), "succeeded")

        async def awaiting() -> dict[str, Any] | None:
            rollout = await fleet.get(f"/api/v1/deployments/{deployment_id}/rollout")
            return rollout if rollout["state"] == "awaiting_approval" else None

        rollout = await wait_until(awaiting, "the canary to pass")
        expected = [(t["event"], t["phase"], t["state"]) for t in rollout["transitions"]]
        assert len(expected) >= 3, expected

        topic = rollout_topic(fleet.broker.topics, deployment_id)
        received = await asyncio.to_thread(_receive, integrator, topic, len(expected))
        messages = [FleetRollout.model_validate(m) for m in received]
        for payload in received:  # as docs/asyncapi.yaml documents them
            assert not asyncapi.message_errors(topic, payload, prefix=fleet.broker.topics.prefix), payload
        assert [(m.event, m.phase, m.state) for m in messages] == expected
        ids = [m.transition_id for m in messages]
        assert ids == sorted(set(ids)), "each step once, in order"
        assert messages[-1].counts.get("succeeded") == 2
        assert messages[-1].phases_total == 2

        # A late subscriber gets where the rollout stands: the retained latest step.
        late = await asyncio.to_thread(connect_integrator, fleet.broker, tmp_path / "late", "late-watcher")
        try:
            (retained,) = await asyncio.to_thread(_receive, late, topic, 1)
            assert retained["transition_id"] == ids[-1]
        finally:
            close_client(late)

        async def queued() -> list[dict[str, Any]] | None:
            async with fleet.engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(WebhookDelivery.body).where(WebhookDelivery.event_type == "rollouts")  # type: ignore[arg-type]  # SQLModel column
                )
                bodies = [json.loads(r.body) for r in rows]
            return bodies if len(bodies) >= len(expected) else None

        bodies = await wait_until(queued, "the rollout webhook deliveries")
        assert {b["event"] for b in bodies} == {"rollouts"}
        assert sorted(b["data"]["transition_id"] for b in bodies) == ids

        async with fleet.engine.connect() as conn:
            unsent = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(RolloutTransition)
                .where(RolloutTransition.published_at.is_(None))  # type: ignore[union-attr]  # SQLModel column
            )
        assert unsent == 0
    finally:
        close_client(integrator)
