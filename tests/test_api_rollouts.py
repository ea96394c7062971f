"""Phased rollouts against a real Mosquitto and database, with device reports stored as ingest stores
them: phases and approval, the dry run, abort and revert, the rate limit, the maintenance window,
unhealthy devices within the soak time, cancel, and 4xx on bad strategies."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kernex.api.fleet_metrics import FleetGauges
from kernex.api.rollouts import plan
from kernex.api.rollouts.schemas import MaintenanceWindow, Phase
from kernex.protocol.topics import CommandKind
from kernex.storage.models import AuditEntry, Device, DeviceCommand, Rollout
from tests.fixtures.broker import DeviceIdentity, RunningBroker
from tests.fixtures.fleet import Fleet, open_fleet, wait_until

ENGINE_INTERVAL_S = 0.2  # the rollout engine's pace here: phases follow reports within a blink
PACED_S = 30.0  # generous bound for rate-limited and windowed waits on a loaded host


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, database_url, broker, rollout_interval_s=ENGINE_INTERVAL_S) as opened:
        yield opened


@pytest.fixture
async def pg_fleet(pg_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    """For tests whose subject is not the database."""
    async with open_fleet(tmp_path, pg_url, broker, rollout_interval_s=ENGINE_INTERVAL_S) as opened:
        yield opened


async def _create(fleet: Fleet, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
    response = await fleet.api.client.post("/api/v1/deployments", json=body, headers=fleet.operator)
    assert response.status_code == expect, response.text
    result: dict[str, Any] = response.json()
    return result


async def _rollout(fleet: Fleet, deployment_id: str) -> dict[str, Any]:
    return await fleet.get(f"/api/v1/deployments/{deployment_id}/rollout")


async def _until(
    fleet: Fleet, deployment_id: str, what: str, check: Any, timeout: float = 15.0
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        rollout = await _rollout(fleet, deployment_id)
        return rollout if check(rollout) else None

    return await wait_until(reached, what, timeout=timeout)


async def _succeed(
    fleet: Fleet, devices: list[DeviceIdentity], stage: str = "succeeded", **extra: Any
) -> None:
    for device in devices:
        await fleet.report(device, await fleet.command(device, CommandKind.DEPLOY), stage, **extra)


def _events(rollout: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(t["event"], t["phase"]) for t in rollout["transitions"]]


async def _commands(fleet: Fleet, deployment_id: str) -> list[DeviceCommand]:
    async with fleet.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(DeviceCommand).where(DeviceCommand.deployment_id == deployment_id)  # type: ignore[arg-type]  # SQLModel column
        )
        return [DeviceCommand.model_validate(r._mapping) for r in rows]


async def test_phases_follow_success_and_approval(fleet: Fleet) -> None:
    devices = [await fleet.device(tags=["rollout"]) for _ in range(10)]
    by_id = {d.device_id: d for d in devices}
    bundle = await fleet.bundle("2.0.0")
    strategy = {"phases": [{"name": "canary", "percent": 20}, {"percent": 100}], "require_approval": True}
    body = {"bundle_id": bundle["id"], "tags": ["rollout"], "rollout": strategy}

    dry = await fleet.api.client.post("/api/v1/deployments/preview", json=body, headers=fleet.viewer)
    assert dry.status_code == 200, dry.text
    planned = dry.json()
    assert planned["selected"] == 10
    assert [len(p["devices"]) for p in planned["phases"]] == [2, 8]
    assert (await fleet.get("/api/v1/deployments"))["total"] == 0, "a dry run creates nothing"

    created = await _create(fleet, body)
    assert created["rollout"]["state"] == "running"
    assert created["status"] == "pending"
    canary = sorted(t["device_id"] for t in created["targets"])
    assert canary == planned["phases"][0]["devices"], "the dry run shows what the rollout does"
    assert {t["command_state"] for t in created["targets"]} == {"published"}

    await _succeed(fleet, [by_id[d] for d in canary])
    waiting = await _until(
        fleet, created["id"], "awaiting approval", lambda r: r["state"] == "awaiting_approval"
    )
    assert [p["state"] for p in waiting["phases"]] == ["passed", "waiting"]
    assert waiting["phases"][0]["counts"] == {"succeeded": 2}
    detail = await fleet.get(f"/api/v1/deployments/{created['id']}")
    assert detail["status"] == "in_progress", "a rollout between phases is not finished"

    refused = await fleet.api.client.post(
        f"/api/v1/deployments/{created['id']}/approve", headers=fleet.viewer
    )
    assert refused.status_code == 403
    approved = await fleet.api.client.post(
        f"/api/v1/deployments/{created['id']}/approve", headers=fleet.operator
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["phases"][1]["total"] == 8
    again = await fleet.api.client.post(
        f"/api/v1/deployments/{created['id']}/approve", headers=fleet.operator
    )
    assert again.status_code == 409

    rest = [d for d in devices if d.device_id not in canary]
    await _succeed(fleet, rest)
    done = await _until(fleet, created["id"], "completed", lambda r: r["state"] == "completed")
    assert _events(done) == [
        ("created", None),
        ("phase_started", 0),
        ("phase_passed", 0),
        ("awaiting_approval", 0),
        ("approved", 1),
        ("phase_started", 1),
        ("phase_passed", 1),
        ("completed", 1),
    ]
    assert done["transitions"][4]["actor"] == "user:operator-user"
    final = await fleet.get(f"/api/v1/deployments/{created['id']}")
    assert (final["status"], final["counts"]) == ("succeeded", {"succeeded": 10})
    async with fleet.engine.connect() as conn:
        audited = (
            await conn.execute(
                sa.select(AuditEntry.action, AuditEntry.outcome)
                .where(AuditEntry.target == f"deployment:{created['id']}")  # type: ignore[arg-type]  # SQLModel column
                .order_by(AuditEntry.id)  # type: ignore[arg-type]  # SQLModel column
            )
        ).all()
    succeeded = [a for a, outcome in audited if a.startswith("rollout.") and outcome == "success"]
    assert succeeded == [f"rollout.{e}" for e, _ in _events(done)[1:]]
    assert ("rollout.approved", "failed") in audited, "the refused second approval"


async def test_failures_abort_and_revert_updated_devices(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    devices = [await fleet.device(tags=["abort"]) for _ in range(6)]
    v1, v2 = await fleet.bundle("1.0.0"), await fleet.bundle("2.0.0")
    first = await _create(fleet, {"bundle_id": v1["id"], "tags": ["abort"]})
    await _succeed(fleet, devices)
    assert (await fleet.get(f"/api/v1/deployments/{first['id']}"))["status"] == "succeeded"

    strategy = {
        "phases": [{"devices": 3}, {"percent": 100}],
        "abort": {"after_failures": 2, "rollback": True},
    }
    created = await _create(fleet, {"bundle_id": v2["id"], "tags": ["abort"], "rollout": strategy})
    canary = {t["device_id"] for t in created["targets"]}
    assert len(canary) == 3
    ok, bad_one, bad_two = [d for d in devices if d.device_id in canary]
    await _succeed(fleet, [ok])
    await _succeed(fleet, [bad_one, bad_two], stage="failed", error="install.sh exited 4")

    aborted = await _until(fleet, created["id"], "aborted", lambda r: r["state"] == "aborted")
    assert aborted["stop_reason"] == "2 devices failed (abort after 2)"
    assert [p["state"] for p in aborted["phases"]] == ["stopped", "waiting"]
    assert aborted["phases"][1]["total"] == 0, "no device outside the canary started"
    reverted = await _until(
        fleet, created["id"], "reverted", lambda r: any(t["event"] == "reverted" for t in r["transitions"])
    )
    revert = next(t for t in reverted["transitions"] if t["event"] == "reverted")
    assert revert["details"]["devices"] == [ok.device_id]
    rollback_id = revert["details"]["rollback_deployments"][v1["id"]]
    rollback = await fleet.get(f"/api/v1/deployments/{rollback_id}")
    assert (rollback["rollback"], rollback["bundle_version"], rollback["created_by"]) == (
        True,
        "1.0.0",
        "system:rollout",
    )
    command = await fleet.command(ok, CommandKind.DEPLOY)
    assert command.deploy is not None
    assert (command.deploy.version, command.deploy.rollback) == ("1.0.0", True)
    for untouched in (d for d in devices if d.device_id not in canary):
        old = await fleet.command(untouched, CommandKind.DEPLOY)
        assert old.deploy is not None
        assert old.deploy.deployment_id == first["id"], "never sent v2"

    # A canary device that reported late still counts, and the deployment's aggregate is final.
    detail = await fleet.get(f"/api/v1/deployments/{created['id']}")
    assert detail["rollout"]["stop_reason"] == aborted["stop_reason"]
    assert detail["status"] == "partially_failed"
    listed = await fleet.get("/api/v1/deployments", status="partially_failed")
    assert [d["id"] for d in listed["items"]] == [created["id"]]
    # Alerting sees it: the API's fleet gauges count rollouts by state.
    registry = CollectorRegistry()
    await FleetGauges(registry).refresh(fleet.engine)
    assert registry.get_sample_value("kernex_rollouts", {"state": "aborted"}) == 1
    assert registry.get_sample_value("kernex_deployment_targets", {"status": "cancelled"}) is None


async def test_failure_share_and_phase_below_threshold(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    devices = [await fleet.device(tags=["share"]) for _ in range(4)]
    bundle = await fleet.bundle("1.0.0")
    strategy = {"phases": [{"percent": 50}, {"percent": 100}], "success_threshold_percent": 100}
    created = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["share"], "rollout": strategy})
    canary = [d for d in devices if d.device_id in {t["device_id"] for t in created["targets"]}]
    await _succeed(fleet, canary[:1])
    await _succeed(fleet, canary[1:], stage="rolled_back", error="health check failed")
    stopped = await _until(fleet, created["id"], "stopped", lambda r: r["state"] == "aborted")
    assert "below the 100% success threshold" in stopped["stop_reason"]

    more = [await fleet.device(tags=["pct"]) for _ in range(4)]
    strategy = {
        "phases": [{"percent": 100}],
        "abort": {"after_failure_percent": 50, "min_finished": 2},
    }
    created = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["pct"], "rollout": strategy})
    await _succeed(fleet, more[:1], stage="failed", error="no space")
    rollout = await _rollout(fleet, created["id"])
    assert rollout["state"] == "running", "one finished device is under min_finished"
    await _succeed(fleet, more[1:2])
    aborted = await _until(fleet, created["id"], "aborted on share", lambda r: r["state"] == "aborted")
    assert aborted["stop_reason"] == "1 of 2 finished devices failed (50%, abort at 50%)"
    detail = await fleet.get(f"/api/v1/deployments/{created['id']}")
    assert detail["counts"] == {"failed": 1, "succeeded": 1, "cancelled": 2}


async def test_rate_limit_paces_commands(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    for _ in range(5):
        await fleet.device(tags=["paced"])
    bundle = await fleet.bundle("1.0.0")
    period_s = 2
    strategy = {"phases": [{"percent": 100}], "rate_limit": {"devices": 2, "period_s": period_s}}
    created = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["paced"], "rollout": strategy})
    assert created["counts"] == {"pending": 2, "queued": 3}

    async def all_issued() -> list[DeviceCommand] | None:
        issued = await _commands(fleet, created["id"])
        return issued if len(issued) == 5 else None

    issued = sorted(
        await wait_until(all_issued, "every command issued", timeout=PACED_S), key=lambda c: c.issued_at
    )
    # Never more than 2 in any period: the third after the first is at least a period later.
    for first, third in itertools.pairwise(issued[::2]):
        assert third.issued_at - first.issued_at >= timedelta(seconds=period_s), [c.issued_at for c in issued]
    assert issued[-1].issued_at - issued[0].issued_at >= timedelta(seconds=2 * period_s)


async def test_maintenance_window_gates_and_expires_commands(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    for _ in range(3):
        await fleet.device(tags=["window"])
    bundle = await fleet.bundle("1.0.0")
    # A window opening a few seconds from now, for a few seconds (UTC times of day, to the second).
    opens = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    closes = opens + timedelta(seconds=4)
    window = {"start": opens.time().isoformat(), "end": closes.time().isoformat()}
    strategy = {"phases": [{"percent": 100}], "maintenance_window": window}
    body = {"bundle_id": bundle["id"], "tags": ["window"], "rollout": strategy}
    dry = await fleet.api.client.post("/api/v1/deployments/preview", json=body, headers=fleet.viewer)
    assert dry.json()["maintenance_window_open"] is False
    created = await _create(fleet, body)
    if datetime.now(UTC) < opens:  # the host may be slow enough to reach the window already
        assert created["counts"] == {"queued": 3}
        assert not await _commands(fleet, created["id"])

    async def issued() -> list[DeviceCommand] | None:
        rows = await _commands(fleet, created["id"])
        return rows if len(rows) == 3 else None

    commands = await wait_until(issued, "commands inside the window", timeout=PACED_S)
    for command in commands:
        assert opens <= command.issued_at < closes
        assert command.expires_at == closes, "a command never outlives its window"

    # Nobody took them up: once the window closed they expired and the targets wait for the next.
    async def requeued() -> dict[str, Any] | None:
        detail = await fleet.get(f"/api/v1/deployments/{created['id']}")
        return detail if detail["counts"] == {"queued": 3} else None

    await wait_until(requeued, "targets queued again after the window", timeout=PACED_S)


async def test_unhealthy_device_within_soak_aborts(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    devices = [await fleet.device(tags=["soak"]) for _ in range(4)]
    bundle = await fleet.bundle("1.0.0")
    strategy = {
        "phases": [{"devices": 1}, {"percent": 100}],
        "soak_s": 600,
        "abort": {"after_unhealthy": 1},
    }
    created = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["soak"], "rollout": strategy})
    canary = next(d for d in devices if d.device_id == created["targets"][0]["device_id"])
    await _succeed(fleet, [canary])
    soaking = await _until(fleet, created["id"], "soaking", lambda r: r["phases"][0]["state"] == "soaking")
    assert soaking["state"] == "running"
    # The device drops off after updating, as the liveness sweeper or its Last Will records it.
    async with fleet.engine.begin() as conn:
        await conn.execute(sa.update(Device).where(Device.id == canary.device_id).values(status="offline"))  # type: ignore[arg-type]  # SQLModel column
    aborted = await _until(fleet, created["id"], "aborted", lambda r: r["state"] == "aborted")
    assert "went offline or unhealthy within the soak time" in aborted["stop_reason"]
    assert canary.device_id in aborted["stop_reason"]


async def test_cancel_stops_a_rollout(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    for _ in range(3):
        await fleet.device(tags=["cancel"])
    bundle = await fleet.bundle("1.0.0")
    strategy = {"phases": [{"percent": 100}], "rate_limit": {"devices": 1, "period_s": 3600}}
    created = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["cancel"], "rollout": strategy})
    assert created["counts"] == {"pending": 1, "queued": 2}
    cancelled = await fleet.api.client.post(
        f"/api/v1/deployments/{created['id']}/cancel", headers=fleet.operator
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["counts"] == {"cancelled": 3}
    rollout = await _rollout(fleet, created["id"])
    assert (rollout["state"], rollout["stop_reason"]) == ("cancelled", "cancelled by user:operator-user")
    assert _events(rollout)[-1] == ("cancelled", None)


@pytest.mark.parametrize(
    "strategy",
    [
        {"phases": []},
        {"phases": [{"percent": 50}, {"percent": 10}]},  # cumulative percentages must grow
        {"phases": [{"percent": 0}]},
        {"phases": [{"percent": 10, "devices": 2}]},
        {"phases": [{}]},
        {"phases": [{"percent": 100}], "success_threshold_percent": 0},
        {"phases": [{"percent": 100}], "rate_limit": {"devices": 0}},
        {"phases": [{"percent": 100}], "maintenance_window": {"start": "02:00", "end": "02:00"}},
        {"phases": [{"percent": 100}], "maintenance_window": {"start": "02:00", "end": "25:00"}},
        {
            "phases": [{"percent": 100}],
            "maintenance_window": {"start": "02:00", "end": "03:00", "weekdays": [7]},
        },
        {"phases": [{"percent": 100}], "abort": {"after_failure_percent": 120}},
        {"phases": [{"percent": 100}], "abort": {"after_failures": 1, "typo": True}},
    ],
)
async def test_bad_strategies_are_refused(pg_fleet: Fleet, strategy: dict[str, Any]) -> None:
    fleet = pg_fleet
    await fleet.device(tags=["bad"])
    bundle = await fleet.bundle("1.0.0")
    response = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "tags": ["bad"], "rollout": strategy},
        headers=fleet.operator,
    )
    assert response.status_code == 422, response.text
    assert (await fleet.get("/api/v1/deployments"))["total"] == 0


async def test_other_refusals(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    device = await fleet.device(tags=["r"])
    bundle = await fleet.bundle("1.0.0")
    rollout = {"phases": [{"percent": 100}]}
    both = await fleet.api.client.post(
        "/api/v1/deployments",
        json={"bundle_id": bundle["id"], "tags": ["r"], "rollout": rollout, "supersede": True},
        headers=fleet.operator,
    )
    assert both.status_code == 422
    plain = await _create(fleet, {"bundle_id": bundle["id"], "device_ids": [device.device_id]})
    not_rollout = await fleet.api.client.get(
        f"/api/v1/deployments/{plain['id']}/rollout", headers=fleet.viewer
    )
    assert not_rollout.status_code == 404
    approve = await fleet.api.client.post(
        f"/api/v1/deployments/{plain['id']}/approve", headers=fleet.operator
    )
    assert approve.status_code == 404
    no_group = await fleet.api.client.post(
        "/api/v1/deployments/preview",
        json={"bundle_id": bundle["id"], "group_id": "nope", "rollout": rollout},
        headers=fleet.viewer,
    )
    assert no_group.status_code == 404
    # A busy device is skipped by a rollout, and the dry run says so.
    busy = await fleet.api.client.post(
        "/api/v1/deployments/preview",
        json={"bundle_id": bundle["id"], "tags": ["r"], "rollout": rollout},
        headers=fleet.viewer,
    )
    assert busy.json()["busy"] == [device.device_id]
    assert busy.json()["phases"][0]["devices"] == []


@pytest.mark.parametrize(
    ("phases", "selected", "expected"),
    [
        # 1 % of 20 rounds up to one device; 10 % to 2 in all; 50 % to 10; 100 % takes the rest.
        ([1, 10, 50, 100], 20, [1, 1, 8, 10]),
        # 10 % of 30 is exactly 3, not 4 (float rounding).
        ([10, 100], 30, [3, 27]),
        # Batches, then the rest by percentage; a batch larger than what is left takes what is left.
        ([{"devices": 2}, {"devices": 50}, 100], 10, [2, 8, 0]),
        ([{"devices": 3}, 50, 100], 10, [3, 2, 5]),
        # A percentage already covered by earlier batches starts nobody.
        ([{"devices": 6}, 50, 100], 10, [6, 0, 4]),
    ],
)
def test_phase_sizes(phases: list[Any], selected: int, expected: list[int]) -> None:
    steps = [Phase(percent=p) if isinstance(p, int) else Phase(**p) for p in phases]
    ids = [f"d{n:03d}" for n in range(selected)]
    planned = plan.preview(steps, selected=ids, busy=set())
    assert [len(p) for p in planned] == expected
    flat = [d for p in planned for d in p]
    assert len(flat) == len(set(flat)), "no device in two phases"


def test_busy_devices_are_skipped_and_new_devices_join_later_phases() -> None:
    ids = [f"d{n}" for n in range(10)]
    first = plan.pick(Phase(percent=20), selected=ids, covered=[], busy={"d0"})
    assert first == ["d1", "d2"]
    # Two devices joined the selection since: 100 % covers them too.
    rest = plan.pick(Phase(percent=100), selected=[*ids, "e1", "e2"], covered=first, busy=set())
    assert rest == [d for d in sorted([*ids, "e1", "e2"]) if d not in first]


@pytest.mark.parametrize(
    ("window", "now", "closes"),
    [
        ({"start": "02:00", "end": "04:00"}, "2026-11-30T03:00:00", "2026-11-30T04:00:00"),
        ({"start": "02:00", "end": "04:00"}, "2026-11-30T04:00:00", None),  # the end is outside
        ({"start": "02:00", "end": "04:00"}, "2026-11-30T01:59:59", None),
        # Past midnight: opened the day before.
        ({"start": "22:00", "end": "02:00"}, "2026-11-30T01:00:00", "2026-11-30T02:00:00"),
        ({"start": "22:00", "end": "02:00"}, "2026-11-30T23:00:00", "2026-12-01T02:00:00"),
        # Weekdays are the days it opens on: 2026-11-30 is a Monday (0).
        ({"start": "22:00", "end": "02:00", "weekdays": [6]}, "2026-11-30T01:00:00", "2026-11-30T02:00:00"),
        ({"start": "22:00", "end": "02:00", "weekdays": [6]}, "2026-11-30T23:00:00", None),
        # An offset is converted to UTC: 03:00+02:00 is 01:00 UTC.
        ({"start": "03:00+02:00", "end": "04:00+02:00"}, "2026-11-30T01:30:00", "2026-11-30T02:00:00"),
    ],
)
def test_maintenance_window(window: dict[str, Any], now: str, closes: str | None) -> None:
    parsed = MaintenanceWindow.model_validate(window)
    at = datetime.fromisoformat(now).replace(tzinfo=UTC)
    expected = datetime.fromisoformat(closes).replace(tzinfo=UTC) if closes else None
    assert parsed.closes_at(at) == expected


async def test_a_broken_rollout_does_not_stop_the_others(pg_fleet: Fleet) -> None:
    fleet = pg_fleet
    broken_device, good_device = await fleet.device(tags=["broken"]), await fleet.device(tags=["good"])
    bundle = await fleet.bundle("1.0.0")
    strategy = {"phases": [{"percent": 100}]}
    broken = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["broken"], "rollout": strategy})
    # A fault: the stored strategy no longer validates, so every step of that rollout raises.
    async with fleet.engine.begin() as conn:
        await conn.execute(
            sa.update(Rollout).where(Rollout.deployment_id == broken["id"]).values(strategy={"phases": "?"})  # type: ignore[arg-type]  # SQLModel column
        )
    good = await _create(fleet, {"bundle_id": bundle["id"], "tags": ["good"], "rollout": strategy})
    await _succeed(fleet, [broken_device, good_device])
    await _until(fleet, good["id"], "the healthy rollout completes", lambda r: r["state"] == "completed")
