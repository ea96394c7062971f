"""Operator authentication and API hardening, in-process on real databases.

JWT negatives (alg none, tampered, expired, wrong audience/issuer, missing claims, key confusion,
revoked), login brute force (429 + Retry-After), registration, bcrypt import, API tokens, device
tokens versus operator tokens, the audit log, security headers, CORS, content types, offline docs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlmodel import func, select

from kernex.api.auth import service, tokens
from kernex.api.auth.deps import DeviceDep
from kernex.api.auth.schemas import Role
from kernex.protocol import devicetoken
from kernex.protocol.keys import KeyType, build_csr, device_id_for, generate_private_key, public_key_to_pem
from kernex.storage.database import engine_scope, session_factory
from kernex.storage.models import AdmissionState, ApiToken, AuditEntry, Device, User
from tests.fixtures.auth import PASSWORD, AuthedApi, add_user, api_settings, bearer, login, running_api

ME = "/api/v1/auth/me"
DEVICE_ONLY = "/api/v1/test-device-only"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(api: AuthedApi, **changes: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": tokens.ISSUER,
        "sub": api.users[Role.ADMIN].id,
        "aud": tokens.OPERATOR_AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "jti": "j" * 32,
        "ver": 0,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    api: AuthedApi, claims: dict[str, object], *, secret: str | None = None, typ: str | None = None
) -> str:
    return jwt.encode(
        claims,
        secret or api.settings.resolved_jwt_secret(),
        algorithm="HS256",
        headers={"typ": typ or tokens.OPERATOR_TOKEN_TYP},
    )


async def _status(api: AuthedApi, token: str, path: str = ME) -> httpx.Response:
    return await api.client.get(path, headers=bearer(token))


def _assert_unauthorized(response: httpx.Response, *, token_given: bool = True) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) is token_given
    body = response.json()["error"]
    assert body["code"] == "unauthorized"
    assert body["request_id"] == response.headers["x-request-id"]


async def test_valid_access_token_says_who_i_am(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    for role in Role:
        me = await api.client.get(ME, headers=api.headers(role))
        assert me.status_code == 200
        assert me.json() == {
            "kind": "user",
            "id": api.users[role].id,
            "name": f"{role.value}-user",
            "role": role.value,
        }
    claims = jwt.decode(
        api.tokens[Role.ADMIN],
        api.settings.resolved_jwt_secret(),
        algorithms=["HS256"],
        audience="kernex-operators",
    )
    assert claims["exp"] - claims["iat"] == 3600
    assert {"exp", "iat", "sub", "aud", "iss", "jti"} <= claims.keys()
    assert claims["iss"] == "kernex"


async def test_jwt_negatives_are_all_401(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    assert (await _status(api, _sign(api, _claims(api)))).status_code == 200, "the baseline is valid"
    _assert_unauthorized(await api.client.get(ME), token_given=False)

    header_none = _b64({"alg": "none", "typ": tokens.OPERATOR_TOKEN_TYP})
    unsigned = f"{header_none}.{_b64(_claims(api))}."
    _assert_unauthorized(await _status(api, unsigned))

    good = _sign(api, _claims(api))
    head, payload, signature = good.split(".")
    tampered_payload = _b64(_claims(api, sub=api.users[Role.VIEWER].id))
    _assert_unauthorized(await _status(api, f"{head}.{tampered_payload}.{signature}"))
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    _assert_unauthorized(await _status(api, f"{head}.{payload}.{flipped}"))

    past = int(time.time()) - 7200
    _assert_unauthorized(await _status(api, _sign(api, _claims(api, iat=past, exp=past + 3600))))
    _assert_unauthorized(await _status(api, _sign(api, _claims(api, aud="kernex-api"))))
    _assert_unauthorized(await _status(api, _sign(api, _claims(api, iss="someone-else"))))
    for claim in ("exp", "iat", "sub", "aud", "iss", "jti"):
        _assert_unauthorized(await _status(api, _sign(api, _claims(api, **{claim: None}))))
    _assert_unauthorized(await _status(api, _sign(api, _claims(api), secret="another-secret-" + "z" * 40)))

    # Algorithm confusion: an ES256 token (e.g. signed by a device key) is refused, whatever it says.
    device_key = generate_private_key(KeyType.ECDSA_P256)
    es256 = jwt.encode(
        _claims(api), device_key, algorithm="ES256", headers={"typ": tokens.OPERATOR_TOKEN_TYP}
    )
    _assert_unauthorized(await _status(api, es256))
    # ... and an HS256 token keyed with the public key (the classic confusion) is a wrong secret.
    public_pem = public_key_to_pem(device_key.public_key()).encode()
    signing_input = f"{_b64({'alg': 'HS256', 'typ': tokens.OPERATOR_TOKEN_TYP})}.{_b64(_claims(api))}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    _assert_unauthorized(await _status(api, confused))
    # A right signature on the wrong token type (e.g. a future token kind) is refused too.
    _assert_unauthorized(await _status(api, _sign(api, _claims(api), typ="JWT")))
    _assert_unauthorized(await _status(api, "not-a-jwt"))


async def test_logout_revokes_one_token_and_logout_all_every_token(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    first = api.tokens[Role.OPERATOR]
    second = await login(api.client, "operator-user")
    assert (await api.client.post("/api/v1/auth/logout", headers=bearer(first))).status_code == 204
    _assert_unauthorized(await _status(api, first))
    assert (await _status(api, second)).status_code == 200, "other sessions live on"

    third = await login(api.client, "operator-user")
    assert (await api.client.post("/api/v1/auth/logout-all", headers=bearer(second))).status_code == 204
    _assert_unauthorized(await _status(api, second))
    _assert_unauthorized(await _status(api, third))
    assert (await _status(api, await login(api.client, "operator-user"))).status_code == 200


async def test_password_change_and_disabling_revoke_tokens(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    token = api.tokens[Role.VIEWER]
    wrong = await api.client.post(
        "/api/v1/auth/password",
        json={"current_password": "not it", "new_password": "a brand new passphrase"},
        headers=bearer(token),
    )
    assert wrong.status_code == 403
    changed = await api.client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
        headers=bearer(token),
    )
    assert changed.status_code == 204
    _assert_unauthorized(await _status(api, token))
    fresh = await login(api.client, "viewer-user", "a brand new passphrase")

    disabled = await api.client.patch(
        f"/api/v1/users/{api.users[Role.VIEWER].id}", json={"disabled": True}, headers=api.headers(Role.ADMIN)
    )
    assert disabled.status_code == 200
    assert disabled.json()["disabled"] is True
    _assert_unauthorized(await _status(api, fresh))
    refused = await api.client.post(
        "/api/v1/auth/login", json={"username": "viewer-user", "password": "a brand new passphrase"}
    )
    assert refused.status_code == 401

    last_admin = await api.client.patch(
        f"/api/v1/users/{api.users[Role.ADMIN].id}", json={"role": "viewer"}, headers=api.headers(Role.ADMIN)
    )
    assert last_admin.status_code == 409, "the fleet never loses its last admin"


async def test_login_brute_force_gets_429_with_retry_after(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(tmp_path, sqlite_url, login_rate_limit_per_minute=5)
    async with running_api(settings) as (_app, client):
        await add_user(sqlite_url, "alice", Role.OPERATOR)
        statuses = []
        for attempt in range(8):
            response = await client.post(
                "/api/v1/auth/login", json={"username": "alice", "password": f"guess-{attempt}"}
            )
            statuses.append(response.status_code)
        assert statuses == [401] * 5 + [429] * 3
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limited"
        assert response.headers["x-request-id"]
        # Even the right password waits: the limit counts attempts, not failures.
        right = await client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
        assert right.status_code == 429
        # Another username from the same address is not locked out by alice's attempts...
        await add_user(sqlite_url, "bob", Role.VIEWER)
        assert (
            await client.post("/api/v1/auth/login", json={"username": "bob", "password": PASSWORD})
        ).status_code == 200
        # ...but spraying many usernames from one address hits the per-address limit (4x).
        sprayed = [
            (await client.post("/api/v1/auth/login", json={"username": f"u{i}", "password": "x"})).status_code
            for i in range(20)
        ]
        assert 429 in sprayed


async def test_api_rate_limit_per_client_address(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(tmp_path, sqlite_url, rate_limit_per_minute=3, trust_forwarded_for=True)
    async with running_api(settings) as (_app, client):
        first = [(await client.get(ME)).status_code for _ in range(4)]
        assert first == [401, 401, 401, 429]
        other = await client.get(ME, headers={"X-Forwarded-For": "198.51.100.7"})
        assert other.status_code == 401, "another client has its own budget"
        assert (await client.get("/healthz")).status_code == 200, "probes are never limited"


JOSE = {"content-type": "application/jose"}


async def test_device_requests_count_per_device_under_an_address_ceiling(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = api_settings(
        tmp_path, sqlite_url, rate_limit_per_minute=2, device_rate_limit_per_address_per_minute=5
    )
    async with running_api(settings) as (_app, client):
        # A fleet behind one NAT address: each device has its own budget (unknown ids answer 401).
        statuses = [
            (await client.post(f"/api/v1/devices/dev{n}/heartbeat", content=b"x", headers=JOSE)).status_code
            for n in (1, 2)
        ]
        assert statuses == [401, 401]
        again = await client.post("/api/v1/devices/dev1/heartbeat", content=b"x", headers=JOSE)
        third = await client.post("/api/v1/devices/dev1/heartbeat", content=b"x", headers=JOSE)
        assert (again.status_code, third.status_code) == (401, 429), "one device past its own limit"
        assert "this device" in third.json()["error"]["message"]
        # A device JWT names its device in `kid`: bundle downloads count against that device too.
        key = generate_private_key(KeyType.ECDSA_P256)
        token = devicetoken.issue(key, "dev3")
        download = await client.get(
            "/api/v1/bundles/b1/download", headers={"Authorization": f"Bearer {token}"}
        )
        assert download.status_code != 429
        # Random ids from one address stop at the address ceiling (5 device requests a minute).
        ceiling = await client.post("/api/v1/devices/dev4/heartbeat", content=b"x", headers=JOSE)
        assert ceiling.status_code == 429
        assert "from this address" in ceiling.json()["error"]["message"]
        # Operator requests keep their own per-address budget.
        assert (await client.get(ME)).status_code == 401


async def test_unknown_user_and_wrong_password_look_the_same_and_are_audited(
    sqlite_authed_api: AuthedApi,
) -> None:
    api = sqlite_authed_api
    unknown = await api.client.post("/api/v1/auth/login", json={"username": "mallory", "password": "x"})
    wrong = await api.client.post("/api/v1/auth/login", json={"username": "admin-user", "password": "x"})
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json()["error"]["message"] == wrong.json()["error"]["message"]

    denied = await api.client.get(
        "/api/v1/audit", params={"action": "auth.login", "outcome": "denied"}, headers=api.headers(Role.ADMIN)
    )
    assert denied.status_code == 200
    entries = denied.json()["items"]
    assert {e["target"] for e in entries} == {"user:mallory", "user:admin-user"}
    assert all(e["address"] == "127.0.0.1" and e["actor"] == "anonymous" for e in entries)
    ok = await api.client.get(
        "/api/v1/audit",
        params={"actor": "user:admin-user", "action": "auth.login"},
        headers=api.headers(Role.ADMIN),
    )
    assert ok.json()["total"] == 1
    assert ok.json()["items"][0]["outcome"] == "success"
    later = await api.client.get(
        "/api/v1/audit",
        params={"since": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()},
        headers=api.headers(Role.ADMIN),
    )
    assert later.json()["total"] == 0
    naive = await api.client.get(
        "/api/v1/audit", params={"since": "2026-01-01T00:00:00"}, headers=api.headers(Role.ADMIN)
    )
    assert naive.status_code == 422, "times need a zone"
    assert (await api.client.get("/api/v1/audit", headers=api.headers(Role.OPERATOR))).status_code == 403


async def test_registration_bootstrap_then_admin_only(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(tmp_path, sqlite_url)
    async with running_api(settings) as (_app, client):
        body = {"username": "first", "password": "a long first password", "role": "viewer"}
        first = await client.post("/api/v1/auth/register", json=body)
        assert first.status_code == 201, first.text
        assert first.json()["role"] == "admin", "the first account is the admin"
        again = await client.post("/api/v1/auth/register", json={**body, "username": "second"})
        _assert_unauthorized(again, token_given=False)

        admin = await login(client, "first", "a long first password")
        second = await client.post(
            "/api/v1/auth/register", json={**body, "username": "second"}, headers=bearer(admin)
        )
        assert second.status_code == 201
        assert second.json()["role"] == "viewer"
        assert "password" not in json.dumps(second.json())
        viewer = await login(client, "second", "a long first password")
        refused = await client.post(
            "/api/v1/auth/register", json={**body, "username": "third"}, headers=bearer(viewer)
        )
        assert refused.status_code == 403
        duplicate = await client.post("/api/v1/auth/register", json=body, headers=bearer(admin))
        assert duplicate.status_code == 409
        short = await client.post(
            "/api/v1/auth/register",
            json={**body, "username": "x3", "password": "short"},
            headers=bearer(admin),
        )
        assert short.status_code == 422

        audit = await client.get("/api/v1/audit", params={"action": "user.register"}, headers=bearer(admin))
        outcomes = sorted((e["actor"], e["outcome"]) for e in audit.json()["items"])
        assert ("bootstrap:first", "success") in outcomes
        assert ("user:first", "failed") in outcomes
        denied = await client.get(
            "/api/v1/audit", params={"actor": "user:second", "outcome": "denied"}, headers=bearer(admin)
        )
        assert [e["action"] for e in denied.json()["items"]] == ["POST /api/v1/auth/register"], (
            "a refused mutation is audited"
        )


async def test_production_has_no_open_bootstrap(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(
        tmp_path,
        sqlite_url,
        environment="production",
        pki_passphrase="p" * 8 + "q" * 8 + "0123456789",
        jwt_secret="prod-jwt-secret-0123456789-abcdefghijkl",
    )
    async with running_api(settings) as (_app, client):
        body = {"username": "first", "password": "a long first password"}
        response = await client.post("/api/v1/auth/register", json=body)
        assert response.status_code == 403
        assert "kernex users create-admin" in response.json()["error"]["message"]


async def test_bcrypt_hashes_import_and_upgrade_to_argon2id(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    legacy = bcrypt.hashpw(b"imported password!", bcrypt.gensalt(rounds=4)).decode()
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        await service.create_user(session, username="legacy", role=Role.VIEWER, password_hash=legacy)
    await login(api.client, "legacy", "imported password!")
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        user = (await session.exec(select(User).where(User.username == "legacy"))).one()
        assert user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


async def test_api_tokens_scoped_shown_once_revocable_expiring(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    admin = api.headers(Role.ADMIN)
    created = await api.client.post("/api/v1/tokens", json={"name": "ci", "scope": "read"}, headers=admin)
    assert created.status_code == 201, created.text
    read_token = created.json()["token"]
    assert read_token.startswith("kx_")
    operator = await api.client.post(
        "/api/v1/tokens", json={"name": "deployer", "scope": "operator", "expires_in_days": 1}, headers=admin
    )
    operator_token = operator.json()["token"]

    me = (await api.client.get(ME, headers=bearer(read_token))).json()
    assert me["kind"] == "api_token"
    assert me["role"] == "viewer"
    assert (await api.client.get(ME, headers=bearer(operator_token))).json()["role"] == "operator"
    assert (await api.client.get("/api/v1/devices", headers=bearer(read_token))).status_code == 200
    assert (await api.client.get("/api/v1/users", headers=bearer(operator_token))).status_code == 403
    assert (await api.client.post("/api/v1/auth/logout", headers=bearer(read_token))).status_code == 403

    listed = (await api.client.get("/api/v1/tokens", headers=admin)).json()["items"]
    assert {t["name"] for t in listed} == {"ci", "deployer"}
    assert all("token" not in t and "secret_sha256" not in t for t in listed)
    assert next(t for t in listed if t["name"] == "ci")["last_used_at"] is not None
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        row = await session.get(ApiToken, created.json()["id"])
        assert row is not None
        assert read_token.rsplit("_", 1)[-1] not in row.secret_sha256, "only a digest is stored"
        assert len(row.secret_sha256) == 64

    token_id = created.json()["id"]
    tampered = read_token[:-1] + ("A" if read_token[-1] != "A" else "B")  # always a different secret
    _assert_unauthorized(await api.client.get(ME, headers=bearer(tampered)))
    _assert_unauthorized(await api.client.get(ME, headers=bearer("kx_0000000000000000_" + "a" * 43)))
    assert (await api.client.delete(f"/api/v1/tokens/{token_id}", headers=admin)).status_code == 200
    _assert_unauthorized(await api.client.get(ME, headers=bearer(read_token)))
    assert (await api.client.delete("/api/v1/tokens/nope", headers=admin)).status_code == 404

    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        row = await session.get(ApiToken, operator.json()["id"])
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        await session.commit()
    _assert_unauthorized(await api.client.get(ME, headers=bearer(operator_token)))

    actions = {e["action"] for e in (await api.client.get("/api/v1/audit", headers=admin)).json()["items"]}
    assert {"token.create", "token.revoke"} <= actions


async def _registered_device(client: httpx.AsyncClient, key_type: KeyType = KeyType.ECDSA_P256):
    key = generate_private_key(key_type)
    device_id = device_id_for(key.public_key())
    response = await client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id)})
    assert response.status_code == 201
    return key, device_id


def _add_device_route(app: FastAPI) -> None:
    async def device_only(device_id: DeviceDep) -> dict[str, str]:
        return {"device_id": device_id}

    app.add_api_route(DEVICE_ONLY, device_only, methods=["GET"])


@pytest.mark.parametrize("key_type", list(KeyType))
async def test_device_endpoints_take_only_device_tokens_and_operator_endpoints_refuse_them(
    sqlite_authed_api: AuthedApi, key_type: KeyType
) -> None:
    api = sqlite_authed_api
    _add_device_route(api.app)
    key, device_id = await _registered_device(api.client, key_type)
    device_token = devicetoken.issue(key, device_id)

    ok = await api.client.get(DEVICE_ONLY, headers=bearer(device_token))
    assert ok.status_code == 200
    assert ok.json() == {"device_id": device_id}

    # Operator credentials of every kind are refused on the device endpoint.
    api_token = (
        await api.client.post(
            "/api/v1/tokens", json={"name": "x", "scope": "operator"}, headers=api.headers(Role.ADMIN)
        )
    ).json()["token"]
    for token in (api.tokens[Role.ADMIN], api_token):
        _assert_unauthorized(await api.client.get(DEVICE_ONLY, headers=bearer(token)))
    _assert_unauthorized(await api.client.get(DEVICE_ONLY), token_given=False)
    # ... and the device token is refused on operator endpoints.
    for path in (ME, "/api/v1/devices", f"/api/v1/devices/{device_id}"):
        _assert_unauthorized(await api.client.get(path, headers=bearer(device_token)))

    other_key = generate_private_key(KeyType.ECDSA_P256)
    forged = devicetoken.issue(other_key, device_id)
    _assert_unauthorized(await api.client.get(DEVICE_ONLY, headers=bearer(forged)))
    unknown_key = generate_private_key(KeyType.ECDSA_P256)
    unknown = devicetoken.issue(unknown_key, device_id_for(unknown_key.public_key()))
    _assert_unauthorized(await api.client.get(DEVICE_ONLY, headers=bearer(unknown)))

    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        device = await session.get(Device, device_id)
        assert device is not None
        device.state = AdmissionState.REVOKED
        await session.commit()
    revoked = await api.client.get(DEVICE_ONLY, headers=bearer(devicetoken.issue(key, device_id)))
    assert revoked.status_code == 403


async def test_security_headers_request_ids_cors_and_content_types(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(
        tmp_path, sqlite_url, cors_origins=["https://dash.example.com"], trust_forwarded_for=True
    )
    async with running_api(settings) as (_app, client):
        for response in (await client.get("/healthz"), await client.get(ME), await client.get("/nope")):
            headers = response.headers
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
            assert headers["x-request-id"]
            assert "strict-transport-security" not in headers, "no HSTS over plain HTTP"
        assert (await client.get(ME)).headers["cache-control"] == "no-store"
        assert (await client.get(ME, headers={"X-Request-ID": "abc-123"})).headers[
            "x-request-id"
        ] == "abc-123"
        https = await client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        assert https.headers["strict-transport-security"].startswith("max-age=31536000")

        allowed = await client.options(
            "/api/v1/auth/login",
            headers={"Origin": "https://dash.example.com", "Access-Control-Request-Method": "POST"},
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://dash.example.com"
        assert allowed.headers["x-request-id"]
        foreign = await client.options(
            "/api/v1/auth/login",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in foreign.headers

        plain = await client.post(
            "/api/v1/auth/login",
            content=b'{"username":"a","password":"b"}',
            headers={"content-type": "text/plain"},
        )
        assert plain.status_code == 415
        assert plain.json()["error"]["code"] == "unsupported_media_type"
        malformed = await client.post(
            "/api/v1/auth/login", content=b"{", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422
        assert malformed.json()["error"]["code"] == "validation_error"


async def test_docs_work_offline(sqlite_url: str, tmp_path: Path) -> None:
    async with running_api(api_settings(tmp_path, sqlite_url)) as (_app, client):
        page = await client.get("/docs")
        assert page.status_code == 200
        assert "swagger-ui-bundle.js" in page.text
        assert "http://" not in page.text, "no CDN: Kernex runs offline"
        assert "https://" not in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]
        bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
        assert bundle.status_code == 200
        assert "SwaggerUIBundle" in bundle.text
        init = await client.get("/docs/init.js")
        assert '"/openapi.json"' in init.text
        assert (await client.get("/docs/assets/swagger-ui.css")).status_code == 200
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "Kernex API"
        assert (await client.get("/redoc")).status_code == 404, "ReDoc would load from a CDN"


async def test_metrics_token_when_configured(sqlite_url: str, tmp_path: Path) -> None:
    settings = api_settings(tmp_path, sqlite_url, metrics_token="scrape-token-0123456789")
    async with running_api(settings) as (_app, client):
        _assert_unauthorized(await client.get("/metrics"), token_given=False)
        _assert_unauthorized(await client.get("/metrics", headers=bearer("wrong")))
        ok = await client.get("/metrics", headers=bearer("scrape-token-0123456789"))
        assert ok.status_code == 200
        assert "kernex_api_requests_total" in ok.text


async def test_auth_on_postgres_and_sqlite(authed_api: AuthedApi) -> None:
    """The whole chain (login, token check, denylist, API token, audit) on both databases."""
    api = authed_api
    assert (await api.client.get(ME, headers=api.headers(Role.VIEWER))).json()["role"] == "viewer"
    token = (
        await api.client.post("/api/v1/tokens", json={"name": "pg"}, headers=api.headers(Role.ADMIN))
    ).json()["token"]
    assert (await api.client.get(ME, headers=bearer(token))).status_code == 200
    assert (await api.client.post("/api/v1/auth/logout", headers=api.headers(Role.VIEWER))).status_code == 204
    _assert_unauthorized(await api.client.get(ME, headers=api.headers(Role.VIEWER)))
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        count = (await session.exec(select(func.count()).select_from(AuditEntry))).one()
        assert count >= 5  # three logins, a token, a logout
