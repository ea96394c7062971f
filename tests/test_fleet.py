"""Fleet topics for integrators, against a real Mosquitto and both databases.

Ingest republishes exactly the committed, verified messages on `<prefix>/fleet/...`; an
integrator certificate may read those and nothing else, and revoking it takes effect on a
connected client at the broker's reload.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from kernex.broker.config import ACL_NAME
from kernex.broker.exceptions import BrokerConfigError
from kernex.broker.integrators import IntegratorRegistry, identity_for, reload_broker, write_acl
from kernex.cli.main import app
from kernex.protocol import jws
from kernex.protocol.fleet import FleetEvent, FleetHeartbeat, FleetStatus, fleet_filter
from kernex.protocol.messages import format_ts
from kernex.protocol.topics import Channel, CommandKind
from kernex.storage.database import create_engine
from tests.fixtures import asyncapi
from tests.fixtures.broker import (
    ACK_TIMEOUT_S,
    QUIET_PERIOD_S,
    RunningBroker,
    assert_no_message,
    close_client,
    connect_client,
    make_device,
    next_message,
    publish,
    subscribe,
)
from tests.fixtures.ingest import (
    ago,
    heartbeat_claims,
    ingest_settings,
    register_device,
    running_worker,
    sample,
    signed_event,
    signed_heartbeat,
)

RELOAD_LINE = "Reloading config."  # what Mosquitto 2.0 logs on SIGHUP
NOT_AUTHORIZED = 135  # MQTT 5 reason code "Not authorized"


@pytest.fixture
def registry(broker: RunningBroker, tmp_path: Path) -> IntegratorRegistry:
    """A registry of this test only (the session PKI is shared with other tests)."""
    return IntegratorRegistry(broker.pki, tmp_path / "integrators.json")


@pytest.fixture
def integrator(broker: RunningBroker, registry: IntegratorRegistry, tmp_path: Path) -> Iterator[mqtt.Client]:
    """An integrator created, written into the running broker's ACL (reloaded), connected."""
    created, cert_path, key_path = registry.create("acme", tmp_path / "acme")
    _apply(broker, registry)
    client = connect_client(broker, cert_path, key_path, created.identity)
    yield client
    close_client(client)


def _reloads(broker: RunningBroker) -> int:
    log_path = broker.process.log_path
    assert log_path is not None
    return log_path.read_text(encoding="utf-8", errors="replace").count(RELOAD_LINE)


def _apply(broker: RunningBroker, registry: IntegratorRegistry) -> None:
    """Rewrite the ACL, SIGHUP the broker and wait until it has reloaded.

    Mosquitto handles the signal at its next loop iteration: once it logged the reload, every
    packet it reads afterwards is checked against the new ACL.
    """
    broker_dir = broker.data_dir / "broker"
    before = _reloads(broker)
    write_acl(broker_dir / ACL_NAME, broker.topics, registry)
    assert reload_broker(broker_dir) == broker.process.pid
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while _reloads(broker) == before:
        assert time.monotonic() < deadline, "mosquitto did not reload"
        time.sleep(0.02)


def _fleet_messages(client: mqtt.Client, last_topic: str, last_seq: int) -> list[tuple[str, dict[str, Any]]]:
    """Messages received until the one on last_topic with last_seq, then until a quiet period.

    The quiet period is for what the same batch republishes after it (status changes).
    """
    seen: list[tuple[str, dict[str, Any]]] = []
    while True:
        message = next_message(client)
        payload = json.loads(message.payload)
        seen.append((message.topic, payload))
        if message.topic == last_topic and payload.get("seq") == last_seq:
            break
    while True:
        try:
            message = next_message(client, timeout=QUIET_PERIOD_S)
        except pytest.fail.Exception:
            return seen
        seen.append((message.topic, json.loads(message.payload)))


