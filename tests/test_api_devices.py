"""The devices API in-process (real database, real PKI): registration and the read side."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI

from kernex.api.app import create_app
from kernex.api.auth import tokens
from kernex.api.auth.schemas import Role
from kernex.api.settings import ApiSettings
from kernex.broker.pki import FleetPKI
from kernex.protocol.keys import KeyType, build_csr, device_id_for, generate_private_key
from kernex.storage.database import create_engine, session_factory
from kernex.storage.models import ConnectionState, Device, Heartbeat
from tests.fixtures.auth import add_user, bearer, login


@pytest.fixture
async def api(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = ApiSettings(data_dir=tmp_path / "data", database_url=database_url, mqtt_port=1)
    FleetPKI.from_settings(settings).init()
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kernex.test") as client,
    ):
        # The operator side needs credentials: a viewer may read everything these tests read.
        await add_user(database_url, "viewer", Role.VIEWER)
        client.headers.update(bearer(await login(client, "viewer")))
        yield client, app


async def _register(client: httpx.AsyncClient, key_type: KeyType = KeyType.ECDSA_P256, **extra: object):
    key = generate_private_key(key_type)
    device_id = device_id_for(key.public_key())
    response = await client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id), **extra})
    return key, device_id, response


@pytest.mark.parametrize("key_type", list(KeyType))
async def test_register_issues_fleet_certificate_and_is_idempotent(api, key_type: KeyType) -> None:
    client, app = api
    key, device_id, first = await _register(client, key_type, name="pump-7")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["device_id"] == device_id
    assert body["status"] == "active"
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_certificate"].encode())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == device_id
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings: ApiSettings = app.state.kernex.settings
    assert body["mqtt"] == {"host": "127.0.0.1", "port": 1, "topic_prefix": settings.topic_prefix}
    assert body["command_keys"][0]["alg"] == "ES256"

    again = await client.post("/api/v1/devices/register", json={"csr": build_csr(key, "whatever")})
    assert again.status_code == 200
    assert again.json()["device_id"] == device_id

    detail = (await client.get(f"/api/v1/devices/{device_id}")).json()
    assert detail["name"] == "pump-7"
    assert detail["key_type"] == key_type.value


async def test_register_rejects_weak_malformed_and_forged_csrs(api) -> None:
    client, _ = api
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .sign(weak, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    response = await client.post("/api/v1/devices/register", json={"csr": csr})
    assert response.status_code == 422
    assert "2048" in response.json()["error"]["message"]

    response = await client.post(
        "/api/v1/devices/register", json={"csr": "-----BEGIN CERTIFICATE REQUEST-----\nnope"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_csr"

    # Proof of possession: a CSR whose signature does not match its key is refused.
    good = build_csr(generate_private_key(KeyType.ECDSA_P256), "x")
    der = bytearray(x509.load_pem_x509_csr(good.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    response = await client.post("/api/v1/devices/register", json={"csr": forged})
    assert response.status_code == 422
    assert "signature" in response.json()["error"]["message"]

    other_curve = ec.generate_private_key(ec.SECP384R1())
    csr384 = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
        .sign(other_curve, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    response = await client.post("/api/v1/devices/register", json={"csr": csr384})
    assert response.status_code == 422
    assert "P-256" in response.json()["error"]["message"]

    response = await client.post("/api/v1/devices/register", json={"csr": good, "unexpected": 1})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"

    response = await client.post(
        "/api/v1/devices/register",
        content=b"x" * (2 * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["x-request-id"]

    # A chunked body has no Content-Length to check up front: it is counted as it arrives.
    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b" " * (64 * 1024)

    response = await client.post(
        "/api/v1/devices/register", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


async def test_device_list_filters_search_pagination_and_stats(api, database_url: str) -> None:
    client, _ = api
    ids = []
    for i in range(5):
        _, device_id, response = await _register(client, name=f"sensor-{i}")
        assert response.status_code == 201
        ids.append(device_id)
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    try:
        async with session_factory(engine)() as session:
            for i, device_id in enumerate(ids[:2]):
                device = await session.get(Device, device_id)
                assert device is not None
                device.status = ConnectionState.ONLINE
                device.bundle_version = "1.0.0" if i == 0 else "2.0.0"
            for seq in range(3):
                session.add(
                    Heartbeat(
                        device_id=ids[0],
                        seq=seq,
                        ts=now - timedelta(minutes=10 - seq),
                        received_at=now,
                        status="ok",
                        cpu_percent=float(seq),
                        memory_mb=1.0,
                        disk_free_mb=2.0,
                        uptime_s=3.0,
                    )
                )
            await session.commit()
    finally:
        await engine.dispose()

    page = (await client.get("/api/v1/devices", params={"limit": 2, "offset": 0})).json()
    assert page["total"] == 5
    assert len(page["items"]) == 2
    online = (await client.get("/api/v1/devices", params={"status": "online"})).json()
    assert {d["id"] for d in online["items"]} == set(ids[:2])
    found = (await client.get("/api/v1/devices", params={"q": "sensor-3"})).json()
    assert [d["name"] for d in found["items"]] == ["sensor-3"]
    by_id = (await client.get("/api/v1/devices", params={"q": ids[4][:10]})).json()
    assert [d["id"] for d in by_id["items"]] == [ids[4]]
    wildcard = (await client.get("/api/v1/devices", params={"q": "%"})).json()
    assert wildcard["total"] == 0

    # Sorting is the API's, across pages, not only within the page a client holds.
    async def names(**params: str | int) -> list[str]:
        page = (await client.get("/api/v1/devices", params=params)).json()
        return [d["name"] for d in page["items"]]

    assert await names(sort="name", limit=2) == ["sensor-0", "sensor-1"]
    assert await names(sort="name", limit=2, offset=2) == ["sensor-2", "sensor-3"]
    assert await names() == [f"sensor-{i}" for i in reversed(range(5))], "newest registration first"
    assert (await names(sort="version"))[:2] == ["sensor-0", "sensor-1"], "versions first, none last"
    assert (await names(sort="status"))[:2] == ["sensor-0", "sensor-1"], "online before unknown"
    refused = await client.get("/api/v1/devices", params={"sort": "color"})
    assert refused.status_code == 422

    stats = (await client.get("/api/v1/devices/stats")).json()
    assert stats["total"] == 5
    assert stats["online"] == 2
    assert stats["unknown"] == 3
    assert stats["by_bundle_version"] == {"1.0.0": 1, "2.0.0": 1, "none": 3}
    assert stats["active_deployments"] == 0

    beats = (await client.get(f"/api/v1/devices/{ids[0]}/heartbeats", params={"limit": 2})).json()
    assert [b["seq"] for b in beats["items"]] == [2, 1]
    since = (now - timedelta(minutes=8, seconds=30)).isoformat()
    recent = (await client.get(f"/api/v1/devices/{ids[0]}/heartbeats", params={"since": since})).json()
    assert [b["seq"] for b in recent["items"]] == [2]
    # Paging back: a page's oldest ts is the next page's (exclusive) `until`.
    older = (
        await client.get(
            f"/api/v1/devices/{ids[0]}/heartbeats", params={"until": beats["items"][-1]["ts"], "limit": 2}
        )
    ).json()
    assert [b["seq"] for b in older["items"]] == [0]

    missing = await client.get("/api/v1/devices/0000/heartbeats")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad = await client.get("/api/v1/devices", params={"limit": 100000})
    assert bad.status_code == 422


async def test_readiness_reports_broker_down_and_health_is_up(api) -> None:
    client, _ = api
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"] != "ok"
    metrics = await client.get("/metrics")
    assert "kernex_api_requests_total" in metrics.text


async def test_database_outage_answers_503_not_500(tmp_path: Path) -> None:
    settings = ApiSettings(
        data_dir=tmp_path / "data",
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
        mqtt_port=1,
    )
    FleetPKI.from_settings(settings).init()
    app = create_app(settings)
    # A well-signed token: checking it needs the database (revocation), which is down.
    token = tokens.issue(settings.resolved_jwt_secret(), user_id="u1", token_version=0, ttl_s=60).token
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://kernex.test", headers=bearer(token)
        ) as client,
    ):
        response = await client.get("/api/v1/devices")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] != "ok"
