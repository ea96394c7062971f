"""The agent obeys signed commands: a real Mosquitto, a real HTTP control plane, real bundle scripts.

The control plane here is a small threaded HTTP server speaking the documented contract: bundle
downloads (device JWT, release signature header) and the HTTP fallback routes (application/jose
bodies, device JWT, signed commands in the heartbeat's answer). Commands are signed with the
fleet PKI's command key, which the device pinned at registration (the enrolled state says so),
and published retained by the API's MQTT identity, as the platform does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from kernex.agent.agent import Agent
from kernex.agent.commands import Refusal
from kernex.agent.identity import Identity, load_or_create
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.broker.pki import API_IDENTITY, INGEST_IDENTITY
from kernex.kit.backoff import Backoff
from kernex.protocol import devicetoken, jws
from kernex.protocol.commands import (
    Command,
    ConfigBody,
    DeployBody,
    DeploymentStage,
    EventType,
    sign_command,
)
from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import KeyType, PrivateKey, generate_private_key, public_key_to_pem
from kernex.protocol.messages import (
    CommandKey,
    Event,
    Heartbeat,
    MqttEndpoint,
    RegistrationResponse,
    parse_event,
    parse_heartbeat,
)
from kernex.protocol.topics import Channel, CommandKind
from tests.fixtures.broker import RunningBroker, make_device, next_message, publish, subscribe
from tests.fixtures.bundles import RELEASE_KID, Bundle, good_bundle, sign

KERNEX = str(Path(sys.executable).parent / "kernex")
WAIT_S = 30.0  # generous: bundle scripts are subprocesses on a loaded CI host
FAST_RECONNECT = {"initial_s": 0.2, "max_s": 1.0}
DOWNLOAD_RE = re.compile(r"^/api/v1/bundles/([^/]+)/download$")
FALLBACK_RE = re.compile(r"^/api/v1/devices/([^/]+)/(heartbeat|events)$")
STAGES_OK = [
    DeploymentStage.DOWNLOADING,
    DeploymentStage.VERIFYING,
    DeploymentStage.INSTALLING,
    DeploymentStage.HEALTH_CHECKING,
    DeploymentStage.SUCCEEDED,
]


# --- a control plane over real HTTP -------------------------------------------------------------


@dataclass
class ControlPlane:
    """What the test server serves and what it received."""

    url: str
    device_id: str
    device_key: Any
    bundles: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # id -> (archive, signature)
    downloads: list[str] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the heartbeat answer's signed commands
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received_events(self) -> list[Event]:
        with self.lock:
            return list(self.events)

    def received_heartbeats(self) -> list[Heartbeat]:
        with self.lock:
            return list(self.heartbeats)


@contextmanager
def control_plane(identity: Identity) -> Iterator[ControlPlane]:
    """A threaded HTTP server implementing the device-facing routes the agent calls."""
    holder: dict[str, ControlPlane] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            plane = holder["plane"]
            match = DOWNLOAD_RE.match(self.path)
            served = plane.bundles.get(match.group(1)) if match else None
            if served is None or not self._authorized(plane):
                return self._answer(
                    404 if served is None else 401, {"error": {"code": "no", "message": "no"}}
                )
            data, signature = served
            plane.downloads.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Kernex-Sha256", hashlib.sha256(data).hexdigest())
            self.send_header("X-Kernex-Release-Signature", signature)
            self.end_headers()
            self.wfile.write(data)
            return None

        def do_POST(self) -> None:
            plane = holder["plane"]
            match = FALLBACK_RE.match(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if match is None or match.group(1) != plane.device_id:
                return self._answer(404, {"error": {"code": "not_found", "message": "no such route"}})
            if not self._authorized(plane):
                return self._answer(401, {"error": {"code": "unauthorized", "message": "bad token"}})
            if self.headers.get("Content-Type") != "application/jose":
                return self._answer(415, {"error": {"code": "unsupported_media_type", "message": "jose"}})
            try:
                verified = jws.verify(body, plane.device_key)
            except SignatureError as exc:
                return self._answer(422, {"error": {"code": "message_rejected", "message": str(exc)}})
            with plane.lock:
                if match.group(2) == "heartbeat":
                    assert verified.header["typ"] == jws.TYP_HEARTBEAT
                    plane.heartbeats.append(parse_heartbeat(verified.payload))
                    answer: dict[str, Any] = {"accepted": True, "stored": True, "commands": plane.commands}
                else:
                    assert verified.header["typ"] == jws.TYP_EVENT
                    plane.events.append(parse_event(verified.payload))
                    answer = {"accepted": True, "stored": True}
            return self._answer(200, answer)

        def _authorized(self, plane: ControlPlane) -> bool:
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            try:
                devicetoken.verify(token, lambda _device_id: plane.device_key)
            except SignatureError:
                return False
            return True

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Keep the test output clean."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["plane"] = ControlPlane(
        url=f"http://127.0.0.1:{httpd.server_address[1]}",
        device_id=identity.device_id,
        device_key=identity.key.public_key(),
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield holder["plane"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# --- the rig: an enrolled device, its control plane, the platform's MQTT clients -----------------


@dataclass
class Rig:
    broker: RunningBroker
    state_dir: Path
    home: Path
    identity: Identity
    plane: ControlPlane
    release_key: PrivateKey
    api: mqtt.Client  # publishes commands (the platform's identity)
    ingest: mqtt.Client  # hears heartbeats and events
    revision: int = 0
    log_levels: list[str] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def settings(self, **overrides: Any) -> AgentSettings:
        values: dict[str, Any] = {
            "state_dir": self.state_dir,
            "api_url": self.plane.url,
            "heartbeat_interval_s": 1,
            "device_type": "rpi4",
            "fallback_after_s": 0,
        } | overrides
        return AgentSettings(**values)

    def agent(self, **overrides: Any) -> Agent:
        return Agent(
            self.settings(**overrides),
            reconnect_backoff=Backoff(**FAST_RECONNECT),
            fallback_backoff=Backoff(initial_s=0.2, max_s=1.0),
            set_log_level=self.log_levels.append,
        )

    def serve(self, bundle: Bundle) -> str:
        bundle_id = uuid.uuid4().hex
        self.plane.bundles[bundle_id] = (bundle.archive, sign(bundle, self.release_key))
        return bundle_id

    def command(
        self,
        kind: CommandKind,
        *,
        revision: int | None = None,
        device_id: str | None = None,
        issued_at: datetime | None = None,
        expires_at: datetime | None = None,
        **body: Any,
    ) -> Command:
        if revision is None:
            self.revision += 1
            revision = self.revision
        issued = issued_at or datetime.now(UTC)
        return Command(
            command_id=f"cmd-{uuid.uuid4().hex[:12]}",
            device_id=device_id or self.device_id,
            kind=kind,
            revision=revision,
            issued_at=issued,
            expires_at=expires_at or issued + timedelta(hours=1),
            **{kind.value: body},
        )

    def deploy(self, bundle: Bundle, *, rollback: bool = False, **overrides: Any) -> Command:
        bundle_id = self.serve(bundle)
        body = DeployBody(
            deployment_id=f"dep-{uuid.uuid4().hex[:8]}",
            bundle_id=bundle_id,
            name=bundle.name,
            version=bundle.version,
            sha256=bundle.sha256,
            size=len(bundle.archive),
            download_path=f"/api/v1/bundles/{bundle_id}/download",
            rollback=rollback,
        )
        return self.command(CommandKind.DEPLOY, **body.model_dump(), **overrides)

    def config(self, version: int, values: dict[str, Any], **overrides: Any) -> Command:
        return self.command(
            CommandKind.CONFIG, **ConfigBody(version=version, values=values).model_dump(), **overrides
        )

    def sign(self, command: Command, key: PrivateKey | None = None) -> str:
        pki = self.broker.pki
        return sign_command(command, key or pki.command_signing_key(), pki.command_key_id)

    def send(
        self, command: Command | None, *, token: str | None = None, kind: CommandKind | None = None
    ) -> None:
        """Publish a signed command retained on its topic, as the platform does."""
        kind = kind or (command.kind if command else CommandKind.DEPLOY)
        payload = (token or self.sign(command)).encode() if command or token else b""
        topic = self.broker.topics.command(self.device_id, kind)
        assert not publish(self.api, topic, payload, retain=True).is_failure

    def journal(self) -> list[str]:
        path = self.home / "journal"
        return path.read_text().splitlines() if path.exists() else []

    async def next_event(self, timeout: float = WAIT_S) -> Event:
        """The next event over MQTT, verified with the device key."""
        while True:
            message = await asyncio.to_thread(next_message, self.ingest, timeout)
            if message.topic.endswith("/events"):
                return verified_event(message.payload, self.identity)

    async def deployment_events(self, command: Command) -> list[Event]:
        """This deploy command's events over MQTT, up to its terminal stage."""
        events: list[Event] = []
        while True:
            event = await self.next_event()
            assert event.type == EventType.DEPLOYMENT, event
            assert event.data["command_id"] == command.command_id, event
            events.append(event)
            if event.data["stage"] in {"succeeded", "failed", "rolled_back", "refused"}:
                return events

    async def next_heartbeat(self, timeout: float = WAIT_S) -> Heartbeat:
        while True:
            message = await asyncio.to_thread(next_message, self.ingest, timeout)
            if message.topic.endswith("/heartbeat"):
                verified = jws.verify(message.payload, self.identity.key.public_key())
                return parse_heartbeat(verified.payload)


