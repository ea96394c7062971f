"""API errors and the one place that turns Kernex errors into HTTP responses.

Services raise domain errors (never HTTPException); `install_error_handlers` maps them, and
FastAPI's own validation errors, to one JSON shape: `{"error": {"code", "message", "request_id"}}`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kernex.protocol.exceptions import InvalidCSRError, InvalidKeyError, KernexError, ProtocolError
from kernex.storage.exceptions import DatabaseUnavailableError

log = structlog.stdlib.get_logger(__name__)


class ApiError(KernexError):
    """An error with an HTTP status and a stable machine-readable code."""

    status_code = HTTPStatus.BAD_REQUEST
    code = "bad_request"

    @property
    def headers(self) -> dict[str, str]:
        """Response headers the status requires (WWW-Authenticate, Retry-After)."""
        return {}


class UnauthorizedError(ApiError):
    """No credentials, or credentials that do not prove who the caller is (RFC 6750)."""

    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"

    def __init__(self, message: str, *, token_given: bool = True) -> None:
        super().__init__(message)
        self.token_given = token_given

    @property
    def headers(self) -> dict[str, str]:
        # RFC 6750 §3: error="invalid_token" only when a token was presented.
        challenge = 'Bearer realm="kernex"'
        if self.token_given:
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class NotFoundError(ApiError):
    """The addressed resource does not exist."""

    status_code = HTTPStatus.NOT_FOUND
    code = "not_found"


class ConflictError(ApiError):
    """The request conflicts with the current state."""

    status_code = HTTPStatus.CONFLICT
    code = "conflict"


class ForbiddenError(ApiError):
    """The caller may not do this."""

    status_code = HTTPStatus.FORBIDDEN
    code = "forbidden"


class RateLimitedError(ApiError):
    """Too many requests from this client; retry after the given number of seconds."""

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ServiceUnavailableError(ApiError):
    """A dependency (database, broker) is down; retry later."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"


class ErrorLocation(BaseModel):
    """One failed field of a validation error."""

    loc: list[str]
    msg: str


class ErrorDetail(BaseModel):
    """What went wrong, machine-readable (`code`) and for people (`message`)."""

    code: str
    message: str
    request_id: str | None
    details: list[ErrorLocation] | None = None


class ErrorBody(BaseModel):
    """The one error shape every non-2xx JSON response has."""

    error: ErrorDetail


def _described(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Documented on every route, so clients (and schemathesis) know the error shape of each status.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    HTTPStatus.UNAUTHORIZED: _described("Missing, invalid, expired or revoked credentials"),
    HTTPStatus.FORBIDDEN: _described("The caller's role or credential kind may not do this"),
    HTTPStatus.NOT_FOUND: _described("No such resource"),
    HTTPStatus.CONFLICT: _described("Conflicts with the current state"),
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: _described("Body over the size limit"),
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: _described("Body is not JSON (or an upload type)"),
    HTTPStatus.UNPROCESSABLE_ENTITY: _described("The request does not match the schema"),
    HTTPStatus.TOO_MANY_REQUESTS: _described("Rate limited: retry after the Retry-After header's seconds"),
    HTTPStatus.SERVICE_UNAVAILABLE: _described("A dependency (database, broker) is down"),
}


def _status_and_code(exc: KernexError) -> tuple[int, str]:
    if isinstance(exc, ApiError):
        return exc.status_code, exc.code
    if isinstance(exc, InvalidCSRError | InvalidKeyError):
        return HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_csr"
    if isinstance(exc, ProtocolError):
        return HTTPStatus.UNPROCESSABLE_ENTITY, "invalid"
    if isinstance(exc, DatabaseUnavailableError):
        return HTTPStatus.SERVICE_UNAVAILABLE, "database_unavailable"
    return HTTPStatus.INTERNAL_SERVER_ERROR, "internal"


def error_response(request: Request, status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The one error body shape."""
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": getattr(request.state, "request_id", None),
    }
    body.update(extra)
    return JSONResponse({"error": body}, status_code=status)


async def _kernex_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KernexError)
    status, code = _status_and_code(exc)
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        # A dependency is down: every request says so until it is back, and the component that
        # lost it (readiness, the pool) is what to alert on, not one error line per request.
        log.warning("request failed: dependency unavailable", error=str(exc), code=code)
    elif status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        log.error("request failed", error=str(exc), code=code)
    response = error_response(request, status, code, str(exc))
    if isinstance(exc, ApiError):
        response.headers.update(exc.headers)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors[:20]]
    return error_response(
        request,
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "validation_error",
        f"{where}: {first.get('msg', 'invalid')}",
        details=details,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "error"
    response = error_response(request, exc.status_code, code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on the app."""
    app.add_exception_handler(KernexError, _kernex_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
