"""The simulator: N real agents in one process, each with its own key and state dir."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from kernex.agent.exceptions import RegistrationError
from kernex.agent.http import SharedClient, request_slot
from kernex.agent.identity import KEY_FILE
from kernex.agent.settings import AgentSettings
from kernex.agent.simulator import Simulator, device_dir
from tests.test_agent_registration import api, registration_body

__all__ = ["api"]  # the scripted control-plane fixture, shared with the registration tests


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_devices_register_separately_and_heartbeat_while_offline(api, tmp_path):
    # The broker port is closed: devices register, then buffer heartbeats while reconnecting.
    mqtt_port = _closed_port()

    def reply(request):
        body = registration_body(request)
        body["mqtt"]["port"] = mqtt_port
        return 201, body

    api.replies = [reply]
    settings = AgentSettings(
        api_url=api.url, state_dir=tmp_path / "fleet", heartbeat_interval_s=1, name="rig"
    )
    simulator = Simulator(settings, 3, start_spread_s=0.3)

    running = asyncio.create_task(simulator.run())
    try:
        async with asyncio.timeout(30):
            while len(simulator.agents) < 3 or any(
                agent.stats.last_seq is None or agent.stats.buffered < 1 for agent in simulator.agents
            ):
                await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.wait({running})

    assert running.cancelled()
    assert not simulator.failures
    device_ids = {agent.device_id for agent in simulator.agents}
    assert len(device_ids) == 3
    for index in (1, 2, 3):
        assert (device_dir(settings.state_dir, index) / KEY_FILE).exists()
    names = sorted(body["name"] for _, body in api.requests)
    assert names == ["rig-0001", "rig-0002", "rig-0003"]
    assert all(not agent.stats.connected for agent in simulator.agents)


async def test_every_device_refused_is_an_error(api, tmp_path):
    api.replies = [lambda _: (403, {"error": {"code": "forbidden", "message": "closed enrolment"}})]
    simulator = Simulator(AgentSettings(api_url=api.url, state_dir=tmp_path), 2, start_spread_s=0)

    with pytest.raises(RegistrationError, match="closed enrolment"):
        await simulator.run()

    assert len(simulator.failures) == 2


async def test_shared_client_lets_a_device_sign_only_once_it_holds_a_request_slot() -> None:
    """Simulated devices share one client: at most `slots` of them are between signing a
    request and reading its answer, so a short-lived token never waits in a queue; a device's
    own client puts no limit there."""
    slots, devices = 3, 12
    in_server = peak_in_server = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_server, peak_in_server
        while await reader.readuntil(b"\r\n\r\n"):
            in_server += 1
            peak_in_server = max(peak_in_server, in_server)
            await asyncio.sleep(0.05)  # a request that takes a while, as a download does
            in_server -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

    async def signed_requests(client: httpx.AsyncClient) -> int:
        signing = peak_signing = 0

        async def device() -> None:
            nonlocal signing, peak_signing
            async with request_slot(client):
                signing += 1  # from here the device's token ages: it signs, then sends
                peak_signing = max(peak_signing, signing)
                response = await client.get(url)
                assert response.text == "ok"
                signing -= 1

        await asyncio.gather(*(device() for _ in range(devices)))
        return peak_signing

    try:
        async with SharedClient(slots=slots) as shared:
            assert await signed_requests(shared) == slots
        assert peak_in_server <= slots
        async with httpx.AsyncClient() as own:
            assert await signed_requests(own) == devices
    finally:
        server.close()
        await server.wait_closed()
