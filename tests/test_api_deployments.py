"""Deployments against a real Mosquitto and database: signed retained commands, reports, cancel, 409,
rollback and history, the broker outage republisher, the timeout and liveness sweepers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from kernex.api.commands.runtime import sweep_once
from kernex.protocol import jws
from kernex.protocol.commands import EventType
from kernex.protocol.messages import format_ts
from kernex.protocol.topics import CommandKind
from kernex.storage.models import AuditEntry, Bundle, Device, DeviceBundleHistory, DeviceStatusChange
from tests.fixtures.broker import RunningBroker, close_client, connect_client, publish
from tests.fixtures.fleet import Fleet, open_fleet, wait_until
from tests.fixtures.ingest import ingest_settings, running_worker


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, database_url, broker) as opened:
        yield opened


@pytest.fixture
async def pg_fleet(pg_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    """For tests whose subject is not the database."""
    async with open_fleet(tmp_path, pg_url, broker) as opened:
        yield opened


async def _audit(fleet: Fleet, action: str) -> list[AuditEntry]:
    async with fleet.engine.connect() as conn:
        rows = await conn.execute(sa.select(AuditEntry).where(AuditEntry.action == action))  # type: ignore[arg-type]  # SQLModel column
        return [AuditEntry.model_validate(r._mapping) for r in rows]


async def test_deploy_publishes_signed_retained_commands(fleet: Fleet) -> None:
    bundle = await fleet.bundle("1.0.0")
    a, b = await fleet.device(), await fleet.device()
    response = await fleet.deploy(bundle["id"], [a, b])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending"
    assert (body["total"], body["counts"]) == (2, {"pending": 2})
    assert body["bundle_version"] == "1.0.0"
    assert {t["command_state"] for t in body["targets"]} == {"published"}

    commands = {d.device_id: await fleet.command(d, CommandKind.DEPLOY) for d in (a, b)}
    for device, command in commands.items():
        assert command.device_id == device
        assert command.kind is CommandKind.DEPLOY
        assert command.deploy is not None
        assert command.deploy.deployment_id == body["id"]
        assert command.deploy.bundle_id == bundle["id"]
        assert (command.deploy.sha256, command.deploy.size) == (bundle["sha256"], bundle["size"])
        assert command.deploy.download_path == f"/api/v1/bundles/{bundle['id']}/download"
        assert command.deploy.rollback is False
        assert command.expires_at - command.issued_at == timedelta(days=7)
    targets = {t["device_id"]: t for t in body["targets"]}
    assert {d: targets[d]["command_id"] for d in targets} == {d: c.command_id for d, c in commands.items()}

    detail = await fleet.get(f"/api/v1/deployments/{body['id']}")
    assert detail["id"] == body["id"]
    listed = await fleet.get("/api/v1/deployments", device_id=a.device_id)
    assert [d["id"] for d in listed["items"]] == [body["id"]]
    assert (await fleet.get("/api/v1/deployments", status="succeeded"))["total"] == 0
    assert (await fleet.get("/api/v1/deployments", bundle_id=bundle["id"]))["total"] == 1
    assert [e.target for e in await _audit(fleet, "deployment.create")] == [f"deployment:{body['id']}"]


async def test_revisions_only_grow_per_device(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    one, two = await fleet.bundle("1.0.0"), await fleet.bundle("2.0.0")
    device = await fleet.device()
    await fleet.deploy(one["id"], [device])
    first = await fleet.command(device, CommandKind.DEPLOY)
    second_response = await fleet.deploy(two["id"], [device], supersede=True)
    assert second_response.status_code == 201, second_response.text
    second = await fleet.command(device, CommandKind.DEPLOY)
    assert second.revision > first.revision
    assert second.deploy is not None
    assert second.deploy.version == "2.0.0"


async def test_second_deployment_is_refused_naming_the_active_one_unless_it_supersedes(fleet: Fleet) -> None:
    one, two = await fleet.bundle("1.0.0"), await fleet.bundle("2.0.0")
    busy, free = await fleet.device(), await fleet.device()
    first = (await fleet.deploy(one["id"], [busy])).json()

    refused = await fleet.deploy(two["id"], [busy, free])
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "deployment_active"
    assert first["id"] in error["message"]
    assert busy.device_id in error["message"]
    assert (await fleet.get("/api/v1/deployments"))["total"] == 1  # nothing of the refused one remains
    assert [e.outcome for e in await _audit(fleet, "deployment.create")] == ["success", "failed"]

    second = await fleet.deploy(two["id"], [busy, free], supersede=True)
    assert second.status_code == 201, second.text
    old = await fleet.get(f"/api/v1/deployments/{first['id']}")
    assert old["targets"][0]["status"] == "superseded"
    assert second.json()["id"] in old["targets"][0]["error"]
    assert old["status"] == "cancelled"  # its only target was superseded
    command = await fleet.command(busy, CommandKind.DEPLOY)
    assert command.deploy is not None
    assert command.deploy.deployment_id == second.json()["id"]


async def test_reports_drive_targets_history_and_the_aggregate(fleet: Fleet) -> None:
    bundle = await fleet.bundle("1.0.0")
    a, b, c = await fleet.device(), await fleet.device(), await fleet.device()
    deployment = (await fleet.deploy(bundle["id"], [a, b, c])).json()
    commands = {d.device_id: await fleet.command(d, CommandKind.DEPLOY) for d in (a, b, c)}

    await fleet.report(a, commands[a.device_id], "downloading", seq=10)
    detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
    assert detail["status"] == "in_progress"
    assert detail["counts"] == {"downloading": 1, "pending": 2}

    # Out of order and repeated: a terminal stage is never undone by an older report.
    await fleet.report(a, commands[a.device_id], "succeeded", seq=12, current_version="1.0.0")
    await fleet.report(a, commands[a.device_id], "installing", seq=11)
    await fleet.report(a, commands[a.device_id], "succeeded", seq=12)
    await fleet.report(b, commands[b.device_id], "installing", seq=3)
    await fleet.report(b, commands[b.device_id], "failed", seq=4, error="install.sh exited 3")
    await fleet.report(c, commands[c.device_id], "rolled_back", seq=7, error="health check failed")

    detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
    targets = {t["device_id"]: t for t in detail["targets"]}
    assert targets[a.device_id]["status"] == "succeeded"
    assert targets[a.device_id]["finished_at"] is not None
    assert (targets[b.device_id]["status"], targets[b.device_id]["error"]) == (
        "failed",
        "install.sh exited 3",
    )
    assert targets[c.device_id]["status"] == "rolled_back"
    assert detail["status"] == "partially_failed"
    assert detail["finished_at"] is not None

    history = await fleet.get(f"/api/v1/devices/{a.device_id}/bundle-history")
    assert [(h["version"], h["result"], h["deployment_id"]) for h in history["items"]] == [
        ("1.0.0", "succeeded", deployment["id"])
    ]
    device = await fleet.get(f"/api/v1/devices/{a.device_id}")
    assert device["bundle"] == {"id": bundle["id"], "version": "1.0.0"}
    # A report for another bundle than the deployment's, or no deployment, changes nothing.
    async with fleet.engine.connect() as conn:
        rows = (await conn.execute(sa.select(sa.func.count()).select_from(DeviceBundleHistory))).scalar_one()
    assert rows == 3


async def test_all_succeeded_and_all_failed(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    bundle = await fleet.bundle("1.0.0")
    good, bad = await fleet.device(), await fleet.device()
    ok = (await fleet.deploy(bundle["id"], [good])).json()
    ko = (await fleet.deploy(bundle["id"], [bad])).json()
    await fleet.report(good, await fleet.command(good, CommandKind.DEPLOY), "succeeded")
    await fleet.report(bad, await fleet.command(bad, CommandKind.DEPLOY), "refused", error="older version")
    assert (await fleet.get(f"/api/v1/deployments/{ok['id']}"))["status"] == "succeeded"
    assert (await fleet.get(f"/api/v1/deployments/{ko['id']}"))["status"] == "failed"


async def test_cancel_clears_retained_commands_of_devices_not_started(fleet: Fleet) -> None:
    bundle = await fleet.bundle("1.0.0")
    idle, running = await fleet.device(), await fleet.device()
    deployment = (await fleet.deploy(bundle["id"], [idle, running])).json()
    await fleet.report(running, await fleet.command(running, CommandKind.DEPLOY), "downloading")
    assert await asyncio.to_thread(fleet.retained, idle, CommandKind.DEPLOY)

    response = await fleet.api.client.post(
        f"/api/v1/deployments/{deployment['id']}/cancel", headers=fleet.operator
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["cancelled_by"] == "user:operator-user"
    targets = {t["device_id"]: t for t in body["targets"]}
    assert (targets[idle.device_id]["status"], targets[idle.device_id]["command_state"]) == (
        "cancelled",
        "cleared",
    )
    assert targets[running.device_id]["status"] == "downloading"
    # A device connecting now finds nothing to do; the one that started keeps its command.
    assert await asyncio.to_thread(fleet.retained, idle, CommandKind.DEPLOY) is None
    assert await asyncio.to_thread(fleet.retained, running, CommandKind.DEPLOY)
    assert [e.outcome for e in await _audit(fleet, "deployment.cancel")] == ["success"]

    # The running device's result is still recorded; the deployment stays cancelled.
    await fleet.report(running, await fleet.command(running, CommandKind.DEPLOY), "succeeded")
    after = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
    assert after["status"] == "cancelled"
    assert after["counts"] == {"cancelled": 1, "succeeded": 1}

    again = await fleet.api.client.post(
        f"/api/v1/deployments/{deployment['id']}/cancel", headers=fleet.operator
    )
    assert again.status_code == 409
    assert [e.outcome for e in await _audit(fleet, "deployment.cancel")] == ["success", "failed"]
    # The device is free again.
    assert (await fleet.deploy(bundle["id"], [idle])).status_code == 201


async def test_refusals_name_the_problem(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    bundle = await fleet.bundle("1.0.0")
    device = await fleet.device()
    unknown = await fleet.deploy("nosuchbundle", [device])
    assert unknown.status_code == 404
    missing_device = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "device_ids": ["nosuchdevice"]},
        headers=fleet.operator,
    )
    assert missing_device.status_code == 404
    assert "nosuchdevice" in missing_device.json()["error"]["message"]
    both = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "device_ids": [device.device_id], "tags": ["x"]},
        headers=fleet.operator,
    )
    assert both.status_code == 422
    no_match = await fleet.api.client.post(
        "/api/v1/deployments", json={"bundle_id": bundle["id"], "tags": ["nowhere"]}, headers=fleet.operator
    )
    assert (no_match.status_code, no_match.json()["error"]["code"]) == (404, "no_targets")
    viewer = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "device_ids": [device.device_id]},
        headers=fleet.viewer,
    )
    assert viewer.status_code == 403
    # Gone from the store: 410.
    async with fleet.engine.connect() as conn:
        key = (
            await conn.execute(sa.select(Bundle.storage_key).where(Bundle.id == bundle["id"]))
        ).scalar_one()  # type: ignore[arg-type]  # SQLModel column
    await fleet.api.app.state.bundles.store.delete(key)
    gone = await fleet.deploy(bundle["id"], [device])
    assert (gone.status_code, gone.json()["error"]["code"]) == (410, "bundle_gone")


async def test_tags_select_active_devices_carrying_all_of_them(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    bundle = await fleet.bundle("1.0.0")
    both = await fleet.device(tags=["pumps", "eu"])
    await fleet.device(tags=["pumps"])
    response = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "tags": ["pumps", "eu"]},
        headers=fleet.operator,
    )
    assert response.status_code == 201, response.text
    assert [t["device_id"] for t in response.json()["targets"]] == [both.device_id]


async def test_history_newest_first_and_rollback_to_the_previous_success(fleet: Fleet) -> None:
    v1, v2 = await fleet.bundle("1.0.0"), await fleet.bundle("2.0.0")
    device = await fleet.device()
    none_yet = await fleet.api.client.post(
        f"/api/v1/devices/{device.device_id}/rollback", json={}, headers=fleet.operator
    )
    assert (none_yet.status_code, none_yet.json()["error"]["code"]) == (409, "no_rollback_target")

    for bundle in (v1, v2):
        assert (await fleet.deploy(bundle["id"], [device])).status_code == 201
        command = await fleet.command(device, CommandKind.DEPLOY)
        await fleet.report(device, command, "downloading")
        await fleet.report(device, command, "succeeded")
    history = (await fleet.get(f"/api/v1/devices/{device.device_id}/bundle-history"))["items"]
    assert [(h["version"], h["result"]) for h in history] == [("2.0.0", "succeeded"), ("1.0.0", "succeeded")]
    assert history[0]["started_at"] <= history[0]["finished_at"]

    response = await fleet.api.client.post(
        f"/api/v1/devices/{device.device_id}/rollback", json={}, headers=fleet.operator
    )
    assert response.status_code == 201, response.text
    assert response.json()["rollback"] is True
    command = await fleet.command(device, CommandKind.DEPLOY)
    assert command.deploy is not None
    assert (command.deploy.version, command.deploy.rollback) == ("1.0.0", True)
    await fleet.report(device, command, "succeeded")
    history = (await fleet.get(f"/api/v1/devices/{device.device_id}/bundle-history"))["items"]
    assert [(h["version"], h["rollback"]) for h in history] == [
        ("1.0.0", True),
        ("2.0.0", False),
        ("1.0.0", False),
    ]
    assert [e.outcome for e in await _audit(fleet, "device.rollback")] == ["failed", "success"]

    unknown = await fleet.api.client.post(
        f"/api/v1/devices/{device.device_id}/rollback", json={"bundle_id": "nosuch"}, headers=fleet.operator
    )
    assert unknown.status_code == 404
    async with fleet.engine.connect() as conn:
        key = (await conn.execute(sa.select(Bundle.storage_key).where(Bundle.id == v2["id"]))).scalar_one()  # type: ignore[arg-type]  # SQLModel column
    await fleet.api.app.state.bundles.store.delete(key)
    gone = await fleet.api.client.post(
        f"/api/v1/devices/{device.device_id}/rollback", json={"bundle_id": v2["id"]}, headers=fleet.operator
    )
    assert gone.status_code == 410
    missing = await fleet.api.client.post("/api/v1/devices/nosuch/rollback", json={}, headers=fleet.operator)
    assert missing.status_code == 404


async def test_commands_recorded_while_the_broker_is_down_are_published_when_it_returns(
    pg_fleet: Fleet,
) -> None:
    fleet = pg_fleet
    bundle = await fleet.bundle("1.0.0")
    device = await fleet.device()
    link = fleet.api.app.state.kernex.broker
    fleet.broker.process.stop()

    async def disconnected() -> bool:
        return not link.connected

    await wait_until(disconnected, "the API to notice the broker is gone")
    response = await fleet.deploy(bundle["id"], [device])
    assert response.status_code == 201, response.text
    deployment = response.json()
    assert deployment["targets"][0]["command_state"] == "pending"

    fleet.broker.process.start()

    async def published() -> bool:
        detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
        return bool(detail["targets"][0]["command_state"] == "published")

    await wait_until(published, "the republisher to publish the pending command", timeout=60)
    command = await fleet.command(device, CommandKind.DEPLOY)
    assert command.deploy is not None
    assert command.deploy.deployment_id == deployment["id"]


async def test_timeout_sweeper_fails_overdue_targets_and_a_late_result_still_counts(fleet: Fleet) -> None:
    bundle = await fleet.bundle("1.0.0")
    slow, quick = await fleet.device(), await fleet.device()
    deployment = (await fleet.deploy(bundle["id"], [slow, quick], timeout_s=60)).json()
    await fleet.report(slow, await fleet.command(slow, CommandKind.DEPLOY), "installing")
    settings = fleet.api.settings

    await sweep_once(fleet.engine, settings, datetime.now(UTC) + timedelta(seconds=30))
    assert (await fleet.get(f"/api/v1/deployments/{deployment['id']}"))["counts"]["installing"] == 1

    # Two sweepers at once (two API processes): each target fails once.
    later = datetime.now(UTC) + timedelta(seconds=61)
    await asyncio.gather(sweep_once(fleet.engine, settings, later), sweep_once(fleet.engine, settings, later))
    detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
    targets = {t["device_id"]: t for t in detail["targets"]}
    assert (targets[slow.device_id]["status"], targets[slow.device_id]["error"]) == ("failed", "timeout")
    assert targets[quick.device_id]["status"] == "pending"  # not taken up yet: no timeout runs
    history = (await fleet.get(f"/api/v1/devices/{slow.device_id}/bundle-history"))["items"]
    assert [h["result"] for h in history] == ["failed"]

    await fleet.report(slow, await fleet.command(slow, CommandKind.DEPLOY), "succeeded")
    await fleet.report(quick, await fleet.command(quick, CommandKind.DEPLOY), "succeeded")
    detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
    assert detail["status"] == "succeeded"
    history = (await fleet.get(f"/api/v1/devices/{slow.device_id}/bundle-history"))["items"]
    assert [h["result"] for h in history] == ["succeeded"]  # the same row, corrected


async def test_liveness_sweeper_marks_silent_devices_offline(fleet: Fleet) -> None:
    quiet, chatty, configured = await fleet.device(), await fleet.device(), await fleet.device()
    now = datetime.now(UTC)
    async with fleet.engine.begin() as conn:
        for device, seen, interval in (
            (quiet, now - timedelta(seconds=181), None),  # 3 x the default 60 s
            (chatty, now - timedelta(seconds=100), None),
            (configured, now - timedelta(seconds=31), 10),  # 3 x its own 10 s
        ):
            await conn.execute(
                sa.update(Device)
                .where(Device.id == device.device_id)  # type: ignore[arg-type]  # SQLModel column
                .values(
                    status="online", status_changed_at=seen, last_seen_at=seen, heartbeat_interval_s=interval
                )
            )
    await sweep_once(fleet.engine, fleet.api.settings, now)
    statuses = {
        d.device_id: (await fleet.get(f"/api/v1/devices/{d.device_id}"))["status"]
        for d in (quiet, chatty, configured)
    }
    assert statuses == {
        quiet.device_id: "offline",
        chatty.device_id: "online",
        configured.device_id: "offline",
    }
    async with fleet.engine.connect() as conn:
        changes = (
            await conn.execute(
                sa.select(DeviceStatusChange.device_id, DeviceStatusChange.status, DeviceStatusChange.reason)
            )
        ).all()
    assert sorted(changes) == sorted(
        [
            (quiet.device_id, "offline", "missed heartbeats"),
            (configured.device_id, "offline", "missed heartbeats"),
        ]
    )
    await sweep_once(fleet.engine, fleet.api.settings, now)  # already offline: no second change
    async with fleet.engine.connect() as conn:
        assert (
            await conn.execute(sa.select(sa.func.count()).select_from(DeviceStatusChange))
        ).scalar_one() == 2


async def test_ingest_applies_deployment_events_published_by_a_device(
    pg_url: str, tmp_path: Path, broker: RunningBroker
) -> None:
    """End to end: the device reads its command from the broker, reports over MQTT, ingest applies it."""
    async with open_fleet(tmp_path, pg_url, broker) as fleet:
        bundle = await fleet.bundle("1.0.0")
        device = await fleet.device()
        deployment = (await fleet.deploy(bundle["id"], [device])).json()
        command = await fleet.command(device, CommandKind.DEPLOY)
        assert command.deploy is not None
        settings = ingest_settings(broker, pg_url, tmp_path / "ingest")
        async with running_worker(settings, broker):
            client = connect_client(broker, device.cert_path, device.key_path, f"dev-{device.device_id[:8]}")
            try:
                for seq, stage in ((1, "downloading"), (2, "installing"), (3, "succeeded")):
                    claims = {
                        "device_id": device.device_id,
                        "seq": seq,
                        "ts": format_ts(datetime.now(UTC)),
                        "type": EventType.DEPLOYMENT.value,
                        "data": {
                            "deployment_id": command.deploy.deployment_id,
                            "command_id": command.command_id,
                            "bundle_id": command.deploy.bundle_id,
                            "version": command.deploy.version,
                            "stage": stage,
                        },
                    }
                    token = jws.sign_claims(claims, device.key, kid=device.device_id, typ=jws.TYP_EVENT)
                    code = await asyncio.to_thread(
                        publish, client, broker.topics.events(device.device_id), token.encode()
                    )
                    assert not code.is_failure
            finally:
                close_client(client)

            async def finished() -> bool:
                detail = await fleet.get(f"/api/v1/deployments/{deployment['id']}")
                return bool(detail["status"] == "succeeded")

            await wait_until(finished, "ingest to apply the device's reports")
        history = (await fleet.get(f"/api/v1/devices/{device.device_id}/bundle-history"))["items"]
        assert [(h["version"], h["result"]) for h in history] == [("1.0.0", "succeeded")]


async def test_a_withdrawal_still_unsent_is_replaced_by_the_next_command(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    one, two = await fleet.bundle("1.0.0"), await fleet.bundle("2.0.0")
    device = await fleet.device()
    link = fleet.api.app.state.kernex.broker
    fleet.broker.process.stop()

    async def disconnected() -> bool:
        return not link.connected

    await wait_until(disconnected, "the API to notice the broker is gone")
    first = (await fleet.deploy(one["id"], [device])).json()
    cancel = f"/api/v1/deployments/{first['id']}/cancel"
    cancelled = await fleet.api.client.post(cancel, headers=fleet.operator)
    assert cancelled.json()["targets"][0]["command_state"] == "clearing"
    second = (await fleet.deploy(two["id"], [device])).json()
    assert second["targets"][0]["command_state"] == "pending"
    fleet.broker.process.start()

    async def published() -> bool:
        detail = await fleet.get(f"/api/v1/deployments/{second['id']}")
        return bool(detail["targets"][0]["command_state"] == "published")

    await wait_until(published, "the republisher to publish the newest command", timeout=60)
    command = await fleet.command(device, CommandKind.DEPLOY)
    assert command.deploy is not None
    assert command.deploy.deployment_id == second["id"]
    old = await fleet.get(f"/api/v1/deployments/{first['id']}")
    assert old["targets"][0]["command_state"] == "superseded"