async def test_an_integrator_receives_exactly_the_verified_events_of_a_scenario(
    broker: RunningBroker, database_url: str, tmp_path: Path, integrator: mqtt.Client
) -> None:
    topics = broker.topics
    assert subscribe(integrator, fleet_filter(topics)).value == 1
    engine = create_engine(database_url)
    try:
        device = make_device(broker.pki)
        await register_device(engine, device.key)
        stranger = make_device(broker.pki)  # a certificate, but never registered: unknown device
        did = device.device_id
        base = f"{topics.prefix}/fleet/devices/{did}"
        settings = ingest_settings(broker, database_url, tmp_path)
        async with running_worker(settings, broker) as worker:
            client = await asyncio.to_thread(connect_client, broker, device.cert_path, device.key_path, did)
            other = await asyncio.to_thread(
                connect_client, broker, stranger.cert_path, stranger.key_path, stranger.device_id
            )
            try:
                first = signed_heartbeat(device.key, did, 1)
                sends = [
                    (
                        topics.status(did),
                        json.dumps({"status": "online", "ts": format_ts(ago(seconds=5))}).encode(),
                    ),
                    (topics.heartbeat(did), first),
                    (topics.heartbeat(did), first),  # a replay (or a redelivery): a duplicate
                    (topics.heartbeat(did), b"not a JWS"),  # malformed
                    (
                        topics.heartbeat(did),
                        jws.sign_claims(
                            heartbeat_claims(did, 7), stranger.key, kid=did, typ=jws.TYP_HEARTBEAT
                        ).encode(),
                    ),  # signed with another key
                    (topics.events(did), signed_event(device.key, did, 2, "deployment", stage="downloading")),
                    (topics.events(did), signed_event(device.key, did, 3, "config_applied", version=4)),
                    (topics.events(did), signed_event(device.key, did, 4, "custom.thing", x=1)),
                ]
                for topic, payload in sends:
                    assert not (await asyncio.to_thread(publish, client, topic, payload)).is_failure
                heartbeat = signed_heartbeat(stranger.key, stranger.device_id, 1)
                await asyncio.to_thread(publish, other, topics.heartbeat(stranger.device_id), heartbeat)
                # The last message: once its republication arrives, everything before it has.
                last = signed_heartbeat(device.key, did, 5)
                assert not (await asyncio.to_thread(publish, client, topics.heartbeat(did), last)).is_failure
                seen = await asyncio.to_thread(_fleet_messages, integrator, f"{base}/heartbeat", 5)
            finally:
                await asyncio.to_thread(close_client, client)
                await asyncio.to_thread(close_client, other)
            published = sample(worker.metrics, "kernex_ingest_fleet_published_total")
        unique = {(t, p.get("seq"), p["type"]) for t, p in seen}
        assert unique == {
            (f"{base}/status", None, "status"),
            (f"{base}/heartbeat", 1, "heartbeat"),
            (f"{base}/deployments", 2, "deployment"),
            (f"{base}/config", 3, "config_applied"),
            (f"{base}/events", 4, "custom.thing"),
            (f"{base}/heartbeat", 5, "heartbeat"),
        }
        # At least once: a replay committed in a later batch comes again (with its own
        # received_at); within one batch it comes once.
        heartbeats_1 = [
            {k: v for k, v in p.items() if k != "received_at"}
            for t, p in seen
            if t == f"{base}/heartbeat" and p["seq"] == 1
        ]
        assert 1 <= len(heartbeats_1) <= 2
        assert all(p == heartbeats_1[0] for p in heartbeats_1)
        assert published == len(seen)
        for topic, body in seen:
            # Every real fleet message matches its channel in docs/asyncapi.yaml.
            assert not asyncapi.message_errors(topic, body, prefix=topics.prefix), (topic, body)
            if topic.endswith("/heartbeat"):
                hb = FleetHeartbeat.model_validate(body)
                assert hb.bundle is not None
                assert (hb.device_id, hb.metrics.cpu_percent, hb.bundle.version) == (did, 12.5, "1.4.2")
                assert hb.received_at >= hb.ts
            elif topic.endswith("/status"):
                status = FleetStatus.model_validate(body)
                assert (status.status, status.reason) == ("online", "status message")
            else:
                event = FleetEvent.model_validate(body)
                assert event.device_id == did
        deployment = next(p for t, p in seen if t.endswith("/deployments"))
        assert deployment["data"] == {"stage": "downloading"}
        assert_no_message(integrator)
    finally:
        await engine.dispose()


