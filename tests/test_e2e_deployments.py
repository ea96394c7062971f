"""Issue #5 end to end: `kernex up`, three real agents, bundles built and uploaded with the CLI,
deployments, rollback and configuration through the real API.

The agents run in this process (each its own state dir, key, mTLS session), so the test can stop
one (offline), restart one, and read its counters. Bundle scripts keep a journal in the device's
state dir, so each device's record of what ran is its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernex.agent.agent import Agent
from kernex.agent.commands import Refusal
from kernex.agent.settings import AgentSettings
from kernex.broker.pki import API_IDENTITY, FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.kit.backoff import Backoff
from kernex.protocol.commands import Command, DeployBody, sign_command
from kernex.protocol.keys import KeyType, generate_private_key
from kernex.protocol.topics import CommandKind, Topics
from tests.fixtures.broker import close_client, connect_client, publish
from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for

SETTLE_S = 60  # registration, TLS, a download and scripts per device on a loaded 2-core machine
# The journal lives in the device's state dir: $KERNEX_BUNDLE_DIR is <state>/bundles/versions/<v>.
JOURNAL = '"$KERNEX_BUNDLE_DIR/../../../journal"'
INSTALL_SH = f"""#!/bin/sh
set -e
if [ -e "$KERNEX_BUNDLE_DIR/../../../fail-$KERNEX_BUNDLE_VERSION" ]; then
  echo "install $KERNEX_BUNDLE_VERSION refused on this device"
  echo "install-failed $KERNEX_BUNDLE_VERSION" >> {JOURNAL}
  exit 4
