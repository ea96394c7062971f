"""Bundles: receive (stream, validate, sign, store), list, delete, authorize and serve downloads.

Raises domain errors, knows nothing of HTTP responses. Every mutation (upload, delete,
quarantine) is written to the audit log, refusals included.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.audit import service as audit
from kernex.api.auth.schemas import Principal
from kernex.api.bundles.archive import ArchiveInspector, ArchiveReport
from kernex.api.bundles.deps import Caller
from kernex.api.bundles.errors import (
    BundleFormatError,
    BundleQuarantinedError,
    BundleTooLargeError,
    RangeNotSatisfiableError,
    ReleaseSignatureError,
)
from kernex.api.bundles.integrity import IntegrityMismatchError
from kernex.api.bundles.keyring import ReleaseKeyring
from kernex.api.bundles.multipart import MultipartReader, PartData, PartEnd, PartStart
from kernex.api.bundles.runtime import BundleRuntime
from kernex.api.bundles.schemas import BundleOut
from kernex.api.devices.service import ACTIVE_DEPLOYMENT_STATUSES
from kernex.api.errors import ConflictError, ForbiddenError, NotFoundError, ServiceUnavailableError
from kernex.kit.logs import get_logger
from kernex.protocol import jws
from kernex.protocol.exceptions import SignatureError
from kernex.protocol.manifest import Manifest
from kernex.protocol.release import ReleaseClaims, check_release
from kernex.storage.bundles.exceptions import BundleStoreError, StoredObjectCorruptError
from kernex.storage.bundles.store import BUNDLE_KEY_PREFIX
from kernex.storage.models import Bundle, Deployment, DeploymentTarget, DeviceBundleHistory

log = get_logger(__name__)

FILE_FIELD = "file"
SIGNATURE_FIELD = "signature"
SIGNATURE_MAX_BYTES = 16 * 1024  # a compact ES256 JWS over four claims is well under 1 KiB
# Multipart framing around the archive (boundaries, part headers, the signature field).
UPLOAD_FRAMING_BYTES = 64 * 1024
SYSTEM_ACTOR = "system"
_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")  # one range; 19 digits fit an int64


# --- upload ---------------------------------------------------------------------------------


async def upload(
    session: AsyncSession,
    runtime: BundleRuntime,
    *,
    actor: Principal,
    content_type: str | None,
    content_length: int | None,
    body: AsyncIterator[bytes],
    request: Request | None = None,
) -> Bundle:
    """Stream a multipart upload into the store, validate and sign it, record it; all or nothing."""
    async with audit.audited(session, actor=actor, action="bundle.upload", target=None, request=request):
        try:
            return await _receive(
                session,
                runtime,
                actor=actor,
                content_type=content_type,
                content_length=content_length,
                body=body,
                request=request,
            )
        except BundleStoreError as exc:
            raise ServiceUnavailableError(f"bundle store unavailable: {exc}") from None


async def _receive(
    session: AsyncSession,
    runtime: BundleRuntime,
    *,
    actor: Principal,
    content_type: str | None,
    content_length: int | None,
    body: AsyncIterator[bytes],
    request: Request | None,
) -> Bundle:
    limit = runtime.max_bundle_bytes
    if content_length is not None and content_length > limit + UPLOAD_FRAMING_BYTES:
        raise BundleTooLargeError(f"bundle over the {limit}-byte limit (KERNEX_MAX_BUNDLE_BYTES)")
    reader = MultipartReader(content_type)
    bundle_id = uuid.uuid4().hex
    key = f"{BUNDLE_KEY_PREFIX}{bundle_id}.tar.gz"
    receiver = _Receiver(limit)
    try:
        async with runtime.store.upload(key) as sink:
            async for chunk in body:
                for event in reader.feed(chunk):
                    data = await receiver.handle(event)
                    if data:
                        await sink.write(data)
                manifest = receiver.manifest
                if manifest is not None and not receiver.duplicate_checked:
                    # Refuse a duplicate as soon as the manifest is read, not after a gigabyte.
                    await _refuse_duplicate(session, manifest.name, manifest.version)
                    receiver.duplicate_checked = True
            reader.finish()
            report = receiver.report()
            if not receiver.duplicate_checked:
                await _refuse_duplicate(session, report.manifest.name, report.manifest.version)
            signature = _release_signature(runtime.keyring, report, receiver.signature)
    finally:
        receiver.close()
    bundle = Bundle(
        id=bundle_id,
        name=report.manifest.name,
        version=report.manifest.version,
        sha256=report.archive_sha256,
        size=report.size,
        manifest=report.manifest.model_dump(mode="json", by_alias=True, exclude_none=True),
        signature=signature,
        storage_key=key,
        created_by=actor.actor,
    )
    session.add(bundle)
    try:
        # One commit for the row and its audit entry.
        await audit.record(
            session,
            actor=actor,
            action="bundle.upload",
            target=f"bundle:{bundle_id}",
            outcome="success",
            request=request,
            details={
                "name": bundle.name,
                "version": bundle.version,
                "sha256": bundle.sha256,
                "size": bundle.size,
                "signed_by": signed_by(signature),
            },
        )
    except sa.exc.IntegrityError:
        # The same name and version committed by a concurrent upload since the early check.
        await session.rollback()
        await _delete_object(runtime, key)
        raise ConflictError(f"bundle {bundle.name} {bundle.version} already exists") from None
    except BaseException:
        await session.rollback()
        await _delete_object(runtime, key)
        raise
    log.info("bundle stored", bundle_id=bundle_id, name=bundle.name, version=bundle.version, size=bundle.size)
    return bundle


class _Receiver:
    """The form's state: an optional `signature` field, then the `file` field fed to the inspector."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._part: str | None = None
        self._signature = bytearray()
        self.signature: str | None = None
        self._inspector: ArchiveInspector | None = None
        self._report: ArchiveReport | None = None
        self._size = 0
        self.duplicate_checked = False

    @property
    def manifest(self) -> Manifest | None:
        """The manifest once the inspector has read it."""
        return self._inspector.manifest if self._inspector is not None else None

    async def handle(self, event: PartStart | PartData | PartEnd) -> bytes | None:
        """Process one multipart event; returns archive bytes to store."""
        if isinstance(event, PartStart):
            self._start(event)
        elif isinstance(event, PartData):
            if self._part == SIGNATURE_FIELD:
                self._signature += event.data
                if len(self._signature) > SIGNATURE_MAX_BYTES:
                    raise ReleaseSignatureError(f"signature: over {SIGNATURE_MAX_BYTES} bytes")
                return None
            assert self._inspector is not None
            self._size += len(event.data)
            if self._size > self._limit:
                raise BundleTooLargeError(
                    f"bundle over the {self._limit}-byte limit (KERNEX_MAX_BUNDLE_BYTES)"
                )
            await self._inspector.feed(event.data)
            return event.data
        elif self._part == SIGNATURE_FIELD:
            try:
                self.signature = self._signature.decode("ascii").strip()
            except UnicodeDecodeError:
                raise ReleaseSignatureError("signature: not a compact JWS") from None
        else:
            assert self._inspector is not None
            self._report = await self._inspector.finish()
        return None

    def _start(self, event: PartStart) -> None:
        if event.name == SIGNATURE_FIELD:
            if self._inspector is not None:
                raise BundleFormatError("the `signature` field must come before the `file` field")
            if self.signature is not None:
                raise BundleFormatError("the `signature` field appears twice")
        elif event.name == FILE_FIELD:
            if self._inspector is not None:
                raise BundleFormatError("only one `file` field per upload")
            self._inspector = ArchiveInspector()
        else:
            raise BundleFormatError(
                f"unexpected form field {event.name!r}: send `signature` (optional), then `file`"
            )
        self._part = event.name

    def report(self) -> ArchiveReport:
        """The archive's verdict; the `file` field must have been sent."""
        if self._report is None:
            raise BundleFormatError("file: the form has no `file` field with the bundle")
        return self._report

    def close(self) -> None:
        """Stop the inspector if the upload ended early."""
        if self._inspector is not None:
            self._inspector.abort()