def verified_event(payload: bytes, identity: Identity) -> Event:
    verified = jws.verify(payload, identity.key.public_key())
    assert verified.header == {"alg": "ES256", "kid": identity.device_id, "typ": jws.TYP_EVENT}
    event = parse_event(verified.payload)
    assert event.device_id == identity.device_id
    return event


async def enrol(broker: RunningBroker, state_dir: Path, release_key: PrivateKey) -> Identity:
    """What registration leaves behind, with the command key and a release key pinned."""
    device = make_device(broker.pki, directory=state_dir)
    store = StateStore(state_dir)
    await store.load()
    await store.save_registration(
        RegistrationResponse(
            device_id=device.device_id,
            status="active",
            certificate=device.cert_path.read_text(),
            ca_certificate=broker.pki.ca_certificate_pem,
            mqtt=MqttEndpoint(host=broker.host, port=broker.port, topic_prefix=broker.topics.prefix),
            command_keys=[
                CommandKey(
                    kid=broker.pki.command_key_id,
                    alg="ES256",
                    public_key_pem=broker.pki.command_public_key_pem,
                )
            ],
            release_keys=[
                CommandKey(
                    kid=RELEASE_KID, alg="ES256", public_key_pem=public_key_to_pem(release_key.public_key())
                )
            ],
        )
    )
    return load_or_create(state_dir, KeyType.ECDSA_P256)


