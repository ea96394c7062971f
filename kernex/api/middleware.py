"""What wraps every request: request id, client address, rate limit, body and content-type checks,
security headers, CORS and access metrics."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernex.api.clients import resolve_client_address
from kernex.api.errors import RateLimitedError, error_response
from kernex.api.ratelimit import RateLimits
from kernex.api.settings import ApiSettings
from kernex.protocol import jws
from kernex.protocol.devicetoken import DEVICE_TOKEN_TYP
from kernex.protocol.exceptions import ProtocolError

REQUEST_ID_HEADER = "X-Request-ID"
# A caller-supplied id is echoed only if it looks like an id, never arbitrary text in our logs.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes and scrapes come every few seconds from the orchestrator and Prometheus: never rate limited.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Bundle uploads stream to the bundle store and hold KERNEX_MAX_BUNDLE_BYTES themselves; this
# early refusal only has to leave room for the multipart framing and the signature field.
STREAMED_UPLOADS = frozenset({("POST", "/api/v1/bundles")})
UPLOAD_FRAMING_BYTES = 64 * 1024
# JSON for the API, multipart and raw archives for bundle uploads, compact JWS for the devices'
# HTTP fallback; anything else (text/plain, which browsers send cross-site without a preflight)
# is refused with 415.
ACCEPTED_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/jose",
        "multipart/form-data",
        "application/octet-stream",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
    }
)
HSTS_MAX_AGE_S = 365 * 24 * 3600  # a year: the browser preload list's minimum
# The API serves JSON only: nothing may load, run or frame it.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
# /docs runs Swagger UI from our own origin (never a CDN): scripts and styles from 'self';
# Swagger UI sets inline styles and shows data: images.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PREFIX = "/docs"
CORS_MAX_AGE_S = 600  # browsers cache a preflight answer for this long


# Paths a device calls with its own id in them (DESIGN.md device endpoints).
_DEVICE_PATH_RE = re.compile(r"^/api/v1/devices/([^/]+)/(?:heartbeat|events|certificate|registration)$")


def _device_of(request: Request) -> str | None:
    """The device a request claims to come from, for rate limiting only (the route verifies it).

    The id in a device path, or the `kid` of a device JWT (bundle downloads); None for operators.
    """
    match = _DEVICE_PATH_RE.match(request.url.path)
    if match is not None:
        return match.group(1)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        header = jws.unverified_header(token)
    except ProtocolError:
        return None
    kid = header.get("kid")
    return kid if header.get("typ") == DEVICE_TOKEN_TYP and isinstance(kid, str) else None


def _content_type_ok(value: str | None) -> bool:
    media = (value or "").split(";", 1)[0].strip().lower()
    return media in ACCEPTED_CONTENT_TYPES or (media.startswith("application/") and media.endswith("+json"))


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length != "0") or "transfer-encoding" in request.headers


def _security_headers(response: Response, request: Request, *, https: bool) -> None:
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers.setdefault(
        "Content-Security-Policy", DOCS_CSP if request.url.path.startswith(DOCS_PREFIX) else API_CSP
    )
    if request.url.path.startswith("/api/"):
        # Responses may carry tokens (RFC 6749 §5.1) or fleet data: no shared or disk caches.
        headers.setdefault("Cache-Control", "no-store")
    if https:
        headers["Strict-Transport-Security"] = f"max-age={HSTS_MAX_AGE_S}; includeSubDomains"


class _BodyGuard:
    """One request's body count: past the limit the app sees a disconnect and its answer is dropped."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self._received = 0
        self.exceeded = self._started = False

    @property
    def cut_off(self) -> bool:
        """The body went over the limit before any response started: answer 413 instead."""
        return self.exceeded and not self._started

    async def receive(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self.limit:
                self.exceeded = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.cut_off:
            return  # the route's answer to the cut-off body; BodyLimit sends the 413 instead
        self._started = True
        await self._send(message)


class BodyLimit:
    """Counts the bytes a request body really carries and answers 413 past the limit.

    Content-Length is checked before the route runs; a chunked body has none, so without this
    count a client could stream an unbounded JSON body into memory.
    """

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, self.limit_for(scope["method"], scope["path"]))
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.cut_off:
                raise
            # The route failed on the body we cut off (it saw a disconnect): the 413 answers it.
        if guard.cut_off:
            message = f"request body over {guard.limit} bytes"
            response = error_response(
                Request(scope), HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large", message
            )
            await response(scope, receive, send)


def install_middleware(
    app: FastAPI, registry: CollectorRegistry, settings: ApiSettings, limits: RateLimits
) -> None:
    """Wrap every request: bind a request id, limit, check, count and harden the response."""
    requests = Counter(
        "kernex_api_requests_total", "API requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "kernex_api_request_seconds", "API request latency", ["method", "route"], registry=registry
    )
    max_body_bytes = settings.max_body_bytes
    max_upload_bytes = settings.max_bundle_bytes + UPLOAD_FRAMING_BYTES

    def body_limit(method: str, path: str) -> int:
        return max_upload_bytes if (method, path) in STREAMED_UPLOADS else max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    # Added first so it sits inside the middleware below: preflight answers get ids and headers too.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
        expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        # Bearer tokens travel in a header, never in cookies: no credentialed CORS needed.
        allow_credentials=False,
        max_age=CORS_MAX_AGE_S,
    )

    def _refusal(request: Request) -> Response | None:
        if request.url.path not in UNLIMITED_PATHS:
            try:
                limits.check_request(request.state.client_address, _device_of(request))
            except RateLimitedError as exc:
                response = error_response(request, exc.status_code, exc.code, str(exc))
                response.headers.update(exc.headers)
                return response
        length = request.headers.get("content-length")
        limit = body_limit(request.method, request.url.path)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(
                request,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "body_too_large",
                f"request body over {limit} bytes",
            )
        if (
            request.method in BODY_METHODS
            and _has_body(request)
            and not _content_type_ok(request.headers.get("content-type"))
        ):
            return error_response(
                request,
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )
        return None

    @app.middleware("http")
    async def per_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        supplied = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        request.state.request_id = request_id
        address = resolve_client_address(request, trust_forwarded_for=settings.trust_forwarded_for)
        request.state.client_address = address
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, client=address)
        started = time.perf_counter()
        refusal = _refusal(request)
        response = refusal if refusal is not None else await call_next(request)
        route = request.scope.get("route")
        # The route template, not the path, keeps label cardinality bounded.
        label = getattr(route, "path", "unmatched")
        requests.labels(request.method, label, str(response.status_code)).inc()
        latency.labels(request.method, label).observe(time.perf_counter() - started)
        response.headers[REQUEST_ID_HEADER] = request_id
        scheme = request.url.scheme
        if settings.trust_forwarded_for:
            scheme = request.headers.get("x-forwarded-proto", scheme).split(",")[-1].strip()
        _security_headers(response, request, https=scheme == "https")
        return response
