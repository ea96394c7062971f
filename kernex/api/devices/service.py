"""Device registration and the fleet read side; raises domain errors, knows nothing of HTTP."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.admission import service as admission_service
from kernex.api.admission.service import Admission
from kernex.api.devices.schemas import (
    BundleInfo,
    DeviceDetail,
    DeviceMetrics,
    DeviceOut,
    DeviceSort,
    FleetStats,
    RenewedCertificate,
)
from kernex.api.errors import ConflictError, ForbiddenError, NotFoundError
from kernex.api.settings import ApiSettings
from kernex.broker.command_keys import CommandKeyRing
from kernex.broker.pki import FleetPKI, IssuedCertificate
from kernex.kit.logs import get_logger
from kernex.protocol.keys import (
    device_id_for,
    key_type_of,
    load_csr,
    public_key_fingerprint,
    public_key_to_pem,
)
from kernex.protocol.messages import CommandKey, MqttEndpoint, RegistrationRequest, RegistrationResponse
from kernex.protocol.version import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from kernex.storage.models import (
    AdmissionState,
    ConnectionState,
    Deployment,
    Device,
    DeviceCertificate,
    Heartbeat,
)

log = get_logger(__name__)

ACTIVE_DEPLOYMENT_STATUSES = ("pending", "in_progress")


async def register(
    session: AsyncSession,
    pki: FleetPKI,
    settings: ApiSettings,
    request: RegistrationRequest,
    *,
    release_keys: Sequence[CommandKey] = (),
) -> tuple[RegistrationResponse, bool]:
    """Register (or re-register) the key in the CSR; returns the response and whether it is new.

    release_keys are the keys whose release signatures the device is to accept on bundles.
    """
    csr, public_key = load_csr(request.csr)
    device_id = device_id_for(public_key)
    fingerprint = public_key_fingerprint(public_key)
    device = await session.get(Device, device_id)
    created = device is None
    now = datetime.now(UTC)
    admission: Admission | None = None
    if device is None:
        admission = await _decide(session, settings, request, fingerprint, device_id)
        device = Device(
            id=device_id,
            name=request.name or admission.name,
            hardware=request.hardware,
            key_type=key_type_of(public_key).value,
            public_key_pem=public_key_to_pem(public_key),
            key_fingerprint=fingerprint,
            state=admission.state,
            tags=admission.tags,
            registered_at=now,
            updated_at=now,
        )
        session.add(device)
    else:
        if request.name:
            device.name = request.name
        if request.hardware is not None:
            device.hardware = request.hardware
        if device.state is AdmissionState.PENDING:
            # A pending device registering again may now bring a token or have been pre-authorized.
            admission = await _decide(session, settings, request, fingerprint, device_id)
        if admission is not None and admission.state is AdmissionState.ACTIVE:
            device.state = AdmissionState.ACTIVE
            device.tags = sorted(set(device.tags) | set(admission.tags))
            if admission.name and not device.name:
                device.name = admission.name
        device.updated_at = now
    certificate: str | None = None
    issued: IssuedCertificate | None = None
    if device.state is AdmissionState.ACTIVE:
        # Signing loads the CA key (a KDF over the passphrase): keep it off the event loop.
        issued = await asyncio.to_thread(pki.sign_device_csr, csr, device_id, settings.device_cert_validity)
        device.cert_serial = issued.serial
        device.cert_not_after = issued.not_after
        certificate = issued.pem
    try:
        if issued is not None:
            await session.flush()  # the device's row first: its certificate refers to it
            _keep_certificate(session, device_id, issued)
        await session.commit()
    except sa.exc.IntegrityError:
        # The same key registered concurrently: the other request created it; answer as a re-registration.
        await session.rollback()
        return await register(session, pki, settings, request, release_keys=release_keys)
    log.info(
        "device registered" if created else "device re-registered",
        device_id=device_id,
        state=device.state.value,
        admission=admission.reason if admission is not None else None,
    )
    # Every key of the ring, the next signer included: a device registering mid-rotation trusts
    # it from the start. A file read (decrypting nothing once the PKI has loaded its first key).
    ring = await asyncio.to_thread(CommandKeyRing(pki).load)
    response = RegistrationResponse(
        device_id=device_id,
        status=device.state.value,
        certificate=certificate,
        ca_certificate=pki.ca_certificate_pem,
        mqtt=MqttEndpoint(
            host=settings.advertised_mqtt_host,
            port=settings.advertised_mqtt_port,
            topic_prefix=settings.topic_prefix,
        ),
        command_keys=ring.public_keys,
        command_keys_version=ring.version,
        release_keys=list(release_keys),
        protocol_version=PROTOCOL_VERSION,
        min_protocol_version=MIN_PROTOCOL_VERSION,
    )
    return response, created


async def _decide(
    session: AsyncSession,
    settings: ApiSettings,
    request: RegistrationRequest,
    fingerprint: str,
    device_id: str,
) -> Admission:
    return await admission_service.decide(
        session,
        settings.admission_policy,
        key_fingerprint=fingerprint,
        device_id=device_id,
        token=request.enrollment_token,
    )


def to_out(device: Device) -> DeviceOut:
    """The operator view of a device row."""
    return DeviceOut(
        id=device.id,
        name=device.name,
        state=device.state,
        status=device.status,
        status_changed_at=device.status_changed_at,
        key_type=device.key_type,
        hardware=device.hardware,
        tags=device.tags,
        registered_at=device.registered_at,
        last_seen_at=device.last_seen_at,
        last_seq=device.last_seq,
        last_heartbeat_at=device.last_heartbeat_at,
        health=device.health,
        metrics=DeviceMetrics(
            cpu_percent=device.cpu_percent,
            memory_mb=device.memory_mb,
            disk_free_mb=device.disk_free_mb,
            uptime_s=device.uptime_s,
        ),
        bundle=BundleInfo(id=device.bundle_id, version=device.bundle_version),
        config_version=device.config_version,
        agent_version=device.agent_version,
        cert_not_after=device.cert_not_after,
    )


def to_detail(device: Device) -> DeviceDetail:
    """The detail view, with key material that is public anyway."""
    return DeviceDetail(
        **to_out(device).model_dump(),
        public_key_pem=device.public_key_pem,
        key_fingerprint=device.key_fingerprint,
    )


def _keep_certificate(session: AsyncSession, device_id: str, issued: IssuedCertificate) -> None:
    """Record an issued certificate: a revocation puts every one still valid into the CRL."""
    session.add(
        DeviceCertificate(
            serial=issued.serial, device_id=device_id, issued_at=datetime.now(UTC), not_after=issued.not_after
        )
    )


_BY_NAME = sa.func.coalesce(col(Device.name), col(Device.id))
# Every order ends with the id (added by list_devices): pages are stable when values tie.
_ORDER: dict[DeviceSort, tuple[sa.ColumnElement[Any], ...]] = {
    DeviceSort.REGISTERED: (col(Device.registered_at).desc(),),
    DeviceSort.NAME: (_BY_NAME,),
    DeviceSort.STATUS: (col(Device.status).asc(), _BY_NAME),
    DeviceSort.LAST_SEEN: (sa.nulls_last(col(Device.last_seen_at).desc()),),
    DeviceSort.VERSION: (sa.nulls_last(col(Device.bundle_version).asc()), _BY_NAME),
}


async def list_devices(
    session: AsyncSession,
    *,
    status: ConnectionState | None,
    state: AdmissionState | None,
    search: str | None,
    sort: DeviceSort = DeviceSort.REGISTERED,
    limit: int,
    offset: int,
) -> tuple[list[Device], int]:
    """A page of devices in the requested order, with the total matching count."""
    conditions: list[sa.ColumnElement[bool]] = []
    if status is not None:
        conditions.append(col(Device.status) == status)
    if state is not None:
        conditions.append(col(Device.state) == state)
    if search:
        # Escape LIKE wildcards so a search for "50%" means the text, not a pattern.
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        conditions.append(
            sa.or_(
                col(Device.name).ilike(pattern, escape="\\"),
                col(Device.id).ilike(pattern, escape="\\"),
            )
        )
    total = (await session.exec(select(func.count()).select_from(Device).where(*conditions))).one()
    rows = await session.exec(
        select(Device).where(*conditions).order_by(*_ORDER[sort], col(Device.id)).limit(limit).offset(offset)
    )
    return list(rows.all()), total


async def get_device(session: AsyncSession, device_id: str) -> Device:
    """One device, or NotFoundError."""
    device = await session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} not found")
    return device


async def heartbeats(
    session: AsyncSession, device_id: str, *, since: datetime | None, until: datetime | None, limit: int
) -> list[Heartbeat]:
    """A device's heartbeats, newest first (by ts), optionally in [since, until)."""
    await get_device(session, device_id)
    query = select(Heartbeat).where(col(Heartbeat.device_id) == device_id)
    if since is not None:
        query = query.where(col(Heartbeat.ts) >= since)
    if until is not None:
        query = query.where(col(Heartbeat.ts) < until)
    rows = await session.exec(
        query.order_by(col(Heartbeat.ts).desc(), col(Heartbeat.seq).desc()).limit(limit)
    )
    return list(rows.all())


