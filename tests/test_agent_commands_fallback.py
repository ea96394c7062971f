"""The HTTP fallback: the broker goes away, heartbeats and events reach the API over HTTP, a command
in the heartbeat's answer is executed (once), and MQTT takes over again when the broker is back.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from kernex.broker.pki import API_IDENTITY
from kernex.protocol import jws
from kernex.protocol.commands import EventType
from kernex.protocol.topics import CommandKind
from tests.fixtures.broker import close_client, connect_client, next_message, publish
from tests.fixtures.bundles import good_bundle
from tests.test_agent_commands import STAGES_OK, WAIT_S, rig, running, wait_for

__all__ = ["rig"]  # the enrolled device and its control plane, shared with test_agent_commands


async def test_fallback_sends_over_http_runs_the_answer_commands_and_returns_to_mqtt(rig):
    agent = rig.agent(fallback_after_s=1)
    mqtt_seqs: set[int] = set()

    async def heard_over_mqtt() -> dict:
        """The claims of the next heartbeat or event ingest hears, verified with the device key."""
        message = await asyncio.to_thread(next_message, rig.ingest, WAIT_S)
        claims = json.loads(jws.verify(message.payload, rig.identity.key.public_key()).payload)
        mqtt_seqs.add(claims["seq"])
        return claims

    async with running(agent):
        await heard_over_mqtt()
        assert not agent.stats.fallback_active

        await asyncio.to_thread(rig.broker.process.stop)
        deploy = rig.deploy(good_bundle("1.0.0"))
        # Every heartbeat's answer lists it until the deployment is over for the device.
        rig.plane.commands = [rig.sign(deploy)]
        await wait_for(lambda: agent.stats.fallback_active, "the fallback starts")
        await wait_for(
            lambda: any(e.data.get("stage") == "succeeded" for e in rig.plane.received_events()),
            "the deploy from the heartbeat's answer runs and reports over HTTP",
        )
        await wait_for(lambda: len(rig.plane.received_heartbeats()) >= 3, "heartbeats keep coming over HTTP")
        assert agent.stats.deploys_executed == 1, "listed in every answer, executed once"

        await asyncio.to_thread(rig.broker.process.start)
        await wait_for(lambda: agent.stats.connected and not agent.stats.fallback_active, "MQTT takes over")
        # The platform also retains the command on the broker: seen there too, it is not run again.
        api = connect_client(
            rig.broker,
            rig.broker.pki.service_cert_path(API_IDENTITY),
            rig.broker.pki.service_key_path(API_IDENTITY),
            f"api-again-{uuid.uuid4().hex[:8]}",
        )
        try:
            topic = rig.broker.topics.command(rig.device_id, CommandKind.DEPLOY)
            assert not publish(api, topic, rig.sign(deploy).encode(), retain=True).is_failure
            # Commands are handled in order: once this one is reported, the deploy was handled.
            config = rig.config(1, {"heartbeat_interval_s": 1})
            topic = rig.broker.topics.command(rig.device_id, CommandKind.CONFIG)
            assert not publish(api, topic, rig.sign(config).encode(), retain=True).is_failure
        finally:
            close_client(api)
        while (await heard_over_mqtt()).get("type") != EventType.CONFIG_APPLIED:
            pass
        over_http = len(rig.plane.received_heartbeats())
        newest_over_http = max(h.seq for h in rig.plane.received_heartbeats())
        while max(mqtt_seqs) <= newest_over_http + 2:
            await heard_over_mqtt()

    events = rig.plane.received_events()
    assert [e.data["stage"] for e in events] == STAGES_OK
    assert all(e.type == EventType.DEPLOYMENT and e.data["command_id"] == deploy.command_id for e in events)
    assert agent.stats.deploys_executed == 1
    assert agent.stats.commands_executed == 2, "the deploy (once, over HTTP) and the config"
    assert agent.stats.received == 2, "both commands came over MQTT as well"
    assert rig.journal() == ["install 1.0.0 prev=", "health 1.0.0"]
    assert len(rig.plane.received_heartbeats()) - over_http <= 1, "back on MQTT, the HTTP heartbeats stop"
    http_seqs = {h.seq for h in rig.plane.received_heartbeats()} | {e.seq for e in events}
    # Sent once, by one path or the other (a PUBACK lost as the broker died could repeat one).
    assert len(http_seqs & mqtt_seqs) <= 1
    # Nothing lost in the switches: every seq from the first to the last went one way or the other.
    seen = http_seqs | mqtt_seqs
    assert seen == set(range(min(seen), max(seen) + 1))
    assert any(h.bundle is not None and h.bundle.version == "1.0.0" for h in rig.plane.received_heartbeats())
