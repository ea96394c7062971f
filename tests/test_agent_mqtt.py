"""The agent against a real Mosquitto: mutual TLS, signed heartbeats, status, broker restarts.

The device is enrolled the way registration would do it (its CSR signed by the fleet CA, the
result written to the agent state); the broker is the project's rendered mosquitto.conf.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from kernex.agent.agent import Agent
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.broker.pki import API_IDENTITY, INGEST_IDENTITY
from kernex.kit.backoff import Backoff
from kernex.protocol import jws
from kernex.protocol.messages import (
    ConnectionStatus,
    Heartbeat,
    MqttEndpoint,
    RegistrationResponse,
    parse_heartbeat,
    parse_status,
)
from kernex.protocol.topics import Channel, CommandKind
from tests.fixtures.broker import (
    DeviceIdentity,
    RunningBroker,
    make_device,
    next_message,
    publish,
    subscribe,
)

KERNEX = str(Path(sys.executable).parent / "kernex")
WAIT_S = 20.0  # generous against 1 s heartbeats and sub-second reconnects on a loaded CI host
# Keeps reconnects quick in tests; the production default starts at 1 s and caps at 60 s.
FAST_RECONNECT = {"initial_s": 0.2, "max_s": 1.0}


async def enrol(broker: RunningBroker, state_dir: Path) -> DeviceIdentity:
    """What a successful registration leaves behind: key, certificate and the agent state."""
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
            command_keys=[],
        )
    )
    return device


def service_client(broker: RunningBroker, mqtt_connect, identity: str, **kwargs) -> mqtt.Client:
    pki = broker.pki
    return mqtt_connect(
        pki.service_cert_path(identity),
        pki.service_key_path(identity),
        f"{identity}-test-{uuid.uuid4().hex[:8]}",
        **kwargs,
    )


async def next_heartbeat(client: mqtt.Client, device: DeviceIdentity) -> Heartbeat:
    """The next heartbeat delivered to `client`, verified against the device key."""
    message = await asyncio.to_thread(next_message, client, WAIT_S)
    verified = jws.verify(message.payload, device.key.public_key())
    assert verified.header["kid"] == device.device_id
    assert verified.header["typ"] == jws.TYP_HEARTBEAT
    heartbeat = parse_heartbeat(verified.payload)
    assert heartbeat.device_id == device.device_id
    assert message.topic.endswith(f"/devices/{device.device_id}/heartbeat")
    assert not message.retain
    return heartbeat


async def retained_status(broker: RunningBroker, mqtt_connect, device_id: str) -> ConnectionStatus:
    """The retained status a newcomer sees (the API identity may read every device's status)."""
    client = service_client(broker, mqtt_connect, API_IDENTITY)
    subscribe(client, broker.topics.status(device_id))
    message = await asyncio.to_thread(next_message, client, WAIT_S)
    assert message.retain
    return parse_status(message.payload).status


async def wait_for(predicate, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.05)
    assert predicate(), what


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled(), "the agent must stop by cancellation, not by an error"


async def test_heartbeats_survive_a_broker_restart(broker, mqtt_connect, tmp_path):
    state_dir = tmp_path / "device"
    device = await enrol(broker, state_dir)
    # Ingest's way of listening: a persistent session, so nothing is lost while it reconnects.
    ingest = service_client(broker, mqtt_connect, INGEST_IDENTITY, clean_start=False, session_expiry_s=300)
    subscribe(ingest, broker.topics.all_devices(Channel.HEARTBEAT))
    agent = Agent(
        AgentSettings(state_dir=state_dir, heartbeat_interval_s=1, buffer_size=100),
        reconnect_backoff=Backoff(**FAST_RECONNECT),
    )
    running = asyncio.create_task(agent.run())
    try:
        first = [await next_heartbeat(ingest, device) for _ in range(3)]
        assert [h.seq for h in first] == sorted({h.seq for h in first})
        assert first[0].agent_version
        assert first[0].metrics.disk_free_mb > 0
        assert first[0].metrics.uptime_s > 0
        assert await retained_status(broker, mqtt_connect, device.device_id) is ConnectionStatus.ONLINE

        await asyncio.to_thread(broker.process.stop)
        await wait_for(lambda: not agent.stats.connected, "the agent notices the broker is gone")
        await wait_for(lambda: agent.stats.buffered >= 2, "heartbeats are buffered while offline")
        buffered_up_to = agent.stats.last_seq
        assert buffered_up_to is not None
        await asyncio.to_thread(broker.process.start)
        await wait_for(lambda: agent.stats.connects >= 2, "the agent reconnects")

        seqs = {h.seq for h in first}
        while max(seqs) <= buffered_up_to:
            seqs.add((await next_heartbeat(ingest, device)).seq)
    finally:
        await stop(running)

    # Redelivery may repeat a seq; none may be missing: the buffer was flushed in full.
    assert seqs == set(range(min(seqs), max(seqs) + 1))
    assert agent.stats.dropped == 0
    # A clean shutdown says "offline" itself (the broker sends the Last Will only on a crash).
    assert await retained_status(broker, mqtt_connect, device.device_id) is ConnectionStatus.OFFLINE


async def test_retained_command_reaches_the_agent(broker, mqtt_connect, tmp_path):
    state_dir = tmp_path / "device"
    device = await enrol(broker, state_dir)
    api = service_client(broker, mqtt_connect, API_IDENTITY)
    topic = broker.topics.command(device.device_id, CommandKind.CONFIG)
    assert not publish(
        api, topic, b"not yet executed: a later issue verifies commands", retain=True
    ).is_failure
    agent = Agent(AgentSettings(state_dir=state_dir, heartbeat_interval_s=60))

    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.stats.received >= 1, "the retained command is delivered")
    finally:
        await stop(running)

    assert agent.stats.connects == 1