async def stats(session: AsyncSession) -> FleetStats:
    """Fleet counts by connection status, admission state and bundle version."""
    # One scan of the devices table grouped by all three, summed up here: three GROUP BY scans
    # made this the slowest read at 100,000 devices (benchmarks/api.py).
    groups = await session.exec(
        select(Device.status, Device.state, Device.bundle_version, func.count()).group_by(
            col(Device.status), col(Device.state), col(Device.bundle_version)
        )
    )
    by_status: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    for status, state, version, count in groups.all():
        by_status[status] += count
        by_state[str(state)] += count
        by_version[version or "none"] += count
    active = (
        await session.exec(
            select(func.count())
            .select_from(Deployment)
            .where(col(Deployment.status).in_(ACTIVE_DEPLOYMENT_STATUSES))
        )
    ).one()
    return FleetStats(
        total=sum(by_status.values()),
        online=by_status.get(ConnectionState.ONLINE, 0),
        offline=by_status.get(ConnectionState.OFFLINE, 0),
        unknown=by_status.get(ConnectionState.UNKNOWN, 0),
        by_state=dict(by_state),
        by_bundle_version=dict(by_version),
        active_deployments=active,
    )


async def accept(session: AsyncSession, device_id: str) -> Device:
    """Admit a pending (or earlier rejected) device: it gets its certificate when it asks next."""
    device = await get_device(session, device_id)
    if device.state not in {AdmissionState.PENDING, AdmissionState.REJECTED}:
        raise ConflictError(
            f"device {device_id} is {device.state.value}; only pending or rejected devices can be accepted"
        )
    device.state = AdmissionState.ACTIVE
    device.updated_at = datetime.now(UTC)
    await session.commit()
    log.info("device accepted", device_id=device_id)
    return device


