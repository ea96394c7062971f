"""Registration with the control plane: `POST /api/v1/devices/register` with a CSR, retried.

5xx, 408, 429 and transport errors are transient and retried with exponential backoff and full
jitter; any other 4xx is a permanent refusal. A "pending" device keeps re-registering (same key,
same device) until an operator decides.
"""

from __future__ import annotations

import asyncio
import platform
import socket
from http import HTTPStatus
from typing import Any

import httpx
from pydantic import ValidationError

from kernex.agent.exceptions import (
    DeviceRefusedError,
    IdentityMismatchError,
    IncompatibleServerError,
    RegistrationError,
)
from kernex.agent.http import request_slot
from kernex.agent.identity import Identity
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol.keys import build_csr
from kernex.protocol.messages import RegistrationRequest, RegistrationResponse
from kernex.protocol.version import IncompatibleVersionError, check_server

REGISTER_PATH = "/api/v1/devices/register"
RETRY_INITIAL_S = 1.0  # the contract: backoff from 1 s ...
RETRY_MAX_S = 60.0  # ... up to a minute, so a fleet never hammers a recovering API
# Request Timeout and Too Many Requests say "try again later"; every other 4xx is final.
TRANSIENT_CLIENT_ERRORS = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
ERROR_BODY_LOG_CHARS = 300  # enough to show a proxy's error page without flooding the log

log = get_logger(__name__)


class _TransientError(Exception):
    """A failure worth retrying; carries the server's Retry-After hint when it gave one."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


def hardware_info() -> dict[str, Any]:
    """What the operator sees about the machine; blocking (hostname lookup), call it off the loop."""
    return {"machine": platform.machine(), "system": platform.system(), "hostname": socket.gethostname()}


class Registrar:
    """Registers one device, retrying until the control plane activates or refuses it."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        *,
        name: str | None = None,
        enrollment_token: str | None = None,
        device_type: str | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._http = http
        self._url = api_url.rstrip("/") + REGISTER_PATH
        self._name = name
        self._enrollment_token = enrollment_token
        self._device_type = device_type
        self._backoff = backoff or Backoff(initial_s=RETRY_INITIAL_S, max_s=RETRY_MAX_S)
        self.attempts = 0

    async def register(self, identity: Identity) -> RegistrationResponse:
        """Return the active registration; raises RegistrationError when refused for good."""
        hardware = await asyncio.to_thread(hardware_info)
        if self._device_type is not None:
            # Inventory operators group devices by (dynamic groups filter on device_type).
            hardware["device_type"] = self._device_type
        request = RegistrationRequest(
            csr=build_csr(identity.key, common_name=identity.device_id),
            name=self._name,
            hardware=hardware,
            enrollment_token=self._enrollment_token,
        )
        body = request.model_dump(mode="json", exclude_none=True)
        while True:
            self.attempts += 1
            try:
                response = await self._attempt(body, identity.device_id)
            except _TransientError as exc:
                delay = self._backoff.next_delay()
                if exc.retry_after_s is not None:
                    delay = min(max(delay, exc.retry_after_s), RETRY_MAX_S)
                log.warning("registration failed, retrying", reason=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            if response.status == "active":
                self._backoff.reset()
                log.info("registered", status=response.status)
                return response
            if response.status == "pending":
                delay = self._backoff.next_delay()
                log.info("registration pending operator approval", retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            log.error(
                "registration refused by the control plane; stopping "
                "(an operator can accept the device, then restart the agent)",
                status=response.status,
            )
            raise DeviceRefusedError(
                f"the control plane says this device is {response.status}", code=response.status
            )

    async def _attempt(self, body: dict[str, Any], device_id: str) -> RegistrationResponse:
        try:
            async with request_slot(self._http):
                reply = await self._http.post(self._url, json=body)
        except httpx.TransportError as exc:
            raise _TransientError(f"{type(exc).__name__}: {exc}") from None
        if (
            reply.status_code >= HTTPStatus.INTERNAL_SERVER_ERROR
            or reply.status_code in TRANSIENT_CLIENT_ERRORS
        ):
            raise _TransientError(
                f"HTTP {reply.status_code}: {_error_text(reply)}",
                _retry_after(reply.headers.get("retry-after")),
            )
        if reply.status_code >= HTTPStatus.BAD_REQUEST:
            code, message = _error_fields(reply)
            what = f"HTTP {reply.status_code}" + (f" {code}" if code else "")
            raise RegistrationError(
                f"registration refused ({what}): {message}",
                status_code=reply.status_code,
                code=code,
            )
        if reply.status_code not in {HTTPStatus.OK, HTTPStatus.CREATED}:
            raise _TransientError(f"unexpected HTTP {reply.status_code}: {_error_text(reply)}")
        try:
            response = RegistrationResponse.model_validate_json(reply.content)
        except ValidationError as exc:
            # Likely a proxy or a server mid-upgrade answering something else: try again later.
            raise _TransientError(f"malformed registration response ({exc.error_count()} errors)") from None
        if response.device_id != device_id:
            raise IdentityMismatchError(
                f"the control plane answered for device {response.device_id!r}, but our key is {device_id!r}"
            )
        try:
            check_server(response.protocol_version, response.min_protocol_version)
        except IncompatibleVersionError as exc:
            # Retrying cannot help: one side must be upgraded first.
            raise IncompatibleServerError(f"registration refused by this agent: {exc}") from None
        if response.status == "active" and not response.certificate:
            raise _TransientError("an active registration came without a certificate")
        return response


def _error_fields(reply: httpx.Response) -> tuple[str | None, str]:
    """The contract's `{"error": {"code", "message"}}`, or the raw body when it is something else."""
    try:
        payload = reply.json()
    except ValueError:
        return None, _error_text(reply)
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return (code if isinstance(code, str) else None), error["message"]
    return None, _error_text(reply)


def _error_text(reply: httpx.Response) -> str:
    text = reply.text.strip()
    return text[:ERROR_BODY_LOG_CHARS] or reply.reason_phrase


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: an HTTP date needs a trustworthy clock, which a device may lack.
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
