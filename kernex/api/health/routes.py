"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kernex.api.deps import StateDep
from kernex.api.errors import UnauthorizedError
from kernex.storage.database import ping
from kernex.storage.exceptions import DatabaseUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz", operation_id="readyz", responses={503: {"description": "A dependency is down"}})
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the database answers and the broker connection is up."""
    checks: dict[str, str] = {}
    try:
        await ping(state.engine)
        checks["database"] = "ok"
    except DatabaseUnavailableError as exc:
        checks["database"] = str(exc)
    checks["broker"] = "ok" if state.broker.connected else (state.broker.last_error or "not connected")
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", operation_id="metrics", include_in_schema=False)
async def metrics(state: StateDep, request: Request) -> Response:
    """Prometheus exposition of the API's metrics.

    Open by default, like every Prometheus target: counts and latencies by route, no fleet data.
    With KERNEX_METRICS_TOKEN set it needs that bearer token (Prometheus `authorization`).
    """
    expected = state.settings.metrics_token
    if expected is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected.get_secret_value()}".encode()):
            raise UnauthorizedError("metrics need the metrics token", token_given=bool(given))
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