async def _refuse_duplicate(session: AsyncSession, name: str, version: str) -> None:
    existing = (
        await session.exec(select(Bundle.id).where(col(Bundle.name) == name, col(Bundle.version) == version))
    ).first()
    if existing is not None:
        raise ConflictError(f"bundle {name} {version} already exists (id {existing})")


def _release_signature(keyring: ReleaseKeyring, report: ArchiveReport, supplied: str | None) -> str:
    manifest = report.manifest
    if not supplied:
        claims = ReleaseClaims(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=report.manifest_sha256,
            archive_sha256=report.archive_sha256,
        )
        return keyring.sign(claims)
    try:
        _kid, claims = keyring.verify(supplied)
        check_release(
            claims,
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=report.manifest_sha256,
            archive_sha256=report.archive_sha256,
        )
    except SignatureError as exc:
        raise ReleaseSignatureError(f"signature: {exc}") from None
    return supplied


def signed_by(signature: str | None) -> str | None:
    """The kid in a stored release signature's header (it was verified before it was stored)."""
    if not signature:
        return None
    try:
        kid = jws.unverified_header(signature).get("kid")
    except SignatureError:
        return None
    return kid if isinstance(kid, str) else None


# --- read side ------------------------------------------------------------------------------


def to_out(bundle: Bundle) -> BundleOut:
    """The API view of a bundle row."""
    return BundleOut(
        id=bundle.id,
        name=bundle.name,
        version=bundle.version,
        sha256=bundle.sha256,
        size=bundle.size,
        manifest=bundle.manifest,
        signature=bundle.signature,
        signed_by=signed_by(bundle.signature),
        quarantined=bundle.quarantined,
        created_at=bundle.created_at,
        created_by=bundle.created_by,
    )