def service_client(
    broker: RunningBroker, mqtt_connect: Callable[..., mqtt.Client], identity: str, **kwargs: Any
) -> mqtt.Client:
    pki = broker.pki
    return mqtt_connect(
        pki.service_cert_path(identity),
        pki.service_key_path(identity),
        f"{identity}-{uuid.uuid4().hex[:8]}",
        **kwargs,
    )


@pytest.fixture
async def rig(broker, mqtt_connect, tmp_path, monkeypatch) -> AsyncIterator[Rig]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # bundle scripts keep their journal there
    release_key = generate_private_key(KeyType.ECDSA_P256)
    state_dir = tmp_path / "device"
    identity = await enrol(broker, state_dir, release_key)
    # Ingest's way of listening: a persistent session, so broker restarts lose nothing.
    ingest = service_client(broker, mqtt_connect, INGEST_IDENTITY, clean_start=False, session_expiry_s=300)
    subscribe(ingest, broker.topics.all_devices(Channel.HEARTBEAT))
    subscribe(ingest, broker.topics.all_devices(Channel.EVENTS))
    with control_plane(identity) as plane:
        yield Rig(
            broker=broker,
            state_dir=state_dir,
            home=home,
            identity=identity,
            plane=plane,
            release_key=release_key,
            api=service_client(broker, mqtt_connect, API_IDENTITY),
            ingest=ingest,
        )


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.wait({task})
        assert task.cancelled(), "the agent must stop by cancellation, not by an error"


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)
    assert predicate(), what


