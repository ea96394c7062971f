"""Revoking a device (DESIGN.md "Revocation"): database first, then the CRL, the broker, the session.

The order matters. The device is marked revoked and its retained commands withdrawn in one
transaction, so the API (device endpoints, downloads, registration) and ingest (which reads
admission states on every batch, and announces the revocation on the fleet topics) refuse it
from then on whatever happens next. Then its
certificate goes into the fleet CRL, the Mosquitto Kernex runs re-reads it (SIGHUP), and the
device's live session is cut (kernex.broker.session), so its reconnect meets the new CRL.
Brokers Kernex does not run must be reloaded by their operator (docs/revocation.md); the cut
still happens wherever the API can reach the broker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.commands import service as commands
from kernex.api.commands.runtime import CommandRuntime
from kernex.api.devices.service import get_device
from kernex.api.errors import ConflictError
from kernex.api.settings import ApiSettings
from kernex.broker.exceptions import BrokerError
from kernex.broker.integrators import reload_broker
from kernex.broker.pki import API_IDENTITY, FleetPKI
from kernex.broker.session import cut_session
from kernex.kit.logs import get_logger
from kernex.storage.models import AdmissionState, Device, DeviceCertificate

log = get_logger(__name__)


@dataclass(frozen=True)
class Revocation:
    """What revoking did beyond the database, for the audit log and the operator."""

    device: Device
    crl_serial: str | None
    broker_reloaded_pid: int | None
    session_cut: bool
    cleared_commands: int
    errors: tuple[str, ...]


async def revoke(
    session: AsyncSession,
    pki: FleetPKI,
    settings: ApiSettings,
    runtime: CommandRuntime,
    device_id: str,
) -> Revocation:
    """Revoke the device; ConflictError if it already is (or never had a certificate to revoke)."""
    device = await get_device(session, device_id)
    if device.state is AdmissionState.REVOKED:
        raise ConflictError(f"device {device_id} is already revoked")
    if device.state is not AdmissionState.ACTIVE:
        raise ConflictError(f"device {device_id} is {device.state.value}: reject it instead")
    now = datetime.now(UTC)
    await commands.lock_devices(session, [device_id])
    standing = await commands.standing(session, device_id, now)
    withdrawn = await commands.withdraw(session, [c.id for c in standing])
    device.state = AdmissionState.REVOKED
    device.revoked_at = now
    device.updated_at = now
    session.add(device)
    await session.commit()
    log.info("device revoked", device_id=device_id, serial=device.cert_serial)

    errors: list[str] = []
    serial = device.cert_serial
    # Every certificate of the device still valid: a renewal leaves the previous one valid until
    # it expires, and the device could connect with it.
    serials = list(
        (
            await session.exec(
                select(DeviceCertificate.serial).where(
                    col(DeviceCertificate.device_id) == device_id, col(DeviceCertificate.not_after) > now
                )
            )
        ).all()
    )
    if serial is not None and serial not in serials:
        serials.append(serial)
    if serials:
        # Signing the CRL loads the CA key (a KDF over the passphrase): off the event loop.
        await asyncio.to_thread(pki.write_crl, [(s, now) for s in serials])
    pid: int | None = None
    try:
        pid = await asyncio.to_thread(reload_broker, settings.resolved_broker_dir)
    except (BrokerError, OSError) as exc:
        errors.append(f"broker reload: {exc}")
    if pid is None:
        log.warning(
            "no Mosquitto run by Kernex to reload: reload the broker's CRL yourself",
            crl=str(pki.crl_path),
            broker_dir=str(settings.resolved_broker_dir),
        )
    cut = False
    try:
        await asyncio.to_thread(
            cut_session,
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            ssl_context=pki.client_ssl_context(API_IDENTITY),
            client_id=device_id,
        )
        cut = True
    except BrokerError as exc:
        errors.append(f"session cut: {exc}")
    for error in errors:
        log.warning("revocation step failed", device_id=device_id, error=error)
    # Empty retained messages remove its commands from the broker (republished later if it is down).
    await runtime.publisher.sync_topics([(c.device_id, c.kind) for c in withdrawn])
    return Revocation(
        device=device,
        crl_serial=serial,
        broker_reloaded_pid=pid,
        session_cut=cut,
        cleared_commands=len(withdrawn),
        errors=tuple(errors),
    )
