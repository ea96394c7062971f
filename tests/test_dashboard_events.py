"""The dashboard's server side: the events hub on both databases, the stream's protocol, the
page and asset routes (CSP, caching, no third-party or remote code)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.auth.schemas import Role
from kernex.api.dashboard import stream
from kernex.api.dashboard.hub import Batch, EventHub
from kernex.api.dashboard.routes import DASHBOARD_CSP, STATIC_DIR, load_assets
from kernex.protocol.keys import KeyType, generate_private_key
from kernex.storage.database import create_engine
from tests.fixtures.auth import AuthedApi
from tests.fixtures.ingest import register_device

WAIT_S = 10.0


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(sql), params)


async def next_batch(hub: EventHub, after: int) -> Batch:
    batches = await hub.wait(after, WAIT_S)
    assert batches, "no change reported"
    return batches[0]


def events(batch: Batch) -> dict[str, dict[str, Any]]:
    return dict(batch.events)


async def test_hub_reports_devices_deployments_and_targets_and_replays_by_cursor(engine: AsyncEngine) -> None:
    first = await register_device(engine, generate_private_key(KeyType.ECDSA_P256))
    second = await register_device(engine, generate_private_key(KeyType.ECDSA_P256))
    hub = EventHub(engine, interval_s=0.05)
    try:
        async with hub.listening():
            start = hub.cursor
            assert hub.since(start) == [], "nothing happened since the baseline"

            await execute(engine, "UPDATE devices SET status = 'online' WHERE id = :id", id=first)
            batch = await next_batch(hub, 0)
            changes = events(batch)
            assert changes["stats"]["online"] == 1
            assert changes["stats"]["total"] == 2
            assert [d["id"] for d in changes["devices"]["items"]] == [first]
            assert changes["devices"]["items"][0]["status"] == "online"

            # A deployment appears with its targets; a target moves; the deployment finishes.
            await execute(
                engine,
                "INSERT INTO bundles (id, name, version, sha256, size, manifest, storage_key, quarantined,"
                " created_at) VALUES ('b1', 'app', '1.0.0', :sha, 1, '{}', 'k', false, CURRENT_TIMESTAMP)",
                sha="0" * 64,
            )
            await execute(
                engine,
                "INSERT INTO deployments (id, bundle_id, status, rollback, timeout_s, created_at)"
                " VALUES ('d1', 'b1', 'in_progress', false, 60, CURRENT_TIMESTAMP)",
            )
            for device in (first, second):
                await execute(
                    engine,
                    "INSERT INTO deployment_targets (deployment_id, device_id, status, revision, updated_at)"
                    " VALUES ('d1', :device, 'pending', 1, CURRENT_TIMESTAMP)",
                    device=device,
                )

            async def settled_with(predicate: Any, after: int) -> Batch:
                # Inserts land across polls: read batches until one shows what is awaited.
                seq = after
                while True:
                    batch = await next_batch(hub, seq)
                    seq = batch.seq
                    if predicate(events(batch)):
                        return batch

            created = await settled_with(
                lambda e: "targets" in e and len(e["targets"]["items"]) == 2, batch.seq
            )
            assert events(created)["stats"]["active_deployments"] == 1

            await execute(
                engine,
                "UPDATE deployment_targets SET status = 'succeeded' WHERE device_id = :device",
                device=first,
            )
            moved = await settled_with(lambda e: "targets" in e, created.seq)
            assert events(moved)["targets"]["items"] == [
                {
                    "deployment_id": "d1",
                    "device_id": first,
                    "status": "succeeded",
                    "error": None,
                    "updated_at": events(moved)["targets"]["items"][0]["updated_at"],
                }
            ]
            counts = events(moved)["deployments"]["items"][0]
            assert counts["counts"] == {"succeeded": 1, "pending": 1}
            assert counts["total"] == 2

            await execute(engine, "UPDATE deployment_targets SET status = 'failed', error = 'boom'")
            await execute(engine, "UPDATE deployments SET status = 'partially_failed'")
            done = await settled_with(
                lambda e: any(
                    d["status"] == "partially_failed" for d in e.get("deployments", {}).get("items", [])
                ),
                moved.seq,
            )
            assert events(done)["stats"]["active_deployments"] == 0

            # A reconnecting stream gets exactly the batches after its cursor; a foreign or
            # too-old cursor cannot be replayed.
            replay = hub.since(start)
            assert replay is not None
            assert [b.seq for b in replay] == list(range(1, hub.since(start)[-1].seq + 1))  # type: ignore[index]
            assert hub.since(f"other.{replay[-1].seq}") is None
            assert hub.since(f"{hub.epoch}.999999") is None
            assert hub.since(None) is None
    finally:
        await hub.stop()


async def test_hub_keeps_going_through_a_database_error_and_stops_when_idle(engine: AsyncEngine) -> None:
    hub = EventHub(engine, interval_s=0.02, idle_stop_s=0.1)
    async with hub.listening():
        await engine.dispose()  # the next polls reconnect: the feed does not end
        await asyncio.sleep(0.1)
    # Nobody listens: the poller stops by itself, and a new one starts a new epoch.
    epoch = hub.epoch
    for _ in range(100):
        if hub._task is not None and hub._task.done():
            break
        await asyncio.sleep(0.02)
    assert hub._task is not None
    assert hub._task.done()
    async with hub.listening():
        assert hub.epoch != epoch
    await hub.stop()


async def _first_chunks(hub: EventHub, last_event_id: str | None, count: int) -> list[str]:
    chunks: list[str] = []
    generator = stream._events(hub, last_event_id)
    try:
        async for chunk in generator:
            chunks.append(chunk)
            if len(chunks) == count:
                break
    finally:
        await generator.aclose()
    return chunks


def _parse(text: str) -> list[dict[str, Any]]:
    messages = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
        messages.append(fields)
    return messages


async def test_stream_says_hello_then_resumes_from_last_event_id(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    device = await register_device(engine, generate_private_key(KeyType.ED25519))
    hub = EventHub(engine, interval_s=0.05)
    try:
        (hello,) = await _first_chunks(hub, None, 1)
        assert hello.startswith("retry: ")
        (message,) = _parse(hello.split("\n", 1)[1])
        assert message["event"] == "hello"
        assert message["data"]["resumed"] is False, "a new stream re-fetches"
        cursor = message["id"]

        async with hub.listening():
            await execute(engine, "UPDATE devices SET status = 'offline' WHERE id = :id", id=device)
            await next_batch(hub, int(cursor.rpartition(".")[2]))
            hello_again, replayed = await _first_chunks(hub, cursor, 2)
        assert _parse(hello_again.split("\n", 1)[1])[0]["data"]["resumed"] is True
        messages = _parse(replayed)
        assert [m["event"] for m in messages] == ["stats", "devices"]
        assert "id" not in messages[0], "the id rides on the batch's last event"
        assert messages[-1]["id"].startswith(hub.epoch + ".")
        assert messages[1]["data"]["items"][0]["status"] == "offline"
    finally:
        await hub.stop()
        await engine.dispose()


async def test_stream_route_wants_an_event_stream_and_a_viewer(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    refused = await api.client.get("/api/v1/events/stream", headers=api.headers(Role.VIEWER))
    assert refused.status_code == 406
    assert refused.json()["error"]["code"] == "not_acceptable"
    anonymous = await api.client.get("/api/v1/events/stream", headers={"Accept": "text/event-stream"})
    assert anonymous.status_code == 401
    operation = api.app.openapi()["paths"]["/api/v1/events/stream"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]


async def test_dashboard_page_and_assets_are_same_origin_and_cacheable(sqlite_authed_api: AuthedApi) -> None:
    client = sqlite_authed_api.client
    assert (await client.get("/")).headers["location"] == "/ui/"
    assert (await client.get("/ui")).headers["location"] == "/ui/"
    page = await client.get("/ui/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert csp == DASHBOARD_CSP
    assert "unsafe" not in csp
    assert "script-src 'self'" in csp
    assert page.headers["cache-control"] == "no-cache"
    assets = load_assets()
    script = f"/ui/assets/{assets.digest}/js/app.js"
    assert f'src="{script}"' in page.text

    asset = await client.get(script)
    assert asset.status_code == 200
    assert asset.headers["content-type"].startswith("text/javascript")
    assert "immutable" in asset.headers["cache-control"]
    assert asset.headers["content-security-policy"] == DASHBOARD_CSP
    revalidated = await client.get(script, headers={"If-None-Match": asset.headers["etag"]})
    assert revalidated.status_code == 304
    stale = await client.get("/ui/assets/0123456789abcdef/js/app.js")
    assert stale.status_code == 200
    assert stale.headers["cache-control"] == "no-cache", "an old page's digest is not cached for good"
    for missing in ("js/nope.js", "%2e%2e/routes.py", "index.html"):
        assert (await client.get(f"/ui/assets/{assets.digest}/{missing}")).status_code == 404
    # The client folds the dots away; whatever route that reaches, no file is served.
    assert (await client.get(f"/ui/assets/{assets.digest}/../../dashboard/routes.py")).status_code != 200


REMOTE_URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
# Strings run as code, or markup built from strings (fleet data must never become markup).
BANNED_JS = ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write")


def test_static_app_loads_nothing_remote_and_runs_no_strings_as_code() -> None:
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".html", ".css", ".js", ".svg"}
    for path in files:
        text = path.read_text()
        remote = [m for m in REMOTE_URL.findall(text.replace(SVG_NAMESPACE, "")) if m]
        assert not remote, f"{path.name} refers to a remote origin: {remote}"
        if path.suffix == ".js":
            for banned in (
                "eval(",
                "new Function",
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ):
                assert banned not in text, f"{path.relative_to(STATIC_DIR)} uses {banned}"
            # Every module is small enough to read; a minified or vendored file would not be.
            assert max(len(line) for line in text.splitlines()) < 200, f"{path.name} has a very long line"
    html = (STATIC_DIR / "index.html").read_text()
    assert "<script>" not in html, "no inline script: the CSP forbids it"
    assert "style=" not in html


def test_every_module_the_app_imports_is_served(tmp_path: Path) -> None:
    assets = load_assets()
    for path in (STATIC_DIR / "js").rglob("*.js"):
        for spec in re.findall(r'from "(\.[^"]+)"', path.read_text()):
            target = (path.parent / spec).resolve().relative_to(STATIC_DIR.resolve()).as_posix()
            assert target in assets.files, f"{path.name} imports {spec}, which is not served"
