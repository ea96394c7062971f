"""Renewal across a real expiry (issue #6): short-lived certificates, a real agent, a real broker.

The in-process API issues device certificates that live KERNEX_DEVICE_CERT_VALIDITY_S seconds;
the agent registers, connects over mutual TLS, and renews on its own before each expires. Once
the first certificate has expired (the broker refuses it), the agent, restarted, still
connects: with the certificate it renewed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from kernex.agent.agent import Agent
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.kit.backoff import Backoff
from tests.fixtures.broker import ClientConnectError, RunningBroker, close_client, connect_client
from tests.fixtures.fleet import Fleet, open_fleet, wait_until

VALIDITY_S = 15  # short enough to outlive in a test, long enough for a loaded host's handshakes
WAIT_S = 60.0  # an expiry plus a margin on a loaded 2-core host


@pytest.fixture
async def fleet(sqlite_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, sqlite_url, broker, device_cert_validity_s=VALIDITY_S) as opened:
        yield opened


def _agent(fleet: Fleet, state_dir: Path) -> Agent:
    settings = AgentSettings(
        state_dir=state_dir,
        api_url=str(fleet.api.client.base_url),
        heartbeat_interval_s=60,
        fallback_after_s=0,
    )
    # The API's in-process client: registration and renewal reach the API under test.
    return Agent(settings, http=fleet.api.client, reconnect_backoff=Backoff(initial_s=0.2, max_s=1.0))


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.wait({task})
        assert task.cancelled(), "the agent must stop by cancellation, not by an error"


async def _until(predicate: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return predicate()

    await wait_until(check, what, timeout=WAIT_S)


def _certificate(state_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state_dir / "device.crt").read_bytes())


async def test_a_short_lived_certificate_is_renewed_before_it_expires_and_the_agent_keeps_connecting(
    fleet: Fleet, tmp_path: Path
) -> None:
    state_dir = tmp_path / "device"
    agent = _agent(fleet, state_dir)
    async with running(agent):
        await _until(lambda: agent.stats.connected, "the agent registered and connected")
        first = _certificate(state_dir)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime.total_seconds() == 2 * VALIDITY_S  # backdated by at most its validity
        first_path = tmp_path / "first.crt"
        first_path.write_bytes((state_dir / "device.crt").read_bytes())

        def renewed() -> bool:
            return _certificate(state_dir).serial_number != first.serial_number

        await _until(renewed, "the agent renewed its certificate")
        assert datetime.now(UTC) < first.not_valid_after_utc, "renewed before the first expired"

        async def first_expired() -> bool:
            return datetime.now(UTC) > first.not_valid_after_utc

        await wait_until(first_expired, "the first certificate expired", timeout=WAIT_S)
        assert agent.stats.connected

    # The broker refuses the expired certificate ...
    identity_key = state_dir / "device.key"
    device_id = agent.device_id
    assert device_id is not None
    with pytest.raises(ClientConnectError):
        await asyncio.to_thread(connect_client, fleet.broker, first_path, identity_key, f"{device_id}-old")
    # ... and the agent, restarted after that expiry, connects with what it renewed.
    again = _agent(fleet, state_dir)
    async with running(again):
        await _until(lambda: again.stats.connected, "the restarted agent connected")
        current = _certificate(state_dir)
        assert current.serial_number != first.serial_number
        assert current.not_valid_after_utc > datetime.now(UTC)
        stored = await StateStore(state_dir).load()
        assert stored.registration is not None
        assert stored.registration.certificate == (state_dir / "device.crt").read_text()
    # And the renewed certificate, not the agent's session, is what the broker accepts.
    client = await asyncio.to_thread(
        connect_client, fleet.broker, state_dir / "device.crt", identity_key, f"{device_id}-probe"
    )
    await asyncio.to_thread(close_client, client)