async def reject(session: AsyncSession, device_id: str) -> Device:
    """Refuse a pending device: it never gets a certificate (accepting it later still can)."""
    device = await get_device(session, device_id)
    if device.state is not AdmissionState.PENDING:
        raise ConflictError(
            f"device {device_id} is {device.state.value}; only pending devices can be rejected"
        )
    device.state = AdmissionState.REJECTED
    device.updated_at = datetime.now(UTC)
    await session.commit()
    log.info("device rejected", device_id=device_id)
    return device


async def renew_certificate(
    session: AsyncSession, pki: FleetPKI, settings: ApiSettings, device_id: str, csr_pem: str
) -> RenewedCertificate:
    """Issue the (active, authenticated) device a new certificate for the CSR's key.

    The same key renews. A new key rotates: the request was authenticated with the old key's
    device token, the device keeps its id and records, its public key is replaced (ingest's key
    cache follows within KERNEX_KEY_CACHE_TTL_S) and the old certificate goes into the CRL.
    """
    device = await get_device(session, device_id)
    if device.state is not AdmissionState.ACTIVE:
        raise ForbiddenError(f"device {device_id} is {device.state.value}")
    csr, public_key = load_csr(csr_pem)
    fingerprint = public_key_fingerprint(public_key)
    rotated = fingerprint != device.key_fingerprint
    old_serial = device.cert_serial
    if rotated:
        device.public_key_pem = public_key_to_pem(public_key)
        device.key_fingerprint = fingerprint
        device.key_type = key_type_of(public_key).value
    issued = await asyncio.to_thread(pki.sign_device_csr, csr, device_id, settings.device_cert_validity)
    device.cert_serial = issued.serial
    device.cert_not_after = issued.not_after
    device.updated_at = datetime.now(UTC)
    session.add(device)
    _keep_certificate(session, device_id, issued)
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        await session.rollback()
        raise ConflictError("that key already belongs to another device") from None
    if rotated and old_serial is not None:
        await asyncio.to_thread(pki.write_crl, [(old_serial, datetime.now(UTC))])
    log.info("device certificate renewed", device_id=device_id, rotated=rotated, not_after=issued.not_after)
    return RenewedCertificate(
        device_id=device_id,
        certificate=issued.pem,
        ca_certificate=pki.ca_certificate_pem,
        not_after=issued.not_after,
        rotated=rotated,
    )
