"""Webhooks: HMAC signatures, the outbox written with the data, retries with backoff, the log.

Endpoints are real HTTP servers on 127.0.0.1 started by the tests; the dispatcher is the one the
API's lifespan runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kernex.api.auth.schemas import Role
from kernex.api.webhooks.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    SecretBox,
    SignatureError,
    sign,
    verify,
)
from kernex.protocol.messages import Heartbeat
from kernex.storage.database import create_engine
from kernex.storage.records import VerifiedHeartbeat
from kernex.storage.writer import BatchWriter
from tests.fixtures.auth import authed_api_on
from tests.fixtures.ingest import heartbeat_claims, new_key, register_device, wait_for

SECRET = "whsec_test"


@dataclass
class Endpoint:
    """A local HTTP endpoint that answers `fail_first` requests with 500, then 200."""

    fail_first: int
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def endpoint_factory() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(fail_first: int) -> Endpoint:
        endpoint = Endpoint(fail_first)
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    endpoint.requests.append((dict(self.headers.items()), body))
                    failing = len(endpoint.requests) <= endpoint.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"nope" if failing else b"okay")

            def log_message(self, *_args: Any) -> None:
                return  # quiet test output; requests are recorded above

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        return endpoint

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_signatures_verify_and_refuse_tampering_wrong_keys_and_replays() -> None:
    body = b'{"event":"heartbeat"}'
    header = sign(SECRET, body, timestamp=1_000_000)
    verify(SECRET, body, header, now=1_000_010)
    for secret, payload, hdr, now, why in (
        (SECRET, body + b" ", header, 1_000_010, "signature does not match"),
        ("whsec_other", body, header, 1_000_010, "signature does not match"),
        (SECRET, body, header, 1_000_000 + 301, "replay window"),
        (SECRET, body, header, 1_000_000 - 301, "replay window"),
        (SECRET, body, "garbage", 1_000_000, "malformed"),
        (SECRET, body, "v1=abc", 1_000_000, "no timestamp"),
        # The signature is over the timestamp too: moving t invalidates it.
        (SECRET, body, header.replace("t=1000000", "t=1000005"), 1_000_005, "signature does not match"),
    ):
        with pytest.raises(SignatureError, match=why):
            verify(secret, payload, hdr, now=now)


def test_secrets_are_encrypted_at_rest() -> None:
    box = SecretBox("key-one")
    stored = box.encrypt(SECRET)
    assert SECRET not in stored
    assert box.decrypt(stored) == SECRET
    with pytest.raises(SignatureError):
        SecretBox("key-two").decrypt(stored)


async def _heartbeat_batch(database_url: str, seq: int = 1) -> int:
    """Commit one heartbeat of a new device through the writer; the outbox rows it queued."""
    engine = create_engine(database_url)
    try:
        key = new_key()
        device_id = await register_device(engine, key)
        claims = Heartbeat.model_validate(heartbeat_claims(device_id, seq))
        result = await BatchWriter(engine).write([VerifiedHeartbeat(device_id, claims, claims.ts)])
        assert result.heartbeats.stored == 1
        return result.webhook_deliveries
    finally:
        await engine.dispose()


async def test_deliveries_are_signed_retried_with_backoff_and_logged(
    database_url: str, tmp_path: Path, endpoint_factory: Any
) -> None:
    flaky: Endpoint = endpoint_factory(fail_first=2)
    dead: Endpoint = endpoint_factory(fail_first=1_000)
    overrides = {
        "webhook_backoff_initial_s": 0.05,
        "webhook_backoff_max_s": 0.2,
        "webhook_poll_interval_s": 0.05,
        "webhook_max_attempts": 3,
    }
    async with authed_api_on(tmp_path, database_url, **overrides) as api:
        operator = api.headers(Role.OPERATOR)
        created = await api.client.post(
            "/api/v1/webhooks", json={"url": flaky.url, "event_types": ["heartbeat"]}, headers=operator
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        secret = hook["secret"]
        assert secret.startswith("whsec_")
        other = await api.client.post(
            "/api/v1/webhooks",
            json={"url": dead.url, "event_types": ["heartbeat", "status"]},
            headers=operator,
        )
        assert other.status_code == 201, other.text
        status_only = await api.client.post(
            "/api/v1/webhooks", json={"url": dead.url, "event_types": ["deployments"]}, headers=operator
        )
        assert status_only.status_code == 201
        listed = await api.client.get("/api/v1/webhooks", headers=api.headers(Role.VIEWER))
        assert listed.status_code == 200
        assert {h["id"] for h in listed.json()["items"]} == {
            hook["id"],
            other.json()["id"],
            status_only.json()["id"],
        }
        assert "secret" not in listed.text
        async with api.app.state.kernex.engine.connect() as conn:
            stored = (await conn.execute(sa.text("SELECT secret_encrypted FROM webhooks"))).scalars().all()
        assert all(secret not in s for s in stored)

        # A device's first heartbeat: a heartbeat delivery for both heartbeat webhooks, and its
        # status change (now online) for the one that takes status; none for the third.
        assert await _heartbeat_batch(database_url) == 3

        async def log_of(webhook_id: str) -> list[dict[str, Any]]:
            answer = await api.client.get(f"/api/v1/webhooks/{webhook_id}/deliveries", headers=operator)
            assert answer.status_code == 200, answer.text
            items: list[dict[str, Any]] = answer.json()["items"]
            return items

        async def settled(webhook_id: str) -> list[dict[str, Any]]:
            items = await log_of(webhook_id)
            return items if items and all(i["status"] != "pending" for i in items) else []

        flaky_log = await wait_for(lambda: settled(hook["id"]), "the flaky endpoint's delivery to succeed")
        dead_log = await wait_for(lambda: settled(other.json()["id"]), "the dead endpoint's delivery to fail")
        assert await log_of(status_only.json()["id"]) == []

    [delivery] = flaky_log
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("succeeded", 3, 200)
    assert delivery["last_error"] is None
    assert delivery["delivered_at"] is not None
    assert len(flaky.requests) == 3
    for headers, body in flaky.requests:
        verify(secret, body, headers[SIGNATURE_HEADER])
        assert headers[DELIVERY_HEADER] == delivery["id"]
        assert headers[EVENT_HEADER] == "heartbeat"
        assert headers["Content-Type"] == "application/json"
        payload = json.loads(body)
        assert payload["event"] == "heartbeat"
        assert payload["data"]["type"] == "heartbeat"
        assert payload["data"]["seq"] == 1
    # Every attempt sends the same body (receivers dedupe by Kernex-Delivery).
    assert len({body for _, body in flaky.requests}) == 1

    assert sorted(d["event_type"] for d in dead_log) == ["heartbeat", "status"]
    for failed in dead_log:
        assert (failed["status"], failed["attempts"], failed["last_status_code"]) == ("failed", 3, 500)
        assert failed["last_error"] == "HTTP 500: nope"
    assert len(dead.requests) == 6
    with pytest.raises(SignatureError):
        verify(secret, dead.requests[0][1], dead.requests[0][0][SIGNATURE_HEADER])  # another webhook's secret


async def test_an_unreachable_endpoint_is_logged_and_deleting_a_webhook_drops_its_deliveries(
    sqlite_url: str, tmp_path: Path
) -> None:
    overrides = {"webhook_backoff_initial_s": 60.0, "webhook_poll_interval_s": 0.05}
    async with authed_api_on(tmp_path, sqlite_url, **overrides) as api:
        admin = api.headers(Role.ADMIN)
        # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        created = await api.client.post(
            "/api/v1/webhooks",
            json={"url": "http://127.0.0.1:9/x", "event_types": ["heartbeat"]},
            headers=admin,
        )
        assert created.status_code == 201
        hook_id = created.json()["id"]
        assert await _heartbeat_batch(sqlite_url) == 1

        async def attempted() -> list[dict[str, Any]]:
            answer = await api.client.get(f"/api/v1/webhooks/{hook_id}/deliveries", headers=admin)
            items: list[dict[str, Any]] = answer.json()["items"]
            return [i for i in items if i["attempts"] >= 1]

        [delivery] = await wait_for(attempted, "the first attempt")
        assert delivery["status"] == "pending"  # retried later (backoff 30-60 s)
        assert delivery["last_status_code"] is None
        assert delivery["last_error"].startswith("ConnectError")
        deleted = await api.client.delete(f"/api/v1/webhooks/{hook_id}", headers=admin)
        assert deleted.status_code == 200
        assert (
            await api.client.get(f"/api/v1/webhooks/{hook_id}/deliveries", headers=admin)
        ).status_code == 404
        assert (await api.client.delete(f"/api/v1/webhooks/{hook_id}", headers=admin)).status_code == 404
        async with api.app.state.kernex.engine.connect() as conn:
            left = (await conn.execute(sa.text("SELECT count(*) FROM webhook_deliveries"))).scalar_one()
            actions = (
                await conn.execute(
                    sa.text("SELECT action, outcome FROM audit_log WHERE action LIKE 'webhook.%'")
                )
            ).all()
        assert left == 0
        assert sorted(tuple(a) for a in actions) == [
            ("webhook.create", "success"),
            ("webhook.delete", "failed"),
            ("webhook.delete", "success"),
        ]
        refused = await api.client.post(
            "/api/v1/webhooks", json={"url": "ftp://x", "event_types": ["heartbeat"]}, headers=admin
        )
        assert refused.status_code == 422
        refused = await api.client.post(
            "/api/v1/webhooks", json={"url": "http://x", "event_types": ["nope"]}, headers=admin
        )
        assert refused.status_code == 422


async def test_no_webhooks_means_no_outbox_rows(sqlite_url: str) -> None:
    assert await _heartbeat_batch(sqlite_url) == 0