async def stored_state(rig: Rig) -> Any:
    store = StateStore(rig.state_dir)
    return await store.load()


# --- the gate ---------------------------------------------------------------------------------


async def test_forged_foreign_expired_and_stale_commands_are_ignored(rig):
    bundle = good_bundle("1.0.0")
    other_key = generate_private_key(KeyType.ECDSA_P256)
    now = datetime.now(UTC)
    # The newest deploy this device took up was revision 10: anything at or below is stale.
    store = StateStore(rig.state_dir)
    await store.load()
    await store.update(revisions={"deploy": 10})
    rig.revision = 10
    refusals = [
        # Signed by a key the device never pinned, under the pinned key's kid.
        (Refusal.FORGED, rig.sign(rig.deploy(bundle), key=other_key)),
        (Refusal.NOT_ADDRESSED, rig.sign(rig.deploy(bundle, device_id="another-device"))),
        (
            Refusal.EXPIRED,
            rig.sign(
                rig.deploy(bundle, issued_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1))
            ),
        ),
        (Refusal.STALE, rig.sign(rig.deploy(bundle, revision=9))),
        (Refusal.MALFORMED, "not a JWS at all"),
    ]
    async with running(rig.agent()) as agent:
        await wait_for(lambda: agent.stats.connected, "the agent connects")
        commands = agent._commands
        for reason, token in refusals:
            rig.send(None, token=token, kind=CommandKind.DEPLOY)
            await wait_for(lambda reason=reason: commands.refused[reason] == 1, f"refused as {reason}")
        # A deploy command on the config topic is refused too.
        rig.send(None, token=rig.sign(rig.deploy(bundle)), kind=CommandKind.CONFIG)
        await wait_for(lambda: commands.refused[Refusal.WRONG_TOPIC] == 1, "refused as wrong topic")
        # Clearing the retained command (an empty payload) is no command at all.
        rig.send(None, kind=CommandKind.DEPLOY)
        # A valid command after them all: its report is the first event, so none came before it.
        config = rig.config(1, {"heartbeat_interval_s": 1})
        rig.send(config)
        first = await rig.next_event()

    assert first.type == EventType.CONFIG_APPLIED
    assert first.data == {"command_id": config.command_id, "version": 1}
    assert agent.stats.commands_refused == 6
    assert agent.stats.deploys_executed == 0
    assert rig.plane.downloads == []
    assert rig.journal() == []
    assert not (rig.state_dir / "bundles" / "current").exists()
    assert (await stored_state(rig)).revisions == {"deploy": 10, "config": config.revision}


# --- deploy -----------------------------------------------------------------------------------