fi
echo "install $KERNEX_BUNDLE_VERSION" >> {JOURNAL}
"""
ROLLBACK_SH = f"""#!/bin/sh
echo "rollback $KERNEX_BUNDLE_VERSION" >> {JOURNAL}
"""


@dataclass(frozen=True)
class PlatformBroker:
    """The broker `kernex up` runs, as the MQTT test helpers want it."""

    host: str
    port: int
    pki: FleetPKI


@dataclass
class Device:
    """One real agent, started and stopped by the test."""

    settings: AgentSettings
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None
    runs: list[Agent] = field(default_factory=list)

    def start(self) -> Agent:
        self.agent = Agent(self.settings, reconnect_backoff=Backoff(initial_s=0.2, max_s=1.0))
        self.runs.append(self.agent)
        self.task = asyncio.create_task(self.agent.run())
        return self.agent

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.wait({self.task})
        assert self.task.cancelled(), "the agent stops by cancellation, not an error"

    @property
    def id(self) -> str:
        assert self.agent is not None
        assert self.agent.device_id is not None
        return self.agent.device_id

    def journal(self) -> list[str]:
        path = self.settings.state_dir / "journal"
        return path.read_text().splitlines() if path.exists() else []


class Api:
    """The operator's side of the API, as the admin."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.headers = {"Authorization": f"Bearer {platform.token}"}

    async def call(self, method: str, path: str, *, expect: int = 200, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.request(
                method, self.platform.api_url + path, headers=self.headers, **kwargs
            )
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/api/v1/deployments/{deployment_id}")

    async def settled(self, deployment_id: str, status: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            detail = await self.deployment(deployment_id)
            return detail if detail["status"] == status else None

        return await wait_for(done, SETTLE_S, f"deployment {deployment_id} {status}", log=self.platform)

    async def device(self, device_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/api/v1/devices/{device_id}")

    async def running(self, device_id: str, version: str) -> dict[str, Any]:
        async def reported() -> dict[str, Any] | None:
            device = await self.device(device_id)
            return device if device["bundle"]["version"] == version else None

        return await wait_for(reported, SETTLE_S, f"{device_id} reports {version}", log=self.platform)


def upload_bundle(platform: Platform, tmp_path: Path, version: str) -> str:
    """Build a bundle with `kernex bundle build` and upload it with `kernex bundle upload`; its id."""
    source = tmp_path / f"bundle-{version}"
    source.mkdir()
    manifest = {
        "name": "e2e-app",
        "version": version,
        "device_types": ["*"],
        "install": {"path": "install.sh", "timeout_s": 30},
        "rollback": {"path": "rollback.sh", "timeout_s": 30},
    }
    (source / "manifest.json").write_text(json.dumps(manifest))
    for name, text in (("install.sh", INSTALL_SH), ("rollback.sh", ROLLBACK_SH)):
        (source / name).write_text(text)
        (source / name).chmod(0o755)
    (source / "app.conf").write_text(f"version={version}\n")
    archive = tmp_path / f"e2e-app-{version}.tar.gz"
    run = [KERNEX, "bundle", "build", str(source), "-o", str(archive)]
    subprocess.run(run, check=True, capture_output=True)
    uploaded = subprocess.run(
        [
            KERNEX,
            "bundle",
            "upload",
            str(archive),
            "--api",
            platform.api_url,
            "--token",
            str(platform.token),
            "-q",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return uploaded.stdout.split()[0]


@pytest.fixture
async def platform(database_url: str, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_platform(tmp_path, database_url) as running:
        yield running
    assert running.proc.returncode == 0, running.log()[-3000:]


@pytest.fixture
async def devices(platform: Platform, tmp_path: Path) -> AsyncIterator[list[Device]]:
    fleet = [
        Device(
            AgentSettings(
                api_url=platform.api_url,
                state_dir=tmp_path / f"device-{n}",
                heartbeat_interval_s=1,
                name=f"e2e-{n}",
                device_type="e2e-board",
            )
        )
        for n in range(3)
    ]
    for device in fleet:
        device.start()
    try:
        yield fleet
    finally:
        for device in fleet:
            if device.task is not None and not device.task.done():
                await device.stop()


async def test_deployments_rollback_and_config_across_a_fleet(platform, devices, tmp_path):
    api = Api(platform)
    one, two, three = devices

    async def all_online() -> bool:
        page = await api.call("GET", "/api/v1/devices", params={"status": "online"})
        return page["total"] == 3

    await wait_for(all_online, SETTLE_S, "three agents online", log=platform)
    v1 = upload_bundle(platform, tmp_path, "1.0.0")
    v2 = upload_bundle(platform, tmp_path, "2.0.0")
    ids = [d.id for d in devices]

    # Deploy v1 everywhere: all succeed, and each device's history and heartbeat say so.
    first = await api.call(
        "POST", "/api/v1/deployments", json={"bundle_id": v1, "device_ids": ids}, expect=201
    )
    done = await api.settled(first["id"], "succeeded")
    assert done["counts"] == {"succeeded": 3}
    for device in devices:
        history = await api.call("GET", f"/api/v1/devices/{device.id}/bundle-history")
        assert [(h["version"], h["result"], h["deployment_id"]) for h in history["items"]] == [
            ("1.0.0", "succeeded", first["id"])
        ]
        await api.running(device.id, "1.0.0")
        assert device.journal() == ["install 1.0.0"]

    # Restarted after success, an agent does not run the command again.
    await one.stop()
    again = one.start()
    # The retained deploy command is delivered again on connect, and handled: not run again.
    await wait_for(
        _async(lambda: again._commands is not None and again._commands.handled >= 1),
        SETTLE_S,
        "the retained command is handled",
    )
    assert again.stats.deploys_executed == 0
    assert one.journal() == ["install 1.0.0"]

    # v2 fails on device two (rolled back), and device three is offline when it is deployed.
    (two.settings.state_dir / "fail-2.0.0").touch()
    await three.stop()
    second = await api.call(
        "POST", "/api/v1/deployments", json={"bundle_id": v2, "device_ids": ids}, expect=201
    )

    async def two_of_three_done() -> dict[str, Any] | None:
        detail = await api.deployment(second["id"])
        counts = detail["counts"]
        return detail if counts.get("succeeded") == 1 and counts.get("rolled_back") == 1 else None

    waiting = await wait_for(two_of_three_done, SETTLE_S, "v2 done on the online devices", log=platform)
    assert waiting["status"] == "in_progress", "device three has not taken it up yet"
    targets = {t["device_id"]: t for t in waiting["targets"]}
    assert targets[three.id]["status"] == "pending"
    assert "exited with status 4" in targets[two.id]["error"]
    assert two.journal() == ["install 1.0.0", "install-failed 2.0.0", "rollback 2.0.0"]

    # Device three comes back: it gets v2 from its retained command and runs it once.
    back = three.start()
    finished = await api.settled(second["id"], "partially_failed")
    assert finished["counts"] == {"succeeded": 2, "rolled_back": 1}
    await api.running(three.id, "2.0.0")
    assert three.journal() == ["install 1.0.0", "install 2.0.0"]
    assert back.stats.deploys_executed == 1
    device_two = await api.running(two.id, "1.0.0")
    assert device_two["bundle"]["id"] == v1, "rolled back: device two runs v1"
    history = await api.call("GET", f"/api/v1/devices/{two.id}/bundle-history")
    assert [(h["version"], h["result"]) for h in history["items"]][:2] == [
        ("2.0.0", "rolled_back"),
        ("1.0.0", "succeeded"),
    ]

    # The operator rolls device one back: its previous version runs again.
    rollback = await api.call("POST", f"/api/v1/devices/{one.id}/rollback", json={}, expect=201)
    assert rollback["rollback"] is True
    await api.settled(rollback["id"], "succeeded")
    await api.running(one.id, "1.0.0")
    assert one.journal() == ["install 1.0.0", "install 2.0.0", "install 1.0.0"]

    # A config change applies live: no restart, no reconnect, heartbeats at the new interval.
    connects = again.stats.connects
    await api.call("PUT", f"/api/v1/devices/{one.id}/config", json={"heartbeat_interval_s": 2})

    async def in_sync() -> dict[str, Any] | None:
        view = await api.call("GET", f"/api/v1/devices/{one.id}/config")
        return view if view["in_sync"] and view["desired"] is not None else None

    view = await wait_for(in_sync, SETTLE_S, "device one applies the config", log=platform)
    assert view["reported"]["error"] is None
    assert again.live.heartbeat_interval_s == 2
    version = view["desired"]["version"]

    async def slow_heartbeats() -> list[float] | None:
        page = await api.call("GET", f"/api/v1/devices/{one.id}/heartbeats", params={"limit": 20})
        stamps = [
            datetime.fromisoformat(h["ts"]) for h in page["items"] if h.get("config_version") == version
        ]
        gaps = [(a - b).total_seconds() for a, b in itertools.pairwise(stamps)]
        return gaps if len(gaps) >= 2 else None

    gaps = await wait_for(slow_heartbeats, SETTLE_S, "heartbeats at the new interval", log=platform)
    # The mean, not each gap: one beat delayed on a loaded host must not fail the test.
    assert 1.7 <= statistics.mean(gaps) <= 2.6, gaps
    assert again.stats.connects == connects

    # Forged and stale commands reach the agent and are ignored.
    executed = again.stats.deploys_executed
    pki = FleetPKI.from_settings(BrokerSettings(data_dir=platform.data_dir))
    now = datetime.now(UTC)
    body = DeployBody(
        deployment_id=f"forged-{uuid.uuid4().hex[:8]}",
        bundle_id=v2,
        name="e2e-app",
        version="2.0.0",
        sha256="0" * 64,
        size=1,
        download_path=f"/api/v1/bundles/{v2}/download",
    )

    def command(revision: int) -> Command:
        return Command(
            command_id=f"cmd-{uuid.uuid4().hex[:8]}",
            device_id=one.id,
            kind=CommandKind.DEPLOY,
            revision=revision,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            deploy=body,
        )

    forged = sign_command(command(10**9), generate_private_key(KeyType.ECDSA_P256), pki.command_key_id)
    stale = sign_command(command(1), pki.command_signing_key(), pki.command_key_id)
    endpoint = PlatformBroker("127.0.0.1", platform.mqtt_port, pki)
    client = await asyncio.to_thread(
        connect_client,
        endpoint,
        pki.service_cert_path(API_IDENTITY),
        pki.service_key_path(API_IDENTITY),
        f"e2e-api-{uuid.uuid4().hex[:8]}",
    )
    try:
        topic = Topics().command(one.id, CommandKind.DEPLOY)
        for token in (forged, stale):
            # Not retained: the platform's own retained command stays as it is.
            assert not publish(client, topic, token.encode()).is_failure
    finally:
        close_client(client)
    handler = again._commands
    assert handler is not None
    await wait_for(
        _async(lambda: handler.refused[Refusal.FORGED] == 1 and handler.refused[Refusal.STALE] == 1),
        SETTLE_S,
        "the forged and the stale command are refused",
    )
    assert again.stats.deploys_executed == executed, "neither ran"
    assert one.journal() == ["install 1.0.0", "install 2.0.0", "install 1.0.0"]
    history = await api.call("GET", f"/api/v1/devices/{one.id}/bundle-history")
    assert all(h["deployment_id"] != body.deployment_id for h in history["items"])


def _async(predicate: Any) -> Any:
    async def check() -> Any:
        return predicate()

    return check
