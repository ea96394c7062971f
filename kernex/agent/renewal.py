"""Certificate renewal: before its certificate expires, the agent asks for a new one.

Device certificates are short-lived (KERNEX_DEVICE_CERT_VALIDITY_DAYS, or _S, on the server). Once less
than `renew_before_fraction` of the certificate's lifetime remains, the agent sends a new CSR
signed by the same key to `POST /api/v1/devices/{id}/certificate`, authenticated by a device
JWT, and stores the answer. The live MQTT session is not dropped for it: the broker checked the
certificate at the handshake, and every reconnect presents the newest certificate on disk. A
revoked device is refused (403): it logs that once and stops trying.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from http import HTTPStatus

import httpx
from cryptography import x509
from pydantic import BaseModel, ValidationError

from kernex.agent.http import request_slot
from kernex.agent.identity import Identity
from kernex.agent.settings import DEFAULT_RENEW_BEFORE_FRACTION
from kernex.agent.state import StateStore
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol import devicetoken
from kernex.protocol.keys import build_csr

log = get_logger(__name__)

CERTIFICATE_PATH = "/api/v1/devices/{device_id}/certificate"
CHECK_MAX_S = 3600.0  # look again at least hourly: the clock may jump, the file may change
RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 3600.0  # an unreachable API is retried for days before the certificate expires


class _Renewed(BaseModel):
    certificate: str
    ca_certificate: str


class RenewalRefusedError(Exception):
    """The API refused renewal for good (revoked, rejected or unknown device)."""


def renewal_due_in_s(certificate_pem: str, fraction: float, now: datetime | None = None) -> float:
    """Seconds until the certificate is due for renewal (zero or less: now)."""
    cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    due_at = cert.not_valid_after_utc - lifetime * fraction
    return (due_at - (now or datetime.now(UTC))).total_seconds()


class Renewer:
    """Keeps the stored device certificate fresh while the agent runs."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        identity: Identity,
        store: StateStore,
        *,
        fraction: float = DEFAULT_RENEW_BEFORE_FRACTION,
        backoff: Backoff | None = None,
    ) -> None:
        self._http = http
        self._url = api_url.rstrip("/") + CERTIFICATE_PATH.format(device_id=identity.device_id)
        self._identity = identity
        self._store = store
        self._fraction = fraction
        self._backoff = backoff or Backoff(initial_s=RETRY_INITIAL_S, max_s=RETRY_MAX_S)
        self.renewals = 0

    async def renew(self) -> str:
        """Ask for a new certificate now and store it; returns it."""
        registration = self._store.state.registration
        if registration is None:
            raise RenewalRefusedError("no registration to renew")
        csr = build_csr(self._identity.key, common_name=self._identity.device_id)
        async with request_slot(self._http):
            token = devicetoken.issue(self._identity.key, self._identity.device_id)
            reply = await self._http.post(
                self._url, json={"csr": csr}, headers={"Authorization": f"Bearer {token}"}
            )
        if reply.status_code in {HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN, HTTPStatus.NOT_FOUND}:
            raise RenewalRefusedError(f"HTTP {reply.status_code}: {reply.text[:300]}")
        reply.raise_for_status()
        try:
            renewed = _Renewed.model_validate_json(reply.content)
        except ValidationError as exc:
            raise httpx.HTTPError(f"malformed renewal answer ({exc.error_count()} errors)") from None
        await self._store.save_registration(
            registration.model_copy(
                update={"certificate": renewed.certificate, "ca_certificate": renewed.ca_certificate}
            )
        )
        self.renewals += 1
        log.info("device certificate renewed", due_in_s=round(self._due_in_s(renewed.certificate)))
        return renewed.certificate

    async def run(self) -> None:
        """Renew whenever due, until cancelled or refused for good."""
        while True:
            registration = self._store.state.registration
            if registration is None or registration.certificate is None:
                return
            try:
                due_in = self._due_in_s(registration.certificate)
            except ValueError as exc:
                # Not a reason to stop the agent: the broker judges the certificate at connect.
                log.error("stored certificate unreadable; not renewing", error=str(exc))  # noqa: TRY400 - one line
                return
            if due_in > 0:
                await asyncio.sleep(min(due_in, CHECK_MAX_S))
                continue
            try:
                certificate = await self.renew()
            except RenewalRefusedError as exc:
                log.error("certificate renewal refused; not retrying", error=str(exc))  # noqa: TRY400 - expected
                return
            except httpx.HTTPError as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "certificate renewal failed, retrying", error=str(exc), retry_in_s=round(delay, 1)
                )
                await asyncio.sleep(delay)
            else:
                self._backoff.reset()
                if self._due_in_s(certificate) <= 0:
                    # Due again at once (a server issuing very short certificates): pace it.
                    await asyncio.sleep(RETRY_INITIAL_S)

    def _due_in_s(self, certificate: str) -> float:
        return renewal_due_in_s(certificate, self._fraction)
