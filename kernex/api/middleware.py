"""Request id, access metrics and body-size limits for every request."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import structlog
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from kernex.api.errors import error_response

REQUEST_ID_HEADER = "X-Request-ID"
# A caller-supplied id is echoed only if it looks like an id, never arbitrary text in our logs.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def install_middleware(app: FastAPI, registry: CollectorRegistry, max_body_bytes: int) -> None:
    """Wrap every request: bind a request id, count it, refuse oversized bodies early."""
    requests = Counter(
        "kernex_api_requests_total", "API requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "kernex_api_request_seconds", "API request latency", ["method", "route"], registry=registry
    )

    @app.middleware("http")
    async def per_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        supplied = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        request.state.request_id = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response: Response = error_response(
                request,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "body_too_large",
                f"request body over {max_body_bytes} bytes",
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        # The route template, not the path, keeps label cardinality bounded.
        label = getattr(route, "path", "unmatched")
        requests.labels(request.method, label, str(response.status_code)).inc()
        latency.labels(request.method, label).observe(time.perf_counter() - started)
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
