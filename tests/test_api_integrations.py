"""Integrators managed through the API (issue #9): a real Mosquitto run from the API's data dir.

The broker is laid out as `kernex up` lays it out (`<data dir>/pki`, `<data dir>/broker`), so the
API's ACL rewrite, CRL entry and SIGHUP reach the running broker: a created credential reads
the fleet topics and nothing else; a revoked one receives nothing on its open connection and
cannot connect again (CRL); every change is audited.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kernex.api.auth.schemas import Role
from kernex.broker.config import render
from kernex.broker.pki import INGEST_IDENTITY, FleetPKI
from kernex.broker.process import MosquittoProcess
from kernex.broker.settings import BrokerSettings
from kernex.kit.settings import Environment
from kernex.protocol.fleet import fleet_filter
from kernex.protocol.topics import Topics
from kernex.storage.models import AuditEntry
from tests.fixtures.auth import AuthedApi, authed_api_on
from tests.fixtures.broker import (
    ACK_TIMEOUT_S,
    BROKER_HOST,
    TEST_PKI_PASSPHRASE,
    ClientConnectError,
    RunningBroker,
    assert_no_message,
    close_client,
    connect_client,
    free_port,
    next_message,
    publish,
    subscribe,
)
from tests.fixtures.fleet import fleet_settings

NOT_AUTHORIZED = 135  # MQTT 5 reason code "Not authorized"
RELOAD_LINE = "Reloading config."  # what Mosquitto 2.0 logs on SIGHUP


@pytest.fixture
def kernex_broker(pki: FleetPKI, tmp_path: Path) -> Iterator[RunningBroker]:
    """Mosquitto rendered into <tmp>/data/broker from a copy of the PKI in <tmp>/data/pki."""
    data_dir = tmp_path / "data"
    shutil.copytree(pki.directory, data_dir / "pki")
    own = FleetPKI(data_dir / "pki", TEST_PKI_PASSPHRASE)
    topics = Topics(f"kt/{uuid.uuid4().hex[:12]}/v1")
    settings = BrokerSettings(
        data_dir=data_dir, topic_prefix=topics.prefix, environment=Environment.DEVELOPMENT
    )
    rendered = render(settings, own, data_dir / "broker", port=free_port(), bind_address=BROKER_HOST)
    process = MosquittoProcess.for_rendered(rendered, own)
    process.start()
    try:
        yield RunningBroker(
            host=BROKER_HOST, port=rendered.port, topics=topics, pki=own, process=process, data_dir=data_dir
        )
    finally:
        process.stop()


@pytest.fixture
async def api(sqlite_url: str, tmp_path: Path, kernex_broker: RunningBroker) -> AsyncIterator[AuthedApi]:
    async with authed_api_on(tmp_path, sqlite_url, **fleet_settings(kernex_broker)) as authed:
        yield authed


def _reloads(broker: RunningBroker) -> int:
    log_path = broker.process.log_path
    assert log_path is not None
    return log_path.read_text(encoding="utf-8", errors="replace").count(RELOAD_LINE)


def _wait_reloads(broker: RunningBroker, count: int) -> None:
    """Mosquitto handles SIGHUP at its next loop iteration: wait until it logged it."""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while _reloads(broker) < count:
        assert time.monotonic() < deadline, "mosquitto did not reload"
        time.sleep(0.02)


def _credential(body: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "integrator.crt", directory / "integrator.key"
    cert_path.write_text(body["certificate_pem"])
    key_path.write_text(body["private_key_pem"])
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_an_admin_creates_lists_and_revokes_an_integrator(
    api: AuthedApi, kernex_broker: RunningBroker, tmp_path: Path
) -> None:
    broker = kernex_broker
    admin = api.headers(Role.ADMIN)
    topics = broker.topics
    ingest = await asyncio.to_thread(
        connect_client,
        broker,
        broker.pki.service_cert_path(INGEST_IDENTITY),
        broker.pki.service_key_path(INGEST_IDENTITY),
        f"ingest-{uuid.uuid4().hex[:6]}",
    )
    fleet_topic = topics.fleet("devices", "d1", "status")
    reloads = _reloads(broker)
    created = await api.client.post("/api/v1/integrations", json={"name": "acme"}, headers=admin)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["identity"], body["active"], body["broker_reloaded"]) == ("integrator-acme", True, True)
    assert body["subscribe"] == fleet_filter(topics)
    assert body["ca_certificate_pem"] == broker.pki.ca_certificate_pem
    await asyncio.to_thread(_wait_reloads, broker, reloads + 1)
    cert_path, key_path = _credential(body, tmp_path / "acme")
    client = await asyncio.to_thread(connect_client, broker, cert_path, key_path, "integrator-acme")
    try:
        assert (await asyncio.to_thread(subscribe, client, fleet_filter(topics))).value == 1
        assert not (await asyncio.to_thread(publish, ingest, fleet_topic, b'{"n":1}')).is_failure
        received = await asyncio.to_thread(next_message, client)
        assert (received.topic, received.payload) == (fleet_topic, b'{"n":1}')
        # Read-only: the broker refuses its publishes, on the fleet tree as on device topics.
        refused = await asyncio.to_thread(publish, client, fleet_topic, b"forged")
        assert refused.value == NOT_AUTHORIZED
        refused = await asyncio.to_thread(publish, client, topics.heartbeat("d1"), b"forged")
        assert refused.value == NOT_AUTHORIZED

        again = await api.client.post("/api/v1/integrations", json={"name": "acme"}, headers=admin)
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "integration_exists"
        bad = await api.client.post("/api/v1/integrations", json={"name": "Acme Corp"}, headers=admin)
        assert bad.status_code == 422
        listed = await api.client.get("/api/v1/integrations", headers=admin)
        assert [(i["name"], i["active"], "private_key_pem" in i) for i in listed.json()["items"]] == [
            ("acme", True, False)
        ]

        reloads = _reloads(broker)
        revoked = await api.client.post("/api/v1/integrations/acme/revoke", headers=admin)
        assert revoked.status_code == 200, revoked.text
        assert (revoked.json()["active"], revoked.json()["broker_reloaded"]) == (False, True)
        assert body["serial"] in broker.pki.revoked_serials()
        await asyncio.to_thread(_wait_reloads, broker, reloads + 1)
        # The open connection gets nothing any more (ACL) ...
        assert not (await asyncio.to_thread(publish, ingest, fleet_topic, b'{"n":2}')).is_failure
        await asyncio.to_thread(assert_no_message, client)
    finally:
        await asyncio.to_thread(close_client, client)
    # ... and a new one fails the TLS handshake (CRL).
    with pytest.raises(ClientConnectError):
        await asyncio.to_thread(connect_client, broker, cert_path, key_path, "integrator-acme")
    await asyncio.to_thread(close_client, ingest)

    missing = await api.client.post("/api/v1/integrations/nobody/revoke", headers=admin)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "integration_not_found"
    # A revoked name may be issued again: a new certificate, the old one stays in the CRL.
    reissued = await api.client.post("/api/v1/integrations", json={"name": "acme"}, headers=admin)
    assert reissued.status_code == 201
    assert reissued.json()["serial"] != body["serial"]

    async with api.app.state.kernex.sessions() as session:
        rows = (
            await session.exec(sa.select(AuditEntry.action, AuditEntry.outcome, AuditEntry.target))  # type: ignore[call-overload]  # SQLModel select
        ).all()
    assert rows.count(("integration.create", "success", "integration:acme")) == 2
    assert ("integration.create", "failed", "integration:acme") in rows
    assert ("integration.revoke", "success", "integration:acme") in rows
    assert ("integration.revoke", "failed", "integration:nobody") in rows


async def test_operators_cannot_manage_integrators(api: AuthedApi) -> None:
    for role in (Role.OPERATOR, Role.VIEWER):
        headers = api.headers(role)
        assert (await api.client.get("/api/v1/integrations", headers=headers)).status_code == 403
        created = await api.client.post("/api/v1/integrations", json={"name": "x"}, headers=headers)
        assert created.status_code == 403
