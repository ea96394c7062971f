"""Certificate renewal and key rotation over the device-authenticated endpoint, and the agent's Renewer.

In-process API on a real database and PKI; the agent's Renewer talks to it through httpx.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kernex.agent.identity import load_or_create
from kernex.agent.renewal import Renewer, renewal_due_in_s
from kernex.agent.state import StateStore
from kernex.api.auth.schemas import Role
from kernex.broker.pki import FleetPKI
from kernex.protocol import devicetoken
from kernex.protocol.keys import KeyType, build_csr, device_id_for, generate_private_key
from kernex.protocol.messages import RegistrationResponse
from tests.fixtures.auth import AuthedApi, bearer


def _serial(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


async def test_same_key_renews_and_other_devices_cannot(authed_api: AuthedApi) -> None:
    api = authed_api
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    first = (
        await api.client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id)})
    ).json()
    renewed = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(key, device_id)},
        headers=bearer(devicetoken.issue(key, device_id)),
    )
    assert renewed.status_code == 200, renewed.text
    body = renewed.json()
    assert body["rotated"] is False
    assert _serial(body["certificate"]) != _serial(first["certificate"])
    detail = (await api.client.get(f"/api/v1/devices/{device_id}", headers=api.headers(Role.VIEWER))).json()
    assert datetime.fromisoformat(detail["cert_not_after"]) == datetime.fromisoformat(body["not_after"])

    other = generate_private_key(KeyType.ECDSA_P256)
    other_id = device_id_for(other.public_key())
    other_cert = (
        await api.client.post("/api/v1/devices/register", json={"csr": build_csr(other, other_id)})
    ).json()["certificate"]
    refused = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(other, other_id)},
        headers=bearer(devicetoken.issue(other, other_id)),
    )
    assert refused.status_code == 403
    operator = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(key, device_id)},
        headers=api.headers(Role.ADMIN),
    )
    assert operator.status_code == 401
    audit = (await api.client.get("/api/v1/audit", headers=api.headers(Role.ADMIN))).json()["items"]
    assert any(e["action"] == "device.certificate.renew" for e in audit)

    # The certificate before the renewal is still valid for a while: revoking the device must
    # put it into the CRL too, or the device could connect with it.
    revoked = await api.client.post(f"/api/v1/devices/{device_id}/revoke", headers=api.headers(Role.ADMIN))
    assert revoked.status_code == 200, revoked.text
    in_crl = FleetPKI.from_settings(api.settings).revoked_serials()
    assert {f"{_serial(first['certificate']):x}", f"{_serial(body['certificate']):x}"} <= in_crl
    assert f"{_serial(other_cert):x}" not in in_crl, "another device's certificate stays valid"


async def test_rotation_rekeys_the_device_and_revokes_the_old_certificate(authed_api: AuthedApi) -> None:
    api = authed_api
    old = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(old.public_key())
    first = (
        await api.client.post("/api/v1/devices/register", json={"csr": build_csr(old, device_id)})
    ).json()
    new = generate_private_key(KeyType.ED25519)
    rotated = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(new, device_id)},
        headers=bearer(devicetoken.issue(old, device_id)),
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["rotated"] is True
    cert = x509.load_pem_x509_certificate(rotated.json()["certificate"].encode())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == device_id
    detail = (await api.client.get(f"/api/v1/devices/{device_id}", headers=api.headers(Role.VIEWER))).json()
    assert detail["key_type"] == "ed25519"
    pki = FleetPKI.from_settings(api.settings)
    assert f"{_serial(first['certificate']):x}" in pki.revoked_serials()
    # The new key authenticates the same device now; the old one no longer does.
    again = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(new, device_id)},
        headers=bearer(devicetoken.issue(new, device_id)),
    )
    assert again.status_code == 200, again.text
    stale = await api.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json={"csr": build_csr(old, device_id)},
        headers=bearer(devicetoken.issue(old, device_id)),
    )
    assert stale.status_code == 401


def test_renewal_is_due_in_the_last_fraction_of_the_lifetime() -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert renewal_due_in_s(pem, 1 / 3, now) == pytest.approx(timedelta(days=20).total_seconds(), abs=1)
    assert renewal_due_in_s(pem, 1 / 3, now + timedelta(days=21)) < 0


async def test_agent_renewer_stores_the_new_certificate_and_stops_once_revoked(
    authed_api: AuthedApi, tmp_path: Path
) -> None:
    api = authed_api
    identity = await asyncio.to_thread(load_or_create, tmp_path / "agent", KeyType.ECDSA_P256)
    registered = await api.client.post(
        "/api/v1/devices/register", json={"csr": build_csr(identity.key, identity.device_id)}
    )
    store = StateStore(tmp_path / "agent")
    await store.load()
    await store.save_registration(RegistrationResponse.model_validate_json(registered.content))
    before = store.cert_path.read_text()
    renewer = Renewer(api.client, "http://kernex.test", identity, store, fraction=1.0)
    new_pem = await renewer.renew()
    assert store.cert_path.read_text() == new_pem != before
    assert store.state.registration is not None
    assert store.state.registration.certificate == new_pem

    revoked = await api.client.post(
        f"/api/v1/devices/{identity.device_id}/revoke", headers=api.headers(Role.OPERATOR)
    )
    assert revoked.status_code == 200, revoked.text
    # Always due (fraction 1): run() tries at once, is refused, and returns instead of retrying.
    await asyncio.wait_for(renewer.run(), timeout=10)
    assert renewer.renewals == 1
    assert store.cert_path.read_text() == new_pem