async def test_deploy_installs_reports_signed_events_in_order_and_is_not_rerun(rig):
    command = rig.deploy(good_bundle("1.0.0"))
    rig.send(command)

    async with running(rig.agent()) as agent:
        events = await rig.deployment_events(command)
        heartbeat = await rig.next_heartbeat()
        while heartbeat.bundle is None:
            heartbeat = await rig.next_heartbeat()
        # The outcome is forgotten once the broker acknowledged its report.
        await wait_for(lambda: agent._store.state.deploy is None, "the delivered outcome is forgotten")

    assert [e.data["stage"] for e in events] == STAGES_OK
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), "seq strictly increasing"
    body = command.deploy
    for event in events:
        assert event.data["deployment_id"] == body.deployment_id
        assert event.data["bundle_id"] == body.bundle_id
        assert event.data["version"] == "1.0.0"
    terminal = events[-1].data
    assert terminal["current_version"] == "1.0.0"
    assert "installing 1.0.0" in terminal["output"]
    assert "error" not in terminal
    assert "output" not in events[0].data, "output only on terminal stages"
    assert heartbeat.bundle.id == body.bundle_id
    assert heartbeat.bundle.version == "1.0.0"
    assert rig.journal() == ["install 1.0.0 prev=", "health 1.0.0"]
    state = await stored_state(rig)
    assert state.revisions == {"deploy": command.revision}
    assert state.bundle.version == "1.0.0"

    # Restarted: the retained command is delivered again, and not run again.
    async with running(rig.agent()) as again:
        await wait_for(lambda: again.stats.received >= 1, "the retained command is delivered again")
        later = rig.config(1, {"heartbeat_interval_s": 1})
        rig.send(later)
        first = await rig.next_event()

    assert first.type == EventType.CONFIG_APPLIED, "no deployment event before it: nothing re-ran"
    assert again.stats.deploys_executed == 0
    assert rig.journal() == ["install 1.0.0 prev=", "health 1.0.0"]
    assert len(rig.plane.downloads) == 1


async def test_failed_install_rolls_back_and_older_version_needs_rollback(rig):
    first = rig.deploy(good_bundle("1.0.0"))
    rig.send(first)
    async with running(rig.agent()):
        assert [e.data["stage"] for e in await rig.deployment_events(first)] == STAGES_OK

        broken = rig.deploy(good_bundle("2.0.0", install='echo "disk on fire"\nexit 3'))
        rig.send(broken)
        events = await rig.deployment_events(broken)
        assert [e.data["stage"] for e in events] == ["downloading", "verifying", "installing", "rolled_back"]
        failed = events[-1].data
        assert "exited with status 3" in failed["error"]
        assert "disk on fire" in failed["output"]
        assert failed["current_version"] == "1.0.0"

        older = rig.deploy(good_bundle("0.9.0"))
        rig.send(older)
        refused = (await rig.deployment_events(older))[-1].data
        assert refused["stage"] == "refused"
        assert "older than the installed 1.0.0" in refused["error"]
        assert refused["current_version"] == "1.0.0"

        rollback = rig.deploy(good_bundle("0.9.0"), rollback=True)
        rig.send(rollback)
        assert [e.data["stage"] for e in await rig.deployment_events(rollback)] == STAGES_OK
        heartbeat = await rig.next_heartbeat()
        while heartbeat.bundle is None or heartbeat.bundle.version != "0.9.0":
            heartbeat = await rig.next_heartbeat()

    assert rig.journal()[-2:] == ["install 0.9.0 prev=1.0.0", "health 0.9.0"]
    assert (await stored_state(rig)).bundle.version == "0.9.0"


