"""Device tags and groups against a real database: static members, dynamic filters evaluated when read,
4xx on bad filters and bodies, deployments by group, audit entries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kernex.storage.models import AuditEntry, Device
from tests.fixtures.broker import RunningBroker
from tests.fixtures.fleet import Fleet, open_fleet


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, database_url, broker) as opened:
        yield opened


@pytest.fixture
async def pg_fleet(pg_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    """For tests whose subject is not the database."""
    async with open_fleet(tmp_path, pg_url, broker) as opened:
        yield opened


async def _post(fleet: Fleet, path: str, body: dict[str, Any], expect: int) -> dict[str, Any]:
    response = await fleet.api.client.post(path, json=body, headers=fleet.operator)
    assert response.status_code == expect, response.text
    result: dict[str, Any] = response.json()
    return result


async def _set(fleet: Fleet, device_id: str, **values: Any) -> None:
    async with fleet.engine.begin() as conn:
        await conn.execute(sa.update(Device).where(Device.id == device_id).values(**values))  # type: ignore[arg-type]  # SQLModel column


async def _members(fleet: Fleet, group_id: str) -> list[str]:
    page = await fleet.get(f"/api/v1/groups/{group_id}/devices")
    return [d["id"] for d in page["items"]]


async def test_tags_and_dynamic_groups_follow_the_fleet(fleet: Fleet) -> None:
    a = await fleet.device(tags=["site-a"])
    b = await fleet.device(tags=["site-a", "beta"])
    c = await fleet.device()
    response = await fleet.api.client.put(
        f"/api/v1/devices/{c.device_id}/tags", json={"tags": ["beta", "beta", "lab"]}, headers=fleet.operator
    )
    assert response.status_code == 200, response.text
    assert response.json()["tags"] == ["beta", "lab"]
    async with fleet.engine.connect() as conn:
        audited = (
            await conn.execute(sa.select(AuditEntry.details).where(AuditEntry.action == "device.tags.set"))  # type: ignore[arg-type]  # SQLModel column
        ).scalar_one()
    assert audited == {"before": [], "after": ["beta", "lab"]}

    beta = await _post(
        fleet, "/api/v1/groups", {"name": "beta", "kind": "dynamic", "filter": {"tags_any": ["beta"]}}, 201
    )
    assert (beta["size"], beta["filter"]) == (2, {"tags_any": ["beta"]})
    assert await _members(fleet, beta["id"]) == sorted([b.device_id, c.device_id])

    # Every criterion must hold: tags, status, bundle version ("none": no bundle reported), type.
    await _set(fleet, a.device_id, status="online", bundle_version="1.0.0", hardware={"device_type": "rpi4"})
    await _set(fleet, b.device_id, status="online", hardware={"device_type": "rpi4"})
    narrow = {
        "tags_all": ["site-a"],
        "status": ["online"],
        "bundle_versions": ["none"],
        "device_types": ["rpi4"],
    }
    group = await _post(
        fleet, "/api/v1/groups", {"name": "site-a rpi4", "kind": "dynamic", "filter": narrow}, 201
    )
    assert await _members(fleet, group["id"]) == [b.device_id]

    # Evaluated when read: a device registered later that matches joins.
    later = await fleet.device(tags=["site-a"])
    await _set(fleet, later.device_id, status="online", hardware={"device_type": "rpi4"})
    assert await _members(fleet, group["id"]) == sorted([b.device_id, later.device_id])

    changed = await fleet.api.client.patch(
        f"/api/v1/groups/{group['id']}",
        json={"filter": {"bundle_versions": ["1.0.0"]}, "description": "upgraded"},
        headers=fleet.operator,
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["size"], changed.json()["description"]) == (1, "upgraded")
    assert await _members(fleet, group["id"]) == [a.device_id]
    listed = await fleet.get("/api/v1/groups")
    assert [g["name"] for g in listed["items"]] == ["beta", "site-a rpi4"]


async def test_static_groups_hold_listed_devices(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    a, b, c = await fleet.device(), await fleet.device(), await fleet.device()
    group = await _post(
        fleet, "/api/v1/groups", {"name": "pilot", "kind": "static", "device_ids": [a.device_id]}, 201
    )
    assert group["size"] == 1
    added = await _post(
        fleet, f"/api/v1/groups/{group['id']}/members", {"device_ids": [a.device_id, b.device_id]}, 200
    )
    assert added["size"] == 2
    removed = await fleet.api.client.delete(
        f"/api/v1/groups/{group['id']}/members/{a.device_id}", headers=fleet.operator
    )
    assert removed.status_code == 204
    assert await _members(fleet, group["id"]) == [b.device_id]
    again = await fleet.api.client.delete(
        f"/api/v1/groups/{group['id']}/members/{a.device_id}", headers=fleet.operator
    )
    assert again.status_code == 404
    # A revoked device stays listed but is no member: groups hold active devices only.
    await _set(fleet, b.device_id, state="revoked")
    assert await _members(fleet, group["id"]) == []
    await _set(fleet, b.device_id, state="active")

    # A plain deployment to the group targets its members now.
    bundle = await fleet.bundle("1.0.0")
    deployed = await _post(
        fleet, "/api/v1/deployments", {"bundle_id": bundle["id"], "group_id": group["id"]}, 201
    )
    assert [t["device_id"] for t in deployed["targets"]] == [b.device_id]
    empty = await _post(fleet, "/api/v1/groups", {"name": "empty", "kind": "static"}, 201)
    refused = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "group_id": empty["id"]},
        headers=fleet.operator,
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "no_targets")
    assert c.device_id not in await _members(fleet, group["id"])

    deleted = await fleet.api.client.delete(f"/api/v1/groups/{group['id']}", headers=fleet.operator)
    assert deleted.status_code == 204
    gone = await fleet.api.client.get(f"/api/v1/groups/{group['id']}", headers=fleet.viewer)
    assert gone.status_code == 404
    async with fleet.engine.connect() as conn:
        actions = (
            await conn.execute(sa.select(AuditEntry.action, AuditEntry.outcome).order_by(AuditEntry.id))  # type: ignore[arg-type]  # SQLModel column
        ).all()
    assert ("group.members.remove", "failed") in actions
    assert ("group.delete", "success") in actions


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "g", "kind": "dynamic", "filter": {}}, 422),  # an empty filter would match everything
        ({"name": "g", "kind": "dynamic", "filter": {"tag": ["x"]}}, 422),  # unknown criterion
        ({"name": "g", "kind": "dynamic", "filter": {"status": ["sleeping"]}}, 422),
        ({"name": "g", "kind": "dynamic", "filter": {"tags_any": []}}, 422),
        ({"name": "g", "kind": "dynamic", "filter": {"device_types": ["a\nb"]}}, 422),
        ({"name": "g", "kind": "dynamic"}, 422),  # no filter
        ({"name": "g", "kind": "static", "filter": {"tags_any": ["x"]}}, 422),
        ({"name": "g", "kind": "nested", "filter": {"tags_any": ["x"]}}, 422),
        ({"name": "", "kind": "static"}, 422),
        ({"name": "g", "kind": "static", "device_ids": ["no-such-device"]}, 404),
    ],
)
async def test_bad_groups_are_refused(pg_fleet: Fleet, body: dict[str, Any], status: int) -> None:
    response = await pg_fleet.api.client.post("/api/v1/groups", json=body, headers=pg_fleet.operator)
    assert response.status_code == status, response.text
    assert (await pg_fleet.get("/api/v1/groups"))["total"] == 0


async def test_conflicts_and_roles(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    device = await fleet.device(tags=["x"])
    dynamic = await _post(
        fleet, "/api/v1/groups", {"name": "x", "kind": "dynamic", "filter": {"tags_any": ["x"]}}, 201
    )
    static = await _post(fleet, "/api/v1/groups", {"name": "s", "kind": "static"}, 201)
    assert (
        await fleet.api.client.post(
            "/api/v1/groups", json={"name": "x", "kind": "static"}, headers=fleet.operator
        )
    ).status_code == 409
    renamed = await fleet.api.client.patch(
        f"/api/v1/groups/{static['id']}", json={"name": "x"}, headers=fleet.operator
    )
    assert renamed.status_code == 409
    filtered = await fleet.api.client.patch(
        f"/api/v1/groups/{static['id']}", json={"filter": {"tags_any": ["x"]}}, headers=fleet.operator
    )
    assert filtered.status_code == 409
    members = await fleet.api.client.post(
        f"/api/v1/groups/{dynamic['id']}/members",
        json={"device_ids": [device.device_id]},
        headers=fleet.operator,
    )
    assert members.status_code == 409
    viewer = await fleet.api.client.post(
        "/api/v1/groups", json={"name": "v", "kind": "static"}, headers=fleet.viewer
    )
    assert viewer.status_code == 403
    tags = await fleet.api.client.put(
        f"/api/v1/devices/{device.device_id}/tags", json={"tags": ["x"] * 33}, headers=fleet.operator
    )
    assert tags.status_code == 422
    missing = await fleet.api.client.put(
        "/api/v1/devices/nope/tags", json={"tags": []}, headers=fleet.operator
    )
    assert missing.status_code == 404

    # A group a running rollout selects by cannot be deleted.
    bundle = await fleet.bundle("1.0.0")
    rollout = {"phases": [{"percent": 100}], "require_approval": True}
    await _post(
        fleet,
        "/api/v1/deployments",
        {"bundle_id": bundle["id"], "group_id": dynamic["id"], "rollout": rollout},
        201,
    )
    refused = await fleet.api.client.delete(f"/api/v1/groups/{dynamic['id']}", headers=fleet.operator)
    assert refused.status_code == 409
    assert "rollouts in progress" in refused.json()["error"]["message"]
