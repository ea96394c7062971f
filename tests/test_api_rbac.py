"""Every route x every kind of caller: the role model is enforced where it is declared.

Routes are enumerated from the app, so a route added later without an expectation here fails
`test_every_route_has_a_declared_expectation`: declare who may call it in EXPECTED.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from kernex.api.auth import tokens
from kernex.api.auth.schemas import Role
from kernex.protocol import devicetoken
from kernex.protocol.keys import KeyType, build_csr, device_id_for, generate_private_key
from kernex.storage.database import engine_scope, session_factory
from kernex.storage.models import User
from tests.fixtures.auth import AuthedApi, bearer


class Access(StrEnum):
    """Who may call a route."""

    PUBLIC = "public"  # anyone (probes, docs, login, device registration by CSR)
    VIEWER = "viewer"  # any operator-side caller: user or API token
    OPERATOR = "operator"
    ADMIN = "admin"
    USER = "user"  # any user's access token, never an API token (logout, password)
    DEVICE = "device"  # only a device-signed JWT
    DEVICE_OR_VIEWER = "device-or-viewer"  # a device JWT or any operator-side caller (downloads)
    # Only the JWT of the device the path names (the HTTP fallback). The matrix's path names a
    # device that does not exist, so the registered device is refused there with 403.
    DEVICE_SELF = "device-self"


EXPECTED: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.PUBLIC,
    ("GET", "/readyz"): Access.PUBLIC,
    ("GET", "/metrics"): Access.PUBLIC,
    ("GET", "/openapi.json"): Access.PUBLIC,
    ("GET", "/docs"): Access.PUBLIC,
    ("GET", "/docs/init.js"): Access.PUBLIC,
    ("MOUNT", "/docs/assets"): Access.PUBLIC,
    ("POST", "/api/v1/auth/login"): Access.PUBLIC,
    # Admin-only once an admin exists (it does here); the bootstrap case is tested in test_api_auth.
    ("POST", "/api/v1/auth/register"): Access.ADMIN,
    ("GET", "/api/v1/auth/me"): Access.VIEWER,
    ("POST", "/api/v1/auth/logout"): Access.USER,
    ("POST", "/api/v1/auth/logout-all"): Access.USER,
    ("POST", "/api/v1/auth/password"): Access.USER,
    ("GET", "/api/v1/users"): Access.ADMIN,
    ("GET", "/api/v1/users/{user_id}"): Access.ADMIN,
    ("PATCH", "/api/v1/users/{user_id}"): Access.ADMIN,
    ("POST", "/api/v1/tokens"): Access.ADMIN,
    ("GET", "/api/v1/tokens"): Access.ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): Access.ADMIN,
    ("POST", "/api/v1/webhooks"): Access.OPERATOR,
    ("GET", "/api/v1/webhooks"): Access.VIEWER,
    ("DELETE", "/api/v1/webhooks/{webhook_id}"): Access.OPERATOR,
    ("GET", "/api/v1/webhooks/{webhook_id}/deliveries"): Access.VIEWER,
    ("GET", "/api/v1/audit"): Access.ADMIN,
    ("POST", "/api/v1/integrations"): Access.ADMIN,
    ("GET", "/api/v1/integrations"): Access.ADMIN,
    ("POST", "/api/v1/integrations/{name}/revoke"): Access.ADMIN,
    ("GET", "/api/v1/command-keys"): Access.VIEWER,
    ("POST", "/api/v1/command-keys/rotate"): Access.ADMIN,
    ("DELETE", "/api/v1/command-keys/{kid}"): Access.ADMIN,
    # The CSR is the device's proof of possession; admission policies decide what follows.
    ("POST", "/api/v1/devices/register"): Access.PUBLIC,
    ("GET", "/api/v1/devices"): Access.VIEWER,
    ("GET", "/api/v1/devices/stats"): Access.VIEWER,
    ("GET", "/api/v1/devices/{device_id}"): Access.VIEWER,
    ("GET", "/api/v1/devices/{device_id}/heartbeats"): Access.VIEWER,
    ("POST", "/api/v1/devices/{device_id}/accept"): Access.OPERATOR,
    ("POST", "/api/v1/devices/{device_id}/reject"): Access.OPERATOR,
    ("POST", "/api/v1/devices/{device_id}/revoke"): Access.OPERATOR,
    ("POST", "/api/v1/devices/{device_id}/certificate"): Access.DEVICE_SELF,
    ("POST", "/api/v1/enrollment-tokens"): Access.OPERATOR,
    ("GET", "/api/v1/enrollment-tokens"): Access.OPERATOR,
    ("DELETE", "/api/v1/enrollment-tokens/{token_id}"): Access.OPERATOR,
    ("POST", "/api/v1/preauthorizations"): Access.OPERATOR,
    ("GET", "/api/v1/preauthorizations"): Access.OPERATOR,
    ("DELETE", "/api/v1/preauthorizations/{key_fingerprint}"): Access.OPERATOR,
    ("POST", "/api/v1/bundles"): Access.OPERATOR,
    ("GET", "/api/v1/bundles"): Access.VIEWER,
    ("GET", "/api/v1/bundles/manifest-schema"): Access.VIEWER,
    ("GET", "/api/v1/bundles/{bundle_id}"): Access.VIEWER,
    ("DELETE", "/api/v1/bundles/{bundle_id}"): Access.OPERATOR,
    ("GET", "/api/v1/bundles/{bundle_id}/download"): Access.DEVICE_OR_VIEWER,
    ("POST", "/api/v1/deployments"): Access.OPERATOR,
    ("GET", "/api/v1/deployments"): Access.VIEWER,
    ("GET", "/api/v1/deployments/{deployment_id}"): Access.VIEWER,
    ("POST", "/api/v1/deployments/{deployment_id}/cancel"): Access.OPERATOR,
    ("POST", "/api/v1/deployments/preview"): Access.VIEWER,
    ("GET", "/api/v1/deployments/{deployment_id}/rollout"): Access.VIEWER,
    ("POST", "/api/v1/deployments/{deployment_id}/approve"): Access.OPERATOR,
    ("POST", "/api/v1/groups"): Access.OPERATOR,
    ("GET", "/api/v1/groups"): Access.VIEWER,
    ("GET", "/api/v1/groups/{group_id}"): Access.VIEWER,
    ("PATCH", "/api/v1/groups/{group_id}"): Access.OPERATOR,
    ("DELETE", "/api/v1/groups/{group_id}"): Access.OPERATOR,
    ("GET", "/api/v1/groups/{group_id}/devices"): Access.VIEWER,
    ("POST", "/api/v1/groups/{group_id}/members"): Access.OPERATOR,
    ("DELETE", "/api/v1/groups/{group_id}/members/{device_id}"): Access.OPERATOR,
    ("PUT", "/api/v1/devices/{device_id}/tags"): Access.OPERATOR,
    ("GET", "/api/v1/devices/{device_id}/bundle-history"): Access.VIEWER,
    ("POST", "/api/v1/devices/{device_id}/rollback"): Access.OPERATOR,
    ("GET", "/api/v1/devices/{device_id}/config"): Access.VIEWER,
    ("PUT", "/api/v1/devices/{device_id}/config"): Access.OPERATOR,
    ("GET", "/api/v1/devices/{device_id}/config/history"): Access.VIEWER,
    ("GET", "/api/v1/config/defaults"): Access.VIEWER,
    ("PUT", "/api/v1/config/defaults"): Access.OPERATOR,
    ("POST", "/api/v1/devices/{device_id}/heartbeat"): Access.DEVICE_SELF,
    ("POST", "/api/v1/devices/{device_id}/events"): Access.DEVICE_SELF,
    # The dashboard's page and assets are public (the page asks for a login); its data is not.
    ("GET", "/"): Access.PUBLIC,
    ("GET", "/ui"): Access.PUBLIC,
    ("GET", "/ui/"): Access.PUBLIC,
    ("GET", "/ui/assets/{digest}/{name:path}"): Access.PUBLIC,
    ("GET", "/api/v1/events/stream"): Access.VIEWER,
}

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Starlette adds HEAD to every GET; CORS answers OPTIONS


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves; mounts as ("MOUNT", path)."""
    found: set[tuple[str, str]] = set()
    # Included routers are resolved lazily by FastAPI; this walks them like its own router does.
    for context in iter_route_contexts(app.routes):
        path = context.path or repr(context.original_route)
        if isinstance(context.original_route, Mount):
            found.add(("MOUNT", path))
        elif context.methods:
            found.update((method, path) for method in context.methods if method not in IGNORED_METHODS)
        else:
            found.add((type(context.original_route).__name__, path))
    return found


@dataclass(frozen=True)
class Caller:
    """One kind of credential."""

    name: str
    role: Role | None = None  # users and API tokens
    kind: str = "anonymous"  # anonymous, user, api_token, device


CALLERS = [
    Caller("anonymous"),
    Caller("viewer", Role.VIEWER, "user"),
    Caller("operator", Role.OPERATOR, "user"),
    Caller("admin", Role.ADMIN, "user"),
    Caller("read-token", Role.VIEWER, "api_token"),
    Caller("operator-token", Role.OPERATOR, "api_token"),
    Caller("device", None, "device"),
]


def expected_status(access: Access, caller: Caller) -> int | None:
    """401 or 403 when the caller must be refused, None when it must get through."""
    if access is Access.PUBLIC:
        return None
    device_routes = {Access.DEVICE: None, Access.DEVICE_SELF: 403, Access.DEVICE_OR_VIEWER: None}
    if access in device_routes:
        if caller.kind == "device":
            return device_routes[access]
        refused = caller.kind == "anonymous" or access is not Access.DEVICE_OR_VIEWER
        return 401 if refused else None
    if caller.kind in {"anonymous", "device"}:
        return 401
    assert caller.role is not None
    if access is Access.USER:
        return None if caller.kind == "user" else 403
    return None if caller.role.includes(Role(access.value)) else 403


def _concrete(path: str) -> str:
    # Path parameters get a value no row has: handlers answer 404 after the auth check passed.
    return re.sub(r"\{[^}]+\}", "does-not-exist", path)


def test_every_route_has_a_declared_expectation(sqlite_authed_api: AuthedApi) -> None:
    routes = app_routes(sqlite_authed_api.app)
    undeclared = sorted(routes - EXPECTED.keys())
    assert not undeclared, (
        f"declare who may call these routes in tests/test_api_rbac.py EXPECTED: {undeclared}"
    )
    stale = sorted(EXPECTED.keys() - routes)
    assert not stale, f"EXPECTED lists routes the app no longer has: {stale}"


async def _credentials(
    api: AuthedApi, caller: Caller, api_tokens: dict[Role, str], device_token: str
) -> dict[str, str]:
    if caller.kind == "anonymous":
        return {}
    if caller.kind == "device":
        return bearer(device_token)
    assert caller.role is not None
    if caller.kind == "api_token":
        return bearer(api_tokens[caller.role])
    # A fresh token per request: logout and logout-all revoke the one they are called with.
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        user = await session.get(User, api.users[caller.role].id)
        assert user is not None
        version = user.token_version
    secret = api.settings.resolved_jwt_secret()
    return bearer(tokens.issue(secret, user_id=user.id, token_version=version, ttl_s=60).token)


async def test_rbac_matrix(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    admin = api.headers(Role.ADMIN)
    api_tokens = {}
    for role, scope in ((Role.VIEWER, "read"), (Role.OPERATOR, "operator")):
        created = await api.client.post("/api/v1/tokens", json={"name": scope, "scope": scope}, headers=admin)
        api_tokens[role] = created.json()["token"]
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    registered = await api.client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id)})
    assert registered.status_code == 201

    failures: list[str] = []
    checked = 0
    for (method, path), access in sorted(EXPECTED.items()):
        if method == "MOUNT":
            target = f"{path}/swagger-ui.css"
            method = "GET"  # noqa: PLW2901 - a mount is probed with a GET of one of its files
        else:
            target = _concrete(path)
        for caller in CALLERS:
            headers = await _credentials(api, caller, api_tokens, devicetoken.issue(key, device_id))
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            response: httpx.Response = await api.client.request(method, target, json=body, headers=headers)
            checked += 1
            want = expected_status(access, caller)
            got = response.status_code
            if want is None and got in {401, 403}:
                failures.append(f"{method} {path} as {caller.name}: refused with {got}, expected through")
            elif want is not None and got != want:
                failures.append(f"{method} {path} as {caller.name}: got {got}, expected {want}")
            elif got >= 500 and got != 503:  # 503: /readyz with the broker down, as declared
                failures.append(f"{method} {path} as {caller.name}: server error {got}")
            if got == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")
    assert not failures, "\n".join(failures)
    assert checked == len(EXPECTED) * len(CALLERS)


@pytest.mark.parametrize(
    ("access", "caller", "want"),
    [
        (Access.ADMIN, CALLERS[5], 403),
        (Access.USER, CALLERS[4], 403),
        (Access.DEVICE, CALLERS[3], 401),
        (Access.VIEWER, CALLERS[6], 401),
        (Access.OPERATOR, CALLERS[2], None),
        (Access.DEVICE_OR_VIEWER, CALLERS[0], 401),
        (Access.DEVICE_OR_VIEWER, CALLERS[6], None),
    ],
)
def test_expected_status_follows_the_role_order(access: Access, caller: Caller, want: int | None) -> None:
    assert expected_status(access, caller) == want