async def test_a_crash_mid_install_is_recovered_and_reported_not_rerun(rig):
    """The agent is a real process, SIGKILLed while the install script runs."""
    install = 'echo $$ > "$HOME/script.pid"\necho "install-started" >> "$HOME/journal"\nexec sleep 60'
    command = rig.deploy(good_bundle("1.0.0", install=install))
    rig.send(command)
    env = {**os.environ, "HOME": str(rig.home), "KERNEX_AGENT_LOG_FORMAT": "json"}
    argv = [
        KERNEX,
        "agent",
        "run",
        "--state-dir",
        str(rig.state_dir),
        "--api",
        rig.plane.url,
        "--interval",
        "1",
    ]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, env=env) as proc:
        try:
            await wait_for(lambda: "install-started" in rig.journal(), "the install script runs")
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.communicate, timeout=WAIT_S)
            # The script's session outlives the agent it belonged to; end it.
            if (rig.home / "script.pid").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int((rig.home / "script.pid").read_text()), signal.SIGKILL)
    killed = await stored_state(rig)
    assert killed.deploy is not None
    assert killed.deploy.stage is None, "taken up, no outcome yet"
    assert killed.revisions == {"deploy": command.revision}

    async with running(rig.agent()) as agent:
        # The crashed run's progress events (those it got out), then the recovered outcome.
        events = await rig.deployment_events(command)

    stages = [e.data["stage"] for e in events]
    assert stages[:-1] == ["downloading", "verifying", "installing"][: len(stages) - 1]
    outcome = events[-1].data
    # A first install has nothing to go back to: the outcome is `failed` (its rollback script ran).
    assert outcome["stage"] == "failed"
    assert "stopped while installing version 1.0.0" in outcome["error"]
    assert "current_version" not in outcome
    assert rig.journal() == ["install-started", "rollback 1.0.0 current=none"]
    assert agent.stats.deploys_executed == 0
    state = await stored_state(rig)
    assert state.bundle is None
    assert state.revisions == {"deploy": command.revision}


# --- config -----------------------------------------------------------------------------------


def _gaps(heartbeats: list[Heartbeat]) -> list[float]:
    return [(b.ts - a.ts).total_seconds() for a, b in itertools.pairwise(heartbeats)]


async def test_config_changes_the_heartbeat_interval_live_and_reports(rig):
    async with running(rig.agent(heartbeat_interval_s=2)) as agent:
        before = [await rig.next_heartbeat() for _ in range(3)]
        config = rig.config(7, {"heartbeat_interval_s": 1, "log_level": "DEBUG", "future_setting": "kept"})
        rig.send(config)
        applied = await rig.next_event()
        after = []
        while len(after) < 4:
            heartbeat = await rig.next_heartbeat()
            if heartbeat.config_version == 7:
                after.append(heartbeat)

        invalid = rig.config(8, {"heartbeat_interval_s": 0, "log_level": "WARNING"})
        rig.send(invalid)
        partly = await rig.next_event()

    assert all(h.config_version is None for h in before)
    # Means, not each gap: one beat delayed on a loaded host must not fail the test.
    assert 1.7 <= statistics.mean(_gaps(before)) <= 2.5, _gaps(before)
    assert 0.7 <= statistics.mean(_gaps(after)) <= 1.4, _gaps(after)
    assert agent.stats.connects == 1, "applied without a restart or reconnect"
    assert applied.type == EventType.CONFIG_APPLIED
    assert applied.data == {"command_id": config.command_id, "version": 7}
    # A configuration with an invalid value is not applied at all; the event says why.
    assert partly.data["version"] == 8
    assert partly.data["error"].startswith(
        "configuration not applied (the previous one stays): heartbeat_interval_s: Input should be"
    )
    assert agent.live.heartbeat_interval_s == 1
    assert agent.live.log_level == "DEBUG"
    assert rig.log_levels == ["DEBUG"]
    state = await stored_state(rig)
    assert state.config_version == 7
    assert state.config["heartbeat_interval_s"] == 1
    assert state.config["log_level"] == "DEBUG"
    assert state.config["future_setting"] == "kept", "unknown keys are kept (and ignored)"
    assert state.revisions == {"config": invalid.revision}


async def test_applied_config_survives_a_restart(rig):
    config = rig.config(2, {"heartbeat_interval_s": 3, "install_timeout_s": 5})
    rig.send(config)
    async with running(rig.agent()) as agent:
        await rig.next_event()
        assert agent.deployer.installer.max_script_timeout_s is None, "set at each installation"

    async with running(rig.agent()) as again:
        await wait_for(lambda: again.stats.received >= 1, "the retained config is delivered again")
        first = await rig.next_heartbeat()

    assert again.live.heartbeat_interval_s == 3
    assert again.live.install_timeout_s == 5
    assert first.config_version == 2
    assert again.stats.commands_executed == 0, "the retained config command is not applied twice"