async def list_bundles(
    session: AsyncSession, *, name: str | None, limit: int, offset: int
) -> tuple[list[Bundle], int]:
    """A page of bundles, newest first, optionally of one name."""
    conditions = [col(Bundle.name) == name] if name else []
    total = (await session.exec(select(func.count()).select_from(Bundle).where(*conditions))).one()
    rows = await session.exec(
        select(Bundle)
        .where(*conditions)
        .order_by(col(Bundle.created_at).desc(), col(Bundle.id))
        .limit(limit)
        .offset(offset)
    )
    return list(rows.all()), total


async def get_bundle(session: AsyncSession, bundle_id: str) -> Bundle:
    """One bundle, or NotFoundError."""
    bundle = await session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFoundError(f"bundle {bundle_id} not found")
    return bundle


# --- delete ---------------------------------------------------------------------------------


async def delete_bundle(
    session: AsyncSession,
    runtime: BundleRuntime,
    bundle_id: str,
    *,
    actor: Principal,
    request: Request | None = None,
) -> None:
    """Delete a bundle no deployment refers to: its row, then its stored object."""
    target = f"bundle:{bundle_id}"
    async with audit.audited(session, actor=actor, action="bundle.delete", target=target, request=request):
        bundle = await get_bundle(session, bundle_id)
        users = (
            await session.exec(
                select(Deployment.id, Deployment.status)
                .where(col(Deployment.bundle_id) == bundle_id)
                .order_by(col(Deployment.created_at).desc())
                .limit(1)
            )
        ).first()
        if users is not None:
            deployment_id, status = users
            state = "an active" if status in ACTIVE_DEPLOYMENT_STATUSES else "a"
            raise ConflictError(
                f"bundle {bundle_id} is used by {state} deployment ({deployment_id}, {status})"
            )
        history = (
            await session.exec(
                select(DeviceBundleHistory.id).where(col(DeviceBundleHistory.bundle_id) == bundle_id).limit(1)
            )
        ).first()
        if history is not None:
            raise ConflictError(f"bundle {bundle_id} is in devices' bundle history")
        await session.delete(bundle)
        details = {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256}
        try:
            await audit.record(
                session,
                actor=actor,
                action="bundle.delete",
                target=target,
                outcome="success",
                request=request,
                details=details,
            )
        except sa.exc.IntegrityError:
            # A deployment referring to it was created meanwhile: the foreign key refused the delete.
            await session.rollback()
            raise ConflictError(f"bundle {bundle_id} is used by a deployment") from None
    runtime.integrity.forget(bundle_id)
    await _delete_object(runtime, bundle.storage_key)
    log.info("bundle deleted", bundle_id=bundle_id, name=bundle.name, version=bundle.version)


async def _delete_object(runtime: BundleRuntime, key: str) -> None:
    try:
        await runtime.store.delete(key)
    except BundleStoreError as exc:
        # The row is gone (or never was): an unreachable object is only wasted space, named for cleanup.
        log.warning("stored bundle object left behind", key=key, error=str(exc))


# --- download -------------------------------------------------------------------------------