def test_an_integrator_can_neither_publish_nor_read_device_topics(
    broker: RunningBroker, integrator: mqtt.Client
) -> None:
    topics = broker.topics
    device = make_device(broker.pki)
    did = device.device_id
    for topic in (
        topics.fleet("devices", did, "heartbeat"),
        topics.heartbeat(did),
        topics.status(did),
        topics.command(did, CommandKind.DEPLOY),
        "anything/else",
    ):
        assert publish(integrator, topic, b"{}").value == NOT_AUTHORIZED, topic
    # Mosquitto grants the subscription but never delivers: prove it by ordering. The ingest
    # identity publishes a fleet message after the device's raw heartbeat; the integrator
    # gets the fleet message only.
    for topic_filter in (
        topics.all_devices(Channel.HEARTBEAT),
        f"{topics.prefix}/devices/#",
        fleet_filter(topics),
    ):
        subscribe(integrator, topic_filter)
    client = connect_client(broker, device.cert_path, device.key_path, did)
    ingest_cert, ingest_key = (
        broker.pki.service_cert_path("kernex-ingest"),
        broker.pki.service_key_path("kernex-ingest"),
    )
    ingest = connect_client(broker, ingest_cert, ingest_key, "kernex-ingest-probe")
    try:
        assert not publish(client, topics.heartbeat(did), b"raw").is_failure
        fleet_topic = topics.fleet("devices", did, "heartbeat")
        assert not publish(ingest, fleet_topic, b'{"probe": true}').is_failure
        message = next_message(integrator)
        assert (message.topic, message.payload) == (fleet_topic, b'{"probe": true}')
        assert_no_message(integrator)
    finally:
        close_client(client)
        close_client(ingest)


def test_a_revoked_integrator_receives_nothing_after_the_reload(
    broker: RunningBroker, registry: IntegratorRegistry, integrator: mqtt.Client, tmp_path: Path
) -> None:
    topics = broker.topics
    _, cert, key = registry.create("still-active", tmp_path / "other")
    _apply(broker, registry)
    active = connect_client(broker, cert, key, identity_for("still-active"))
    ingest = connect_client(
        broker,
        broker.pki.service_cert_path("kernex-ingest"),
        broker.pki.service_key_path("kernex-ingest"),
        "kernex-ingest-probe",
    )
    try:
        for client in (integrator, active):
            subscribe(client, fleet_filter(topics))
        fleet_topic = topics.fleet("devices", "d1", "status")
        assert not publish(ingest, fleet_topic, b"before").is_failure
        assert next_message(integrator).payload == b"before"
        assert next_message(active).payload == b"before"
        revoked = registry.revoke("acme")
        assert not revoked.active
        assert registry.active_identities() == [identity_for("still-active")]
        _apply(broker, registry)
        assert not publish(ingest, fleet_topic, b"after").is_failure
        assert next_message(active).payload == b"after"
        assert_no_message(integrator)
        acl = (broker.data_dir / "broker" / ACL_NAME).read_text()
        assert f"user {identity_for('acme')}\n" not in acl
        assert f"user {identity_for('still-active')}\ntopic read {topics.prefix}/fleet/#\n" in acl
    finally:
        close_client(active)
        close_client(ingest)


def test_integrator_names_cannot_name_a_device_or_a_service() -> None:
    assert identity_for("acme-1") == "integrator-acme-1"
    for bad in ("", "Acme", "a/b", "a+b", "#", "-x", "a b", "x" * 41):
        with pytest.raises(BrokerConfigError):
            identity_for(bad)


def test_the_cli_creates_lists_and_revokes_integrators(
    broker: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI works on the PKI and rendered broker of a data dir: the broker fixture's.
    pki_dir = broker.pki.directory
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "pki").symlink_to(pki_dir)
    (data_dir / "broker").symlink_to(broker.data_dir / "broker")
    monkeypatch.setenv("KERNEX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("KERNEX_TOPIC_PREFIX", broker.topics.prefix)
    monkeypatch.setenv("KERNEX_PKI_PASSPHRASE", "kernex-tests-only-passphrase")
    registry_path = pki_dir / "integrators.json"
    registry_path.unlink(missing_ok=True)
    runner = CliRunner()
    try:
        created = runner.invoke(app, ["integrations", "create", "cli-test", "--out", str(tmp_path / "out")])
        assert created.exit_code == 0, created.output
        assert "integrator-cli-test" in created.output
        assert "reloaded" in created.output
        assert (tmp_path / "out" / "integrator-cli-test.crt").is_file()
        assert "user integrator-cli-test\n" in (broker.data_dir / "broker" / ACL_NAME).read_text()
        listed = runner.invoke(app, ["integrations", "list"])
        assert listed.exit_code == 0, listed.output
        assert "cli-test\tintegrator-cli-test" in listed.output
        assert "active" in listed.output
        revoked = runner.invoke(app, ["integrations", "revoke", "cli-test"])
        assert revoked.exit_code == 0, revoked.output
        assert "user integrator-cli-test\n" not in (broker.data_dir / "broker" / ACL_NAME).read_text()
        unknown = runner.invoke(app, ["integrations", "revoke", "nobody"])
        assert unknown.exit_code == 1
        assert "no integrator named 'nobody'" in unknown.output
    finally:
        registry_path.unlink(missing_ok=True)
