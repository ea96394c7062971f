"""Device configuration against a real Mosquitto and database: validation, versions, history,
signed retained config commands, fleet defaults merged with overrides, desired vs reported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kernex.protocol.config import DeviceSettings
from kernex.protocol.keys import KeyType, build_csr, device_id_for, generate_private_key
from kernex.protocol.topics import CommandKind
from kernex.storage.models import AuditEntry, Device
from tests.fixtures.broker import RunningBroker
from tests.fixtures.fleet import Fleet, open_fleet


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, database_url, broker) as opened:
        yield opened


@pytest.fixture
async def pg_fleet(pg_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, pg_url, broker) as opened:
        yield opened


async def _put(fleet: Fleet, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await fleet.api.client.put(
        f"/api/v1/devices/{device_id}/config", json=body, headers=fleet.operator
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(
    "body",
    [
        {"heartbeat_interval_s": 0},
        {"heartbeat_interval_s": 86_401},
        {"heartbeat_interval_s": "often"},
        {"log_level": "LOUD"},
        {"install_timeout_s": -1},
        {"extra": {"nested": {"a": 1}}},
        {"extra": {"bad key!": 1}},
        {"extra": {"list": [1, 2]}},
        {"extra": {"long": "x" * 513}},
        {"extra": {f"k{i}": i for i in range(65)}},
        {"unknown_setting": 1},
    ],
)
async def test_bad_settings_are_422(pg_fleet: Fleet, body: dict[str, Any]) -> None:
    device = await pg_fleet.device()
    response = await pg_fleet.api.client.put(
        f"/api/v1/devices/{device.device_id}/config", json=body, headers=pg_fleet.operator
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


async def test_each_change_is_a_signed_version_and_in_sync_follows_reports(fleet: Fleet) -> None:
    device = await fleet.device()
    before = await fleet.get(f"/api/v1/devices/{device.device_id}/config")
    assert (before["desired"], before["in_sync"]) == (None, True)

    first = await _put(fleet, device.device_id, {"heartbeat_interval_s": 30, "extra": {"site": "north"}})
    assert first["desired"]["version"] == 1
    assert first["desired"]["command_state"] == "published"
    second = await _put(
        fleet, device.device_id, {"log_level": "DEBUG", "extra": {"site": "south", "retries": 3}}
    )
    assert second["desired"]["version"] == 2
    assert second["desired"]["values"]["heartbeat_interval_s"] == 60  # no longer overridden
    assert second["in_sync"] is False

    command = await fleet.command(device, CommandKind.CONFIG)
    assert command.config is not None
    assert command.config.version == 2
    settings = DeviceSettings.model_validate(command.config.values)
    assert (settings.log_level, settings.extra) == ("DEBUG", {"site": "south", "retries": 3})

    history = (await fleet.get(f"/api/v1/devices/{device.device_id}/config/history"))["items"]
    assert [h["version"] for h in history] == [2, 1]
    assert history[1]["overrides"]["heartbeat_interval_s"] == 30
    assert history[0]["created_by"] == "user:operator-user"

    # The device applied version 1 late, then failed on 2: out of sync, the error shown.
    await fleet.event(device, "config_applied", {"command_id": "c1", "version": 1})
    await fleet.event(
        device, "config_applied", {"command_id": command.command_id, "version": 2, "error": "no"}
    )
    view = await fleet.get(f"/api/v1/devices/{device.device_id}/config")
    assert view["reported"]["version"] == 1
    assert view["reported"]["error"] == "version 2: no"
    assert view["in_sync"] is False
    await fleet.event(device, "config_applied", {"command_id": command.command_id, "version": 2})
    view = await fleet.get(f"/api/v1/devices/{device.device_id}/config")
    assert (view["reported"]["version"], view["reported"]["error"], view["in_sync"]) == (2, None, True)
    # An older report arriving late changes nothing.
    await fleet.event(device, "config_applied", {"command_id": "c1", "version": 1}, seq=1)
    assert (await fleet.get(f"/api/v1/devices/{device.device_id}/config"))["in_sync"] is True

    async with fleet.engine.connect() as conn:
        outcomes = (
            await conn.execute(sa.select(AuditEntry.outcome).where(AuditEntry.action == "config.device"))  # type: ignore[arg-type]  # SQLModel column
        ).all()
        interval = (
            await conn.execute(sa.select(Device.heartbeat_interval_s).where(Device.id == device.device_id))  # type: ignore[arg-type]  # SQLModel column
        ).scalar_one()
    assert [o for (o,) in outcomes] == ["success", "success"]
    assert interval == 60  # the liveness sweeper's interval follows the configuration


async def test_fleet_defaults_merge_under_device_overrides(fleet: Fleet) -> None:
    plain, tuned = await fleet.device(), await fleet.device()
    await _put(fleet, tuned.device_id, {"heartbeat_interval_s": 15, "extra": {"role": "gateway"}})

    response = await fleet.api.client.put(
        "/api/v1/config/defaults",
        json={
            "log_level": "WARNING",
            "heartbeat_interval_s": 120,
            "extra": {"region": "eu", "role": "sensor"},
        },
        headers=fleet.operator,
    )
    assert response.status_code == 200, response.text
    defaults = response.json()
    assert (defaults["version"], defaults["devices_updated"]) == (1, 2)
    assert defaults["effective"]["install_timeout_s"] == 600

    merged_tuned = (await fleet.command(tuned, CommandKind.CONFIG)).config
    merged_plain = (await fleet.command(plain, CommandKind.CONFIG)).config
    assert merged_tuned is not None
    assert merged_plain is not None
    assert merged_tuned.values["log_level"] == "WARNING"
    assert merged_tuned.values["heartbeat_interval_s"] == 15
    assert merged_tuned.values["extra"] == {"region": "eu", "role": "gateway"}
    assert (merged_tuned.version, merged_plain.version) == (2, 1)
    assert merged_plain.values["heartbeat_interval_s"] == 120
    assert merged_plain.values["extra"] == {"region": "eu", "role": "sensor"}

    # A defaults change that a device overrides everywhere leaves its version alone.
    response = await fleet.api.client.put(
        "/api/v1/config/defaults",
        json={
            "log_level": "WARNING",
            "heartbeat_interval_s": 90,
            "extra": {"region": "eu", "role": "sensor"},
        },
        headers=fleet.operator,
    )
    assert response.json()["devices_updated"] == 1
    view = await fleet.get(f"/api/v1/devices/{tuned.device_id}/config")
    assert view["desired"]["version"] == 2
    assert (await fleet.get("/api/v1/config/defaults"))["version"] == 2

    # A device registering now starts from the defaults.
    key = generate_private_key(KeyType.ECDSA_P256)
    registered = await fleet.api.client.post(
        "/api/v1/devices/register", json={"csr": build_csr(key, device_id_for(key.public_key()))}
    )
    assert registered.status_code == 201
    newcomer = await fleet.get(f"/api/v1/devices/{registered.json()['device_id']}/config")
    assert newcomer["desired"]["values"]["heartbeat_interval_s"] == 90
    assert newcomer["desired"]["defaults_version"] == 2


async def test_config_refusals(pg_fleet: Fleet) -> None:
    missing = await pg_fleet.api.client.put(
        "/api/v1/devices/nosuch/config", json={}, headers=pg_fleet.operator
    )
    assert missing.status_code == 404
    device = await pg_fleet.device()
    viewer = await pg_fleet.api.client.put(
        f"/api/v1/devices/{device.device_id}/config", json={}, headers=pg_fleet.viewer
    )
    assert viewer.status_code == 403
    async with pg_fleet.engine.begin() as conn:
        await conn.execute(sa.update(Device).where(Device.id == device.device_id).values(state="revoked"))  # type: ignore[arg-type]  # SQLModel column
    revoked = await pg_fleet.api.client.put(
        f"/api/v1/devices/{device.device_id}/config", json={}, headers=pg_fleet.operator
    )
    assert revoked.status_code == 409
