"""Admission policies in-process (real database, real PKI): auto, token, manual, pre-authorization."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kernex.api.auth.schemas import Role
from kernex.protocol.keys import (
    KeyType,
    build_csr,
    device_id_for,
    generate_private_key,
    public_key_fingerprint,
    public_key_to_pem,
)
from kernex.storage.database import engine_scope
from tests.fixtures.auth import AuthedApi, authed_api_on


@pytest.fixture
async def token_api(database_url: str, tmp_path: Path) -> AsyncIterator[AuthedApi]:
    async with authed_api_on(tmp_path, database_url, admission_policy="token") as api:
        yield api


@pytest.fixture
async def manual_api(database_url: str, tmp_path: Path) -> AsyncIterator[AuthedApi]:
    async with authed_api_on(tmp_path, database_url, admission_policy="manual") as api:
        yield api


class _Device:
    def __init__(self) -> None:
        self.key = generate_private_key(KeyType.ECDSA_P256)
        self.id = device_id_for(self.key.public_key())

    def body(self, **extra: Any) -> dict[str, Any]:
        return {"csr": build_csr(self.key, self.id), **extra}

    async def register(self, api: AuthedApi, **extra: Any) -> httpx.Response:
        return await api.client.post("/api/v1/devices/register", json=self.body(**extra))


async def _token(api: AuthedApi, **body: Any) -> dict[str, Any]:
    created = await api.client.post(
        "/api/v1/enrollment-tokens", json={"name": "line 3", **body}, headers=api.headers(Role.OPERATOR)
    )
    assert created.status_code == 201, created.text
    result: dict[str, Any] = created.json()
    return result


async def _audit_actions(api: AuthedApi) -> list[str]:
    page = await api.client.get("/api/v1/audit", params={"limit": 100}, headers=api.headers(Role.ADMIN))
    assert page.status_code == 200, page.text
    return [entry["action"] for entry in page.json()["items"]]


async def test_manual_device_is_pending_without_certificate_until_accepted(manual_api: AuthedApi) -> None:
    api = manual_api
    device = _Device()
    first = await device.register(api, name="pump-1")
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "pending"
    assert first.json()["certificate"] is None
    again = await device.register(api)
    assert again.status_code == 200
    assert again.json()["status"] == "pending"
    assert again.json()["certificate"] is None

    pending = await api.client.get(
        "/api/v1/devices", params={"state": "pending"}, headers=api.headers(Role.VIEWER)
    )
    assert [d["id"] for d in pending.json()["items"]] == [device.id]
    # A viewer may see pending devices but not admit them.
    refused = await api.client.post(f"/api/v1/devices/{device.id}/accept", headers=api.headers(Role.VIEWER))
    assert refused.status_code == 403

    accepted = await api.client.post(
        f"/api/v1/devices/{device.id}/accept", headers=api.headers(Role.OPERATOR)
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["state"] == "active"
    polled = await device.register(api)
    assert polled.json()["status"] == "active"
    assert polled.json()["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    # Accepting twice is a conflict, and the failure is audited too.
    twice = await api.client.post(f"/api/v1/devices/{device.id}/accept", headers=api.headers(Role.OPERATOR))
    assert twice.status_code == 409
    actions = await _audit_actions(api)
    assert actions.count("device.accept") == 2


async def test_rejected_device_never_gets_a_certificate(manual_api: AuthedApi) -> None:
    api = manual_api
    device = _Device()
    assert (await device.register(api)).json()["status"] == "pending"
    rejected = await api.client.post(
        f"/api/v1/devices/{device.id}/reject", headers=api.headers(Role.OPERATOR)
    )
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["state"] == "rejected"
    again = await device.register(api)
    assert again.json()["status"] == "rejected"
    assert again.json()["certificate"] is None
    # An active device cannot be "rejected" (that is revocation).
    other = _Device()
    await api.client.post(f"/api/v1/devices/{other.id}/reject", headers=api.headers(Role.OPERATOR))
    assert (await other.register(api)).json()["status"] == "pending"
    await api.client.post(f"/api/v1/devices/{other.id}/accept", headers=api.headers(Role.OPERATOR))
    conflict = await api.client.post(f"/api/v1/devices/{other.id}/reject", headers=api.headers(Role.OPERATOR))
    assert conflict.status_code == 409
    missing = await api.client.post("/api/v1/devices/nope/accept", headers=api.headers(Role.OPERATOR))
    assert missing.status_code == 404
    assert "device.reject" in await _audit_actions(api)


async def test_token_admits_at_once_with_its_tags_and_is_stored_hashed(token_api: AuthedApi) -> None:
    api = token_api
    created = await _token(api, tags=["site-a", "line-3"], max_uses=5)
    token = created["token"]
    assert token.startswith("kxe_")
    device = _Device()
    admitted = await device.register(api, enrollment_token=token)
    assert admitted.status_code == 201, admitted.text
    assert admitted.json()["status"] == "active"
    assert admitted.json()["certificate"]
    detail = await api.client.get(f"/api/v1/devices/{device.id}", headers=api.headers(Role.VIEWER))
    assert detail.json()["tags"] == ["line-3", "site-a"]
    listed = await api.client.get("/api/v1/enrollment-tokens", headers=api.headers(Role.OPERATOR))
    [row] = listed.json()["items"]
    assert row["uses"] == 1
    assert "token" not in row
    async with engine_scope(api.database_url) as engine, engine.connect() as conn:
        stored = (await conn.execute(sa.text("SELECT secret_sha256 FROM enrollment_tokens"))).scalar_one()
    assert stored not in token
    assert len(stored) == 64
    assert "enrollment_token.create" in await _audit_actions(api)


async def test_no_or_invalid_token_waits_pending(token_api: AuthedApi) -> None:
    api = token_api
    created = await _token(api)
    no_token = await _Device().register(api)
    assert no_token.json()["status"] == "pending"
    wrong_secret = created["token"][:-4] + "AAAA"
    assert (await _Device().register(api, enrollment_token=wrong_secret)).json()["status"] == "pending"
    assert (await _Device().register(api, enrollment_token="garbage")).json()["status"] == "pending"
    # A pending device that later brings a valid token is admitted on that registration.
    device = _Device()
    assert (await device.register(api)).json()["status"] == "pending"
    admitted = await device.register(api, enrollment_token=created["token"])
    assert admitted.status_code == 200
    assert admitted.json()["status"] == "active"


async def test_token_max_uses_is_enforced_under_concurrency(token_api: AuthedApi) -> None:
    api = token_api
    token = (await _token(api, max_uses=2))["token"]
    devices = [_Device() for _ in range(6)]
    answers = await asyncio.gather(*(d.register(api, enrollment_token=token) for d in devices))
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses == ["active", "active", "pending", "pending", "pending", "pending"]
    listed = await api.client.get("/api/v1/enrollment-tokens", headers=api.headers(Role.OPERATOR))
    assert listed.json()["items"][0]["uses"] == 2


async def test_expired_and_revoked_tokens_admit_nothing(token_api: AuthedApi) -> None:
    api = token_api
    expired = await _token(api, expires_in_days=1)
    async with engine_scope(api.database_url) as engine, engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE enrollment_tokens SET expires_at = :past WHERE id = :id"),
            {"past": datetime.now(UTC) - timedelta(seconds=1), "id": expired["id"]},
        )
    assert (await _Device().register(api, enrollment_token=expired["token"])).json()["status"] == "pending"

    revoked = await _token(api)
    gone = await api.client.delete(
        f"/api/v1/enrollment-tokens/{revoked['id']}", headers=api.headers(Role.OPERATOR)
    )
    assert gone.status_code == 200
    assert gone.json()["revoked_at"] is not None
    assert (await _Device().register(api, enrollment_token=revoked["token"])).json()["status"] == "pending"
    missing = await api.client.delete("/api/v1/enrollment-tokens/nope", headers=api.headers(Role.OPERATOR))
    assert missing.status_code == 404
    # The server default expiry applies when the operator gives none.
    default = await _token(api)
    expires = datetime.fromisoformat(default["expires_at"])
    want = datetime.now(UTC) + timedelta(days=api.settings.enrollment_token_default_ttl_days)
    assert abs((expires - want).total_seconds()) < 60


async def test_token_is_ignored_under_manual(manual_api: AuthedApi) -> None:
    api = manual_api
    token = (await _token(api))["token"]
    assert (await _Device().register(api, enrollment_token=token)).json()["status"] == "pending"


@pytest.mark.parametrize("how", ["key_fingerprint", "public_key_pem", "csr"])
async def test_preauthorized_key_is_admitted_on_first_contact(manual_api: AuthedApi, how: str) -> None:
    api = manual_api
    device = _Device()
    named = {
        "key_fingerprint": public_key_fingerprint(device.key.public_key()),
        "public_key_pem": public_key_to_pem(device.key.public_key()),
        "csr": build_csr(device.key, device.id),
    }
    created = await api.client.post(
        "/api/v1/preauthorizations",
        json={how: named[how], "name": "gate-4", "tags": ["gates"]},
        headers=api.headers(Role.OPERATOR),
    )
    assert created.status_code == 201, created.text
    duplicate = await api.client.post(
        "/api/v1/preauthorizations", json={how: named[how]}, headers=api.headers(Role.OPERATOR)
    )
    assert duplicate.status_code == 409
    admitted = await device.register(api)
    assert admitted.json()["status"] == "active"
    detail = (await api.client.get(f"/api/v1/devices/{device.id}", headers=api.headers(Role.VIEWER))).json()
    assert detail["name"] == "gate-4"
    assert detail["tags"] == ["gates"]
    listed = await api.client.get("/api/v1/preauthorizations", headers=api.headers(Role.OPERATOR))
    [row] = listed.json()["items"]
    assert row["device_id"] == device.id
    assert row["used_at"] is not None
    # Another key is not admitted by it.
    assert (await _Device().register(api)).json()["status"] == "pending"
    deleted = await api.client.delete(
        f"/api/v1/preauthorizations/{row['key_fingerprint']}", headers=api.headers(Role.OPERATOR)
    )
    assert deleted.status_code == 200
    assert "device.preauthorize" in await _audit_actions(api)


async def test_preauthorization_needs_exactly_one_key(manual_api: AuthedApi) -> None:
    api = manual_api
    device = _Device()
    both = await api.client.post(
        "/api/v1/preauthorizations",
        json={
            "key_fingerprint": public_key_fingerprint(device.key.public_key()),
            "csr": build_csr(device.key, device.id),
        },
        headers=api.headers(Role.OPERATOR),
    )
    assert both.status_code == 422
    bad_pem = await api.client.post(
        "/api/v1/preauthorizations", json={"public_key_pem": "not a key"}, headers=api.headers(Role.OPERATOR)
    )
    assert bad_pem.status_code == 422


async def test_auto_policy_admits_at_once(authed_api: AuthedApi) -> None:
    answer = await _Device().register(authed_api)
    assert answer.json()["status"] == "active"
    assert answer.json()["certificate"]