class DownloadAbortedError(RuntimeError):
    """Raised mid-response to break the connection: the bytes being served are not the bundle.

    Deliberately not an API error: once the status line is sent no handler can answer, and the
    server must drop the connection so the client sees an incomplete transfer, not a wrong file.
    """


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end) of a bundle."""

    start: int
    end: int


async def authorize_download(session: AsyncSession, bundle_id: str, caller: Caller) -> Bundle:
    """The bundle if the caller may download it: operators always, devices only as active targets."""
    bundle = await get_bundle(session, bundle_id)
    if caller.device_id is not None:
        targeted = (
            await session.exec(
                select(DeploymentTarget.deployment_id)
                .join(Deployment, col(Deployment.id) == col(DeploymentTarget.deployment_id))
                .where(
                    col(DeploymentTarget.device_id) == caller.device_id,
                    col(Deployment.bundle_id) == bundle_id,
                    col(Deployment.status).in_(ACTIVE_DEPLOYMENT_STATUSES),
                )
                .limit(1)
            )
        ).first()
        if targeted is None:
            raise ForbiddenError(
                f"device {caller.device_id} is not a target of an active deployment of {bundle_id}"
            )
    if bundle.quarantined:
        raise BundleQuarantinedError(
            f"bundle {bundle_id} is quarantined: its stored bytes failed verification"
        )
    return bundle


async def ensure_intact(
    session: AsyncSession, runtime: BundleRuntime, bundle: Bundle, request: Request | None = None
) -> None:
    """Quarantine (and refuse with 410) a bundle whose stored bytes no longer match its SHA-256."""
    try:
        await runtime.integrity.check(bundle.id, bundle.storage_key, bundle.sha256, bundle.size)
    except IntegrityMismatchError as exc:
        await quarantine(session, bundle, str(exc), request=request)
        raise BundleQuarantinedError(f"bundle {bundle.id} is quarantined: {exc}") from None
    except BundleStoreError as exc:
        raise ServiceUnavailableError(f"bundle store unavailable: {exc}") from None


async def quarantine(
    session: AsyncSession, bundle: Bundle, reason: str, *, request: Request | None = None
) -> None:
    """Flag the bundle: every later download is refused until an operator replaces it."""
    bundle.quarantined = True
    session.add(bundle)
    await audit.record(
        session,
        actor=SYSTEM_ACTOR,
        action="bundle.quarantine",
        target=f"bundle:{bundle.id}",
        outcome="success",
        request=request,
        details={
            "reason": reason[:1000],
            "name": bundle.name,
            "version": bundle.version,
            "sha256": bundle.sha256,
        },
    )
    log.error(
        "bundle quarantined", bundle_id=bundle.id, name=bundle.name, version=bundle.version, reason=reason
    )


def requested_range(range_header: str | None, if_range: str | None, etag: str, size: int) -> ByteRange | None:
    """The single byte range asked for, or None for the whole bundle.

    Multiple ranges and malformed headers are ignored (RFC 9110 §14.2 lets a server send the
    whole representation); so is a Range whose If-Range does not name the current ETag.
    """
    if range_header is None or (if_range is not None and if_range.strip() != etag):
        return None
    match = _RANGE_RE.match(range_header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiableError("an empty suffix range selects nothing", size=size)
        return ByteRange(max(0, size - suffix), size)
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # last-pos before first-pos: invalid, so ignored
    if start >= size:
        raise RangeNotSatisfiableError(f"range starts at {start}; the bundle has {size} bytes", size=size)
    return ByteRange(start, min(end, size))


async def stream(
    runtime: BundleRuntime,
    sessions: async_sessionmaker[AsyncSession],
    bundle: Bundle,
    byte_range: ByteRange,
) -> AsyncIterator[bytes]:
    """The bytes of the range; a whole-bundle read is hashed as it goes.

    The last chunk is held back until the hash is known: if the bytes changed since they were
    verified, the bundle is quarantined and the response broken off, so the client never
    receives a complete, wrong download.
    """
    digest = hashlib.sha256() if (byte_range.start, byte_range.end) == (0, bundle.size) else None
    held: bytes | None = None
    try:
        async with aclosing(
            runtime.store.read(bundle.storage_key, byte_range.start, byte_range.end)
        ) as chunks:
            async for chunk in chunks:
                if digest is not None:
                    await asyncio.to_thread(digest.update, chunk)
                if held is not None:
                    yield held
                held = chunk
    except StoredObjectCorruptError as exc:
        await _quarantine_while_serving(runtime, sessions, bundle, str(exc))
        raise DownloadAbortedError(f"bundle {bundle.id} quarantined mid-download: {exc}") from None
    if digest is not None and digest.hexdigest() != bundle.sha256:
        reason = f"changed while being served: hashes to {digest.hexdigest()}"
        await _quarantine_while_serving(runtime, sessions, bundle, reason)
        raise DownloadAbortedError(f"bundle {bundle.id} quarantined: {reason}")
    if held is not None:
        yield held


async def _quarantine_while_serving(
    runtime: BundleRuntime, sessions: async_sessionmaker[AsyncSession], bundle: Bundle, reason: str
) -> None:
    runtime.integrity.forget(bundle.id)
    # The request's session is closed once the response has started: use a fresh one.
    async with sessions() as session:
        row = await session.get(Bundle, bundle.id)
        if row is not None and not row.quarantined:
            await quarantine(session, row, reason)