async def test_seq_continues_after_a_restart(broker, mqtt_connect, tmp_path):
    state_dir = tmp_path / "device"
    device = await enrol(broker, state_dir)
    ingest = service_client(broker, mqtt_connect, INGEST_IDENTITY)
    subscribe(ingest, broker.topics.all_devices(Channel.HEARTBEAT))

    seqs = []
    for _ in range(2):
        running = asyncio.create_task(Agent(AgentSettings(state_dir=state_dir, heartbeat_interval_s=1)).run())
        try:
            seqs += [(await next_heartbeat(ingest, device)).seq for _ in range(2)]
        finally:
            await stop(running)

    assert seqs == sorted(set(seqs)), "strictly increasing across the restart"


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)],
    ids=["clean-stop", "crash"],
)
async def test_cli_agent_leaves_offline_status(broker, mqtt_connect, tmp_path, signum, exit_code):
    state_dir = tmp_path / "device"
    device = await enrol(broker, state_dir)
    watcher = service_client(broker, mqtt_connect, API_IDENTITY)
    subscribe(watcher, broker.topics.status(device.device_id))
    env = {**os.environ, "KERNEX_AGENT_LOG_FORMAT": "json"}
    argv = [KERNEX, "agent", "run", "--state-dir", str(state_dir), "--api", "http://127.0.0.1:9"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, env=env) as proc:
        try:
            online = await asyncio.to_thread(next_message, watcher, WAIT_S)
            assert parse_status(online.payload).status is ConnectionStatus.ONLINE
            proc.send_signal(signum)
            # SIGTERM: the agent publishes "offline"; SIGKILL: the broker publishes the Last Will.
            offline = await asyncio.to_thread(next_message, watcher, WAIT_S)
        except BaseException:
            proc.kill()
            print(proc.communicate()[1].decode(errors="replace"))  # the agent's log, to explain the failure
            raise
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=WAIT_S)

    assert json.loads(offline.payload)["status"] == "offline"
    assert proc.returncode == exit_code, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr
