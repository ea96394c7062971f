"""Property-based run of schemathesis over the OpenAPI schema, in-process (ASGI) on SQLite.

Every operation is called with generated (valid and invalid) inputs as an admin: no response
may be a 5xx, and every response must match the schema (status code, content type, body).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from kernex.api.app import create_app
from kernex.api.auth import tokens
from kernex.api.auth.schemas import Role
from kernex.broker.pki import FleetPKI
from kernex.storage.migrate import upgrade
from tests.fixtures.auth import add_user, api_settings, bearer

MAX_EXAMPLES = 40  # per operation: about 20 operations stay well under a minute
# A CSR is a PEM document whose signature and key are checked: a schema-valid string is not
# yet a valid CSR, so "schema-valid data is accepted" cannot hold there (422 invalid_csr is right).
# Likewise a bundle upload is a signed .tar.gz whose manifest is checked, not any binary file.
# A pre-authorization names a key by a PEM public key or CSR, checked the same way.
SEMANTIC_BODIES = {
    ("POST", "/api/v1/devices/register"),
    ("POST", "/api/v1/bundles"),
    ("POST", "/api/v1/preauthorizations"),
    ("POST", "/api/v1/devices/{device_id}/certificate"),
    # A rollout strategy's cumulative phase percentages must grow and a maintenance window must not
    # be empty: cross-field rules JSON Schema cannot state (422 with the reason is right).
    ("POST", "/api/v1/deployments"),
    ("POST", "/api/v1/deployments/preview"),
}
# The devices' HTTP fallback takes a compact JWS as application/jose; any text exercises the route
# (the admin's token is refused there with 401, as declared).
schemathesis.openapi.media_type("application/jose", st.text(max_size=256).map(str.encode))


@pytest.fixture
def schema_app(tmp_path: Path) -> tuple[FastAPI, str]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'kernex.db'}"
    upgrade(url)
    settings = api_settings(tmp_path, url)
    FleetPKI.from_settings(settings).init()
    admin = asyncio.run(add_user(url, "schema-admin", Role.ADMIN))
    # A token that outlives the run; logout, logout-all and password change would end it (left out).
    token = tokens.issue(settings.resolved_jwt_secret(), user_id=admin.id, token_version=0, ttl_s=3600).token
    return create_app(settings), token


# schemathesis's own generators draw from `random` (its concern, not the API's); warnings are errors here.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)
def test_openapi_conformance_without_server_errors(schema_app: tuple[FastAPI, str]) -> None:
    app, token = schema_app
    schema = (
        schemathesis.openapi.from_asgi("/openapi.json", app)
        .exclude(path="/api/v1/auth/logout")
        .exclude(path="/api/v1/auth/logout-all")
        .exclude(path="/api/v1/auth/password")
        # Answers its declared 503 here: no broker runs in this test (readiness has its own tests).
        .exclude(path="/readyz")
        # An event stream stays open (up to a minute per call); tests/test_dashboard_events.py covers it.
        .exclude(path="/api/v1/events/stream")
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, "the schema lists the API's operations"
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            semantic = (case.method.upper(), case.path) in SEMANTIC_BODIES
            case.call_and_validate(
                headers=bearer(token) | {"X-Request-ID": uuid.uuid4().hex},
                excluded_checks=[positive_data_acceptance] if semantic else [],
            )

        run()
    assert calls >= len(operations)
