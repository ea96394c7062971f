"""Issue #7 end to end: `kernex up`, 20 simulated agents (kernex.agent.simulator, in this process),
bundles built and uploaded with the CLI, phased rollouts to a dynamic group through the real API.

One fleet goes through three rollouts in turn: a canary that succeeds and proceeds (paced by a
rate limit, soaked on real heartbeats); a canary that fails past its threshold, aborts, and has
its updated devices reverted to the bundle they ran before; and a rollout awaiting approval while
a device registers, which the dynamic group picks up for the next phase. Bundle scripts keep a
journal in each device's state dir, so each device's record of what ran is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.async_api import Browser, expect

from kernex.agent.agent import Agent
from kernex.agent.settings import AgentSettings
from kernex.agent.simulator import SIMULATED_DEVICE_TYPE, Simulator
from kernex.kit.backoff import Backoff
from kernex.storage.database import create_engine
from kernex.storage.models import DeviceCommand
from tests.fixtures.platform import ADMIN_PASSWORD, ADMIN_USERNAME, Platform, run_platform, wait_for
from tests.test_dashboard_ui import browser, watch_errors
from tests.test_e2e_deployments import SETTLE_S, Api, upload_bundle

__all__ = ["browser"]  # headless Chromium, shared with the dashboard walk

FLEET = 20
ROLLOUT_S = 120  # a whole rollout (registration aside) on a loaded 2-core machine
ENV = {"KERNEX_ROLLOUT_INTERVAL_S": "0.5"}  # phases follow reports within half a second
LIVE_MS = 30_000  # a change shows on the page within the events stream's pace on a loaded host


@pytest.fixture
async def platform(pg_url: str, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_platform(tmp_path, pg_url, env=ENV) as running:
        yield running
    assert running.proc.returncode == 0, running.log()[-3000:]


@pytest.fixture
async def simulator(platform: Platform, tmp_path: Path) -> AsyncIterator[Simulator]:
    settings = AgentSettings(api_url=platform.api_url, state_dir=tmp_path / "sim", heartbeat_interval_s=1)
    fleet = Simulator(settings, FLEET, start_spread_s=2)
    task = asyncio.create_task(fleet.run())
    try:
        yield fleet
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert not fleet.failures


def _journal(agent: Agent) -> list[str]:
    path = agent.settings.state_dir / "journal"
    return path.read_text().splitlines() if path.exists() else []


async def _until(api: Api, deployment_id: str, what: str, check: Any) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        rollout = await api.call("GET", f"/api/v1/deployments/{deployment_id}/rollout")
        return rollout if check(rollout) else None

    return await wait_for(reached, ROLLOUT_S, what, log=api.platform)


def _started(rollout: dict[str, Any]) -> list[int]:
    return [t["phase"] for t in rollout["transitions"] if t["event"] == "phase_started"]


async def _issued(platform: Platform, deployment_id: str) -> list[DeviceCommand]:
    engine = create_engine(platform.database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(DeviceCommand).where(DeviceCommand.deployment_id == deployment_id)  # type: ignore[arg-type]  # SQLModel column
            )
            return sorted((DeviceCommand.model_validate(r._mapping) for r in rows), key=lambda c: c.issued_at)
    finally:
        await engine.dispose()


async def test_phased_rollouts_across_twenty_simulated_devices(
    platform: Platform, simulator: Simulator, tmp_path: Path
) -> None:
    api = Api(platform)

    async def all_online() -> bool:
        page = await api.call("GET", "/api/v1/devices", params={"status": "online"})
        return bool(page["total"] == FLEET and len(simulator.agents) == FLEET)

    await wait_for(all_online, SETTLE_S, f"{FLEET} simulated devices online", log=platform)
    agents = {agent.device_id: agent for agent in simulator.agents}
    group = await api.call(
        "POST",
        "/api/v1/groups",
        json={"name": "simulated", "kind": "dynamic", "filter": {"device_types": [SIMULATED_DEVICE_TYPE]}},
        expect=201,
    )
    assert group["size"] == FLEET, "each agent reported its device type at registration"
    v1, v2, v3 = (upload_bundle(platform, tmp_path, v) for v in ("1.0.0", "2.0.0", "3.0.0"))

    # 1. A 10 % canary succeeds, soaks on healthy heartbeats, and the rollout proceeds to 50 % and
    #    100 %, starting at most 5 devices every 2 seconds.
    paced = {"devices": 5, "period_s": 2}
    strategy = {
        "phases": [{"name": "canary", "percent": 10}, {"percent": 50}, {"percent": 100}],
        "soak_s": 1,
        "rate_limit": paced,
        "abort": {"after_failures": 1},
    }
    first = await api.call(
        "POST",
        "/api/v1/deployments",
        json={"bundle_id": v1, "group_id": group["id"], "rollout": strategy},
        expect=201,
    )
    done = await _until(api, first["id"], "the first rollout completes", lambda r: r["state"] == "completed")
    assert _started(done) == [0, 1, 2]
    assert [(p["total"], p["counts"]) for p in done["phases"]] == [
        (2, {"succeeded": 2}),
        (8, {"succeeded": 8}),
        (10, {"succeeded": 10}),
    ]
    assert (await api.settled(first["id"], "succeeded"))["counts"] == {"succeeded": FLEET}
    assert all(_journal(agent) == ["install 1.0.0"] for agent in agents.values())
    issued = await _issued(platform, first["id"])
    assert len(issued) == FLEET
    for earlier, later in zip(issued, issued[paced["devices"] :], strict=False):
        assert later.issued_at - earlier.issued_at >= timedelta(seconds=paced["period_s"]), "rate limit"

    # 2. A 20 % canary (4 devices) where 2 fail: the rollout aborts, no other device gets 2.0.0, and
    #    the 2 canary devices that updated are rolled back to 1.0.0 automatically.
    strategy = {
        "phases": [{"name": "canary", "percent": 20}, {"percent": 100}],
        "abort": {"after_failures": 2, "rollback": True},
    }
    body = {"bundle_id": v2, "group_id": group["id"], "rollout": strategy}
    dry = await api.call("POST", "/api/v1/deployments/preview", json=body)
    canary = dry["phases"][0]["devices"]
    assert len(canary) == 4
    failing, updating = canary[:2], canary[2:]
    for device_id in failing:
        (agents[device_id].settings.state_dir / "fail-2.0.0").touch()
    second = await api.call("POST", "/api/v1/deployments", json=body, expect=201)
    assert sorted(t["device_id"] for t in second["targets"]) == canary
    aborted = await _until(api, second["id"], "the second rollout aborts", lambda r: r["state"] == "aborted")
    assert aborted["stop_reason"] == "2 devices failed (abort after 2)"
    reverted = await _until(
        api,
        second["id"],
        "the updated canary devices reverted",
        lambda r: (
            sorted(d for t in r["transitions"] if t["event"] == "reverted" for d in t["details"]["devices"])
            == sorted(updating)
        ),
    )
    assert _started(reverted) == [0]
    for device_id in updating:
        await api.running(device_id, "1.0.0")
        assert _journal(agents[device_id]) == ["install 1.0.0", "install 2.0.0", "install 1.0.0"]
    for device_id in failing:
        assert _journal(agents[device_id]) == ["install 1.0.0", "install-failed 2.0.0", "rollback 2.0.0"]
    for device_id, agent in agents.items():
        if device_id not in canary:
            assert _journal(agent) == ["install 1.0.0"], "2.0.0 never reached past the canary"
    for rollback_id in {
        d
        for t in reverted["transitions"]
        if t["event"] == "reverted"
        for d in t["details"]["rollback_deployments"].values()
    }:
        await api.settled(rollback_id, "succeeded")

    # 3. Awaiting approval after its first half, the rollout of 3.0.0 meets a device registered
    #    meanwhile: the dynamic group is evaluated as the next phase starts, so it is included.
    strategy = {"phases": [{"percent": 50}, {"percent": 100}], "require_approval": True}
    third = await api.call(
        "POST",
        "/api/v1/deployments",
        json={"bundle_id": v3, "group_id": group["id"], "rollout": strategy},
        expect=201,
    )
    await _until(api, third["id"], "the first half done", lambda r: r["state"] == "awaiting_approval")
    late = Agent(
        AgentSettings(
            api_url=platform.api_url,
            state_dir=tmp_path / "late",
            heartbeat_interval_s=1,
            name="late",
            device_type=SIMULATED_DEVICE_TYPE,
        ),
        reconnect_backoff=Backoff(initial_s=0.2, max_s=1.0),
    )
    late_task = asyncio.create_task(late.run())
    try:

        async def joined() -> bool:
            members = await api.call("GET", f"/api/v1/groups/{group['id']}/devices")
            return late.device_id is not None and late.device_id in [d["id"] for d in members["items"]]

        await wait_for(joined, SETTLE_S, "the late device in the group", log=platform)
        approved = await api.call("POST", f"/api/v1/deployments/{third['id']}/approve")
        assert approved["phases"][1]["total"] == FLEET + 1 - 10
        finished = await _until(
            api, third["id"], "the third rollout completes", lambda r: r["state"] == "completed"
        )
        assert [p["counts"] for p in finished["phases"]] == [{"succeeded": 10}, {"succeeded": 11}]
        assert late.device_id is not None
        await api.running(late.device_id, "3.0.0")
        assert (late.settings.state_dir / "journal").read_text().splitlines() == ["install 3.0.0"]
    finally:
        late_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await late_task


ROLLOUT_SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "rollouts"


async def test_dashboard_shows_phases_approval_and_why_a_rollout_stopped(
    sqlite_url: str, tmp_path: Path, browser: Browser
) -> None:
    ROLLOUT_SHOTS.mkdir(parents=True, exist_ok=True)
    async with run_platform(tmp_path, sqlite_url, env=ENV) as platform:
        settings = AgentSettings(api_url=platform.api_url, state_dir=tmp_path / "sim", heartbeat_interval_s=1)
        fleet = Simulator(settings, 3, start_spread_s=1)
        task = asyncio.create_task(fleet.run())
        try:
            await _dashboard_walk(platform, browser, tmp_path)
        finally:
            task.cancel()
            await asyncio.wait({task})
    assert platform.proc.returncode == 0, platform.log()[-3000:]


async def _dashboard_walk(platform: Platform, browser: Browser, tmp_path: Path) -> None:
    api = Api(platform)

    async def all_online() -> bool:
        page = await api.call("GET", "/api/v1/devices", params={"status": "online"})
        return bool(page["total"] == 3)

    await wait_for(all_online, SETTLE_S, "three simulated devices online", log=platform)
    upload_bundle(platform, tmp_path, "1.0.0")
    strategy = {"phases": [{"name": "canary", "devices": 1}, {"percent": 100}], "require_approval": True}
    devices = (await api.call("GET", "/api/v1/devices"))["items"]

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors = watch_errors(page)
    await page.goto(platform.api_url + "/ui/")
    await page.get_by_label("Username").fill(ADMIN_USERNAME)
    await page.get_by_label("Password").fill(ADMIN_PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Fleet overview")).to_be_visible()

    # The rollout is created in the dashboard's form: a canary of one device, then the rest.
    await page.goto(f"{platform.api_url}/ui/#/deployments/new")
    await page.get_by_role("button", name="Select all shown").click()
    await page.get_by_label("Phases", exact=True).fill("1, 10 percent")
    await page.get_by_role("button", name="Deploy").click()
    await expect(page.get_by_role("alert")).to_contain_text("a percentage (10%) or a number of devices")
    await page.get_by_label("Phases", exact=True).fill("1, 100%")
    await page.get_by_label("Wait for my approval between phases").check()
    await page.get_by_role("button", name="Deploy").click()
    await page.wait_for_url(lambda url: "#/deployments/" in url and not url.endswith("/new"))
    created = {"id": page.url.rsplit("/", 1)[1]}
    assert created["id"] != "new"
    made = await api.call("GET", f"/api/v1/deployments/{created['id']}/rollout")
    assert [(p["devices"], p["percent"]) for p in made["strategy"]["phases"]] == [(1, None), (None, 100.0)]
    assert made["strategy"]["require_approval"] is True
    await _until(api, created["id"], "the canary passed", lambda r: r["state"] == "awaiting_approval")
    await page.reload()
    state = page.locator("[data-field=rollout-state] .badge")
    await expect(state).to_have_attribute("data-status", "awaiting_approval")
    await expect(page.locator(".facts")).to_contain_text("phase 1 of 2")
    phases = page.locator("tr[data-phase]")
    await expect(phases).to_have_count(2)
    await expect(phases.nth(0).locator(".badge")).to_have_attribute("data-status", "passed")
    await expect(phases.nth(0)).to_contain_text("1/1 succeeded")
    await expect(phases.nth(1).locator(".badge")).to_have_attribute("data-status", "waiting")
    await page.screenshot(path=ROLLOUT_SHOTS / "01-awaiting-approval.png", full_page=True)

    await page.get_by_role("button", name="Approve phase 2").click()
    await expect(state).to_have_attribute("data-status", "completed", timeout=LIVE_MS)
    await expect(phases.nth(1)).to_contain_text("2/2 succeeded", timeout=LIVE_MS)
    await expect(page.get_by_role("button", name="Approve phase 2")).to_have_count(0)
    await page.screenshot(path=ROLLOUT_SHOTS / "02-completed.png", full_page=True)

    # A rollout stopped: the page says why.
    second = upload_bundle(platform, tmp_path, "2.0.0")
    body = {"bundle_id": second, "device_ids": [d["id"] for d in devices], "rollout": strategy}
    stopped = await api.call("POST", "/api/v1/deployments", json=body, expect=201)
    await _until(api, stopped["id"], "waiting again", lambda r: r["state"] == "awaiting_approval")
    await api.call("POST", f"/api/v1/deployments/{stopped['id']}/cancel")
    await page.goto(f"{platform.api_url}/ui/#/deployments/{stopped['id']}")
    await expect(page.locator("[data-field=stop-reason]")).to_have_text(f"cancelled by user:{ADMIN_USERNAME}")
    await expect(state).to_have_attribute("data-status", "cancelled")
    await page.screenshot(path=ROLLOUT_SHOTS / "03-stopped.png", full_page=True)
    await context.close()
    assert not errors, errors
