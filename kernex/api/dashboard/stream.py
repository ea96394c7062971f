"""`GET /api/v1/events/stream`: the fleet's changes as server-sent events, for viewers and up.

Authentication is the API's usual `Authorization: Bearer` header (access or API token), checked
when the stream opens. The dashboard reads the stream with `fetch()`, which can send that
header, rather than with `EventSource`, which cannot: so no token ever travels in a URL (where
proxies and access logs keep it), no cookie is needed and there is no CSRF surface. A stream
ends after `STREAM_MAX_S`; the client reconnects with `Last-Event-ID` and is authenticated
again, so a revoked or expired token stops receiving within that time.

Events (each `data` is one JSON object):
- `hello` `{"cursor", "resumed"}` first. `resumed: false` means: re-fetch what you show, every
  later change arrives as an event. `resumed: true` means the missed batches follow.
- `stats` `{"total", "online", "offline", "unknown", "active_deployments"}`
- `devices` `{"items": [{"id", "name", "status", "state", "last_seen_at", "health",
  "bundle_version", "config_version", "config_applied_version", "config_error"}
  | {"id", "removed": true}]}`
- `deployments` `{"items": [{"id", "status", "finished_at", "cancelled_at", "counts"?, "total"?}]}`
- `targets` `{"items": [{"deployment_id", "device_id", "status", "error", "updated_at"}]}`
- `resync` `{"reason"}`: too much changed to list, re-fetch.
The `id` of a batch's last event is the cursor to resume from. A comment line every
`KEEPALIVE_S` keeps proxies from closing an idle stream and lets clients notice a dead one.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import StreamingResponse

from kernex.api.auth.deps import ViewerDep
from kernex.api.dashboard.hub import Batch, EventHub
from kernex.api.errors import ApiError, ErrorBody
from kernex.api.state import AppState

STREAM_MAX_S = 60.0  # then the client reconnects and is authenticated again
KEEPALIVE_S = 15.0  # well under the 60 s idle timeout of common proxies (nginx proxy_read_timeout)
# The stream checks this often whether the server is shutting down (below).
SHUTDOWN_CHECK_S = 0.5
RETRY_MS = 2000  # the reconnection delay the SSE `retry:` field suggests to clients
EVENT_STREAM = "text/event-stream"


class NotAcceptableError(ApiError):
    """The caller did not ask for an event stream."""

    status_code = HTTPStatus.NOT_ACCEPTABLE
    code = "not_acceptable"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The events hub on the app's engine; its poller starts with the first stream."""
    state: AppState = app.state.kernex
    hub = EventHub(state.engine)
    app.state.dashboard_events = hub
    try:
        yield
    finally:
        await hub.stop()


def get_hub(request: Request) -> EventHub:
    """The process's events hub."""
    hub: EventHub = request.app.state.dashboard_events
    return hub


router = APIRouter(prefix="/api/v1/events", tags=["events"], lifespan=lifespan)


def _server_exiting() -> bool:
    """True once uvicorn was told to stop (Ctrl-C, SIGTERM).

    uvicorn waits for every open response before it shuts down, and an event stream never ends
    by itself: without this, one open dashboard would hold the API process on Ctrl-C for up to
    STREAM_MAX_S. uvicorn's signal handler is a bound method of its Server, whose `should_exit`
    says so; under any other server this is simply False and streams end at STREAM_MAX_S.
    """
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))


def _message(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    lines = [f"event: {event}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    if event_id is not None:
        lines.insert(0, f"id: {event_id}")
    return "\n".join(lines) + "\n\n"


def _batches(hub: EventHub, batches: list[Batch]) -> str:
    out = []
    for batch in batches:
        for index, (event, data) in enumerate(batch.events):
            last = index == len(batch.events) - 1
            out.append(_message(event, data, f"{hub.epoch}.{batch.seq}" if last else None))
    return "".join(out)


async def _events(hub: EventHub, last_event_id: str | None) -> AsyncIterator[str]:
    async with hub.listening():
        deadline = time.monotonic() + STREAM_MAX_S
        replay = hub.since(last_event_id)
        cursor = hub.cursor
        hello = _message("hello", {"cursor": cursor, "resumed": replay is not None}, cursor)
        yield f"retry: {RETRY_MS}\n{hello}"
        if replay:
            yield _batches(hub, replay)
            cursor = f"{hub.epoch}.{replay[-1].seq}"
        seq = int(cursor.rpartition(".")[2])
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and not _server_exiting():
            batches = await hub.wait(seq, SHUTDOWN_CHECK_S)
            if batches is None:
                # Fell behind the history (a very slow reader): start over from a re-fetch.
                yield _message("resync", {"reason": "fell behind"}, hub.cursor)
                seq = int(hub.cursor.rpartition(".")[2])
            elif batches:
                yield _batches(hub, batches)
                seq = batches[-1].seq
            elif time.monotonic() - quiet_since < KEEPALIVE_S:
                continue
            else:
                yield ": keepalive\n\n"
            quiet_since = time.monotonic()


@router.get(
    "/stream",
    operation_id="streamEvents",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
            "description": "Server-sent events: hello, stats, devices, deployments, targets, resync",
        },
        HTTPStatus.NOT_ACCEPTABLE: {
            "model": ErrorBody,
            "description": "Accept does not name text/event-stream",
        },
    },
)
async def stream_events(
    _principal: ViewerDep,
    hub: Annotated[EventHub, Depends(get_hub)],
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
    last_event_id: Annotated[
        str | None, Header(max_length=64, description="Resume after this event id (a reconnect)")
    ] = None,
) -> StreamingResponse:
    """The fleet's live changes as server-sent events; ask with `Accept: text/event-stream`."""
    if EVENT_STREAM not in (accept or ""):
        raise NotAcceptableError("this is an event stream: send Accept: text/event-stream")
    return StreamingResponse(
        _events(hub, last_event_id),
        media_type=EVENT_STREAM,
        # A buffering proxy (nginx) would hold events back until its buffer fills.
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
